"""Prompts at sampling time: captions -> what a text model takes, and the adapter that lets every
sampler and guidance wrapper treat the prompts as classes (prompt i = label i, label P = the null
caption), so text sampling reuses the class-conditional machinery unchanged."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from dits.errors import UserError


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a text file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist; pass a text file with one prompt per line")
    try:
        prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompts file {path} ({e})") from None
    if not prompts:
        raise UserError(f"prompts file {path} has no prompt (one per line)")
    return prompts


def check_max_tokens(config, max_tokens: int | None) -> int:
    """The caption length to sample with: the model's own, or ``max_tokens`` where the model allows it."""
    if max_tokens is None:
        return int(config.text_tokens)
    max_tokens = int(max_tokens)
    if max_tokens < 1:
        raise UserError(f"--max-text-tokens must be >= 1, got {max_tokens}")
    if max_tokens > config.text_tokens:
        if config.block == "in-context":
            raise UserError(f"this in-context model was trained with at most {config.text_tokens} text tokens; "
                            f"--max-text-tokens {max_tokens} is more (its sequence would hold tokens it never saw)")
        if config.text_encoder == "learned":
            raise UserError(f"the learned text encoder has {config.text_tokens} positions; "
                            f"--max-text-tokens {max_tokens} is more")
    return max_tokens


def encode_prompts(config, prompts, max_tokens: int | None = None, device=None, encoder=None):
    """(text, mask) for a text model with ``config`` (a DiTConfig): token ids of the learned
    vocabulary (unknown words -> <unk>, with a one-line warning), or the frozen encoder's features
    (``encoder``: an already loaded :class:`PretrainedTextEncoder`, else loaded from the config)."""
    if not config.text:
        raise UserError("this model is not text-conditional: it takes class labels (--class), not prompts")
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise UserError("no prompts given")
    length = check_max_tokens(config, max_tokens)
    if config.text_encoder == "learned":
        from dits.text.vocab import PAD, Vocabulary

        ids, report = Vocabulary(config.text_vocab).encode(prompts, length)
        if report["unknown"]:
            warnings.warn(f"prompt words not in this model's vocabulary, read as unknown: "
                          f"{', '.join(report['unknown'][:8])}{' ...' if len(report['unknown']) > 8 else ''}",
                          stacklevel=2)
        if report["truncated"]:
            warnings.warn(f"{report['truncated']} prompt(s) cut to {length} words", stacklevel=2)
        return ids.to(device), (ids != PAD).to(device)
    from dits.text.pretrained import PretrainedTextEncoder

    enc = encoder or PretrainedTextEncoder(config.text_encoder, device=device)
    if enc.dim != config.text_dim:
        raise UserError(f"text encoder {config.text_encoder} gives {enc.dim}-d features; the model takes "
                        f"{config.text_dim}-d")
    feats, mask = enc.encode(prompts, length)
    return feats.to(device), mask.to(device)


class PromptConditioned(torch.nn.Module):
    """A text DiT seen as a class-conditional model whose classes are ``prompts``: label i samples
    prompt i, label ``len(prompts)`` (``num_classes``, the null label) the null caption."""

    def __init__(self, model, prompts, max_tokens: int | None = None, device=None):
        super().__init__()
        self.model = model
        device = device if device is not None else next(model.parameters()).device
        self.prompts = [str(p) for p in prompts]
        self.text, self.mask = encode_prompts(model.config, self.prompts, max_tokens, device)
        self.num_classes = len(self.prompts)
        self.config = model.config
        self.in_channels, self.input_size = model.in_channels, model.input_size
        self.learn_sigma = model.learn_sigma

    def forward(self, x, t, y=None, **kwargs):
        if y is None:
            raise UserError("a prompted model needs prompt indices y")
        y = y.to(self.text.device).long()
        idx = y.clamp(0, self.num_classes - 1)
        return self.model(x, t, text=self.text[idx], text_mask=self.mask[idx], force_drop_ids=y >= self.num_classes)
