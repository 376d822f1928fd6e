"""The text side of a training run (``dits train --text-encoder ...``).

:func:`build_text` is called by the trainer after the data source is built. It finds the
captions (:mod:`dits.data.captions`), sets up the encoder side and returns the source re-keyed
so that each batch carries example indices instead of labels, plus a :class:`TextTraining`
that turns (indices, step) into the model's ``text`` / ``text_mask`` inputs:

* which caption of an image a step uses is drawn from a generator seeded by (seed, step) for
  the global batch, like everything else random about a step, so ``--resume`` and torchrun
  give the same trajectory;
* ``learned``: the vocabulary is built from the training captions (or taken from the
  checkpoint on resume) and every caption is tokenised once;
* a frozen encoder: the caption embeddings come from the latent cache when it holds them for
  that encoder (training never runs the encoder), else the encoder runs on each step's captions.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from dits.data.captions import BUILTIN_CAPTIONS, DIGITS_SOURCE, CaptionSet, digits_captions, \
    folder_caption_file, match_captions, read_caption_file
from dits.errors import UserError

PREVIEW_ROWS = 8


def digits_preview_prompts() -> list[str]:
    """One row per digit (plain phrasing), then bold and thin seven."""
    from dits.data.captions import NUMBER_WORDS
    return [f"a handwritten {w}" for w in NUMBER_WORDS] + ["a bold handwritten seven", "a thin handwritten seven"]


class _Indexed(torch.utils.data.Dataset):
    """A dataset whose items are (input, example index): the caption is looked up by index."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i][0], i

    def __getattr__(self, name):  # vae_spec, image_size, ... of the wrapped dataset
        if name == "ds":
            raise AttributeError(name)
        return getattr(self.ds, name)


class _IndexedCache(_Indexed):
    def get(self, i, flip, generator=None):
        return self.ds.get(i, flip, generator)[0], i


def _reindex(source):
    from dits.train.sources import DatasetSource, TensorSource

    if isinstance(source, TensorSource):
        return TensorSource(source.x, torch.arange(len(source)), 0)
    ds = source.dataset
    wrapped = _IndexedCache(ds) if hasattr(ds, "get") else _Indexed(ds)
    return DatasetSource(wrapped, 0, source.num_workers, source.seed)


def find_captions(cfg, source) -> tuple[CaptionSet, dict | None]:
    """(captions of the source's examples, the latent cache's text section or None)."""
    from dits.data.builtin import is_builtin
    from dits.train.sources import TensorSource

    if cfg.latents:
        from dits.text.cache import read_cache_text

        ds = source.dataset
        cached = read_cache_text(cfg.latents)
        names = [ln for ln in (Path(cfg.latents).expanduser() / "files.txt").read_text().splitlines()]
        if cfg.captions:
            return match_captions(names, read_caption_file(cfg.captions), f"the latent cache {cfg.latents}",
                                  f"caption file {cfg.captions}"), None
        if cached is None:
            raise UserError(f"the latent cache {cfg.latents} has no captions; extract it with --captions "
                            "(and --text-encoder for a frozen encoder), or pass --captions FILE.jsonl")
        if len(cached["rows"]) != len(ds):
            raise UserError(f"the latent cache {cfg.latents} is damaged (captions for {len(cached['rows'])} of "
                            f"{len(ds)} images); extract it again")
        return CaptionSet(list(cached["texts"]), [list(r) for r in cached["rows"]], f"the captions of {cfg.latents}"), \
            cached
    if is_builtin(cfg.data) and isinstance(source, TensorSource):  # (check_text_config allowed only digits)
        return digits_captions(source.x, source.y), None
    ds = source.dataset
    path = folder_caption_file(ds.root, cfg.captions)
    import os
    names = [os.path.relpath(f, ds.root) for f in ds.files]
    return match_captions(names, read_caption_file(path), f"the data folder {ds.root}", f"caption file {path}"), None


def check_text_config(cfg) -> None:
    """The text flags that can be checked before any data is read (called by TrainConfig.validate)."""
    if cfg.text_encoder is None:
        if cfg.captions is not None:
            raise UserError("--captions needs a text encoder: add --text-encoder learned (or a CLIP/T5 Hub id or dir)")
        if cfg.max_text_tokens is not None:
            raise UserError("--max-text-tokens needs a text encoder: add --text-encoder learned "
                            "(or a CLIP/T5 Hub id or dir)")
        return
    if not str(cfg.text_encoder).strip():
        raise UserError("--text-encoder is empty; use learned, a Hub id or a directory")
    if cfg.max_text_tokens is not None and int(cfg.max_text_tokens) < 1:
        raise UserError(f"--max-text-tokens must be >= 1, got {cfg.max_text_tokens}")
    if cfg.init:
        raise UserError("--init (fine-tuning) does not take a text encoder yet; train a text model from scratch")
    from dits.data.builtin import is_builtin
    if is_builtin(cfg.data) and not cfg.latents:
        name = cfg.captions or cfg.data
        if name != cfg.data or name not in BUILTIN_CAPTIONS:
            raise UserError(f"the built-in {cfg.data} have no captions {name!r} (built-in captions: "
                            f"{', '.join(BUILTIN_CAPTIONS)}, for --data digits); a caption file needs --data FOLDER")
    if cfg.text_encoder != "learned":
        from dits.text.pretrained import _locate, require_transformers
        if not cfg.latents:  # from a latent cache with its caption embeddings the encoder is never loaded
            require_transformers()
        _locate(str(cfg.text_encoder))  # a local path that is not an encoder directory: one line now


class TextTraining:
    """Captions -> the model's text inputs, per step. ``model_fields``: the DiTConfig text fields."""

    def __init__(self, captions: CaptionSet, model_fields: dict, seed: int, batch: int, table=None,
                 encoder=None, preview_prompts=None):
        self.captions, self.model_fields, self.seed, self.batch = captions, model_fields, seed, batch
        self.table, self.encoder = table, encoder
        self.max_tokens = int(model_fields["text_tokens"])
        self.preview_prompts = preview_prompts or captions.most_common(PREVIEW_ROWS)

    def describe(self) -> str:
        f = self.model_fields
        enc = (f"learned encoder over {len(f['text_vocab'])} words" if f["text_encoder"] == "learned" else
               f"frozen {f['text_encoder']} ({f['text_dim']}-d, {'cached embeddings' if self.encoder is None else 'run on each step'})")
        return (f"{enc}, {self.max_tokens} tokens, {len(self.captions.texts)} distinct captions from "
                f"{self.captions.source}")

    def generator(self, step: int) -> torch.Generator:
        """Which caption of each image step ``step`` uses (the global batch)."""
        return torch.Generator().manual_seed((self.seed + 4) * 5_000_011 + step)

    def caption_ids(self, index: torch.Tensor, step: int, lo: int, hi: int) -> torch.Tensor:
        u = torch.rand(self.batch, generator=self.generator(step))[lo:hi]
        return self.captions.choose(index, u)

    def kwargs(self, index: torch.Tensor, step: int, lo: int, hi: int, device) -> dict:
        cid = self.caption_ids(index, step, lo, hi)
        if self.table is not None:
            text, mask = self.table
            row = torch.where(cid < 0, torch.full_like(cid, len(self.captions.texts)), cid)
            t, m = text[row], mask[row]
        else:
            t, m = self.encoder.encode([self.captions.texts[c] if c >= 0 else "" for c in cid.tolist()],
                                       self.max_tokens)
        return {"text": t.to(device, non_blocking=True), "text_mask": m.to(device, non_blocking=True)}


def build_text(cfg, source, ctx, state: dict | None = None):
    """(source, TextTraining) for a text run, (source, None) for a label run. ``state``: the resumed
    checkpoint (its vocabulary and token count are kept)."""
    if cfg.text_encoder is None:
        return source, None
    captions, cached = find_captions(cfg, source)
    saved = (state or {}).get("model_config") or {}
    preview = digits_preview_prompts() if captions.source == DIGITS_SOURCE else None
    if cfg.text_encoder == "learned":
        from dits.text.vocab import Vocabulary

        vocab = Vocabulary(saved["text_vocab"]) if saved.get("text_vocab") is not None else \
            Vocabulary.build(captions.texts)
        length = int(cfg.max_text_tokens or saved.get("text_tokens") or vocab.longest(captions.texts))
        ids, report = vocab.encode(captions.texts + [""], length)
        if report["truncated"] and ctx.main:
            warnings.warn(f"{report['truncated']} caption(s) have more than {length} words and are cut "
                          "(--max-text-tokens)", stacklevel=2)
        fields = dict(text_encoder="learned", text_dim=int(saved.get("text_dim") or _width(cfg)),
                      text_tokens=length, text_vocab=vocab.to_list(), text_adaln=cfg.text_adaln)
        return _reindex(source), TextTraining(captions, fields, cfg.seed, cfg.batch_size, table=(ids, ids != 0),
                                              preview_prompts=preview)
    from dits.text.pretrained import DEFAULT_MAX_TOKENS, PretrainedTextEncoder, encoder_key

    key = encoder_key(cfg.text_encoder)
    length = int(cfg.max_text_tokens or saved.get("text_tokens") or (cached or {}).get("max_tokens")
                 or DEFAULT_MAX_TOKENS)
    if cached is not None and cached.get("encoder") is not None:
        if cached["encoder"] != key:
            raise UserError(f"the latent cache {cfg.latents} holds caption embeddings of {cached['encoder']}, "
                            f"not {key}; train with --text-encoder {cached['encoder']} or extract again")
        if int(cached["max_tokens"]) != length:
            raise UserError(f"the latent cache {cfg.latents} holds captions of {cached['max_tokens']} tokens; "
                            f"drop --max-text-tokens or extract again with --max-text-tokens {length}")
        from dits.text.cache import cached_embeddings

        feats, mask = cached_embeddings(cfg.latents, cached)
        fields = dict(text_encoder=key, text_dim=int(feats.shape[-1]), text_tokens=length, text_adaln=cfg.text_adaln)
        return _reindex(source), TextTraining(captions, fields, cfg.seed, cfg.batch_size, table=(feats, mask),
                                              preview_prompts=preview)
    encoder = PretrainedTextEncoder(cfg.text_encoder, device=ctx.device)
    length = encoder.check_tokens(length)
    fields = dict(text_encoder=key, text_dim=encoder.dim, text_tokens=length, text_adaln=cfg.text_adaln)
    return _reindex(source), TextTraining(captions, fields, cfg.seed, cfg.batch_size, encoder=encoder,
                                          preview_prompts=preview)


def _width(cfg) -> int:
    """The learned encoder's width: the DiT's."""
    from dits.models.configs import config_for
    extra = {k: getattr(cfg, k) for k in ("depth", "hidden_size", "num_heads", "patch_size")}
    return config_for(cfg.model, num_classes=0, **extra).hidden_size
