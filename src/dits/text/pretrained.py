"""Frozen pretrained text encoders through ``transformers`` (the optional extra ``dits[text]``):
a CLIP text model or a T5 encoder from a Hugging Face Hub id or a local directory.

A directory is either the model itself (``config.json`` and weights, with the tokenizer files
beside them, as ``save_pretrained`` writes both) or a diffusers pipeline with ``text_encoder/``
and ``tokenizer/`` subfolders. Captions are tokenised to at most ``max_tokens`` tokens with an
attention mask; the encoder's last hidden states are the caption features. The encoder is
frozen (eval mode, no gradients): training never updates it, and with a latent cache made by
``dits extract-latents --captions --text-encoder ...`` training never runs it at all.

An empty caption is the null caption: its mask is all False whatever the tokenizer adds
(CLIP's begin/end tokens, T5's end token), and its features are zeros.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dits.errors import UserError, first_line

DEFAULT_MAX_TOKENS = 77  # CLIP's context; PixArt-alpha gives T5 120
# model_type in config.json -> the transformers class that holds the text encoder
ENCODER_CLASSES = {"clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel", "t5": "T5EncoderModel",
                   "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("a pretrained --text-encoder needs the transformers package: pip install 'dits[text]' "
                        "(or use --text-encoder learned, which needs no download)") from None
    return transformers


def encoder_key(spec: str) -> str:
    """One spelling of an encoder spec: the absolute path of a local directory, else the Hub id."""
    path = Path(str(spec)).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def _looks_like_hub_id(spec: str) -> bool:
    from dits.checkpoint import HUB_ID
    return bool(HUB_ID.fullmatch(spec)) and not spec.startswith((".", "/", "~"))


def _locate(spec: str) -> tuple[str, str]:
    """(model location, tokenizer location) of a spec; one line when a local path is not an encoder."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"text encoder {spec} is a file, not a directory; pass a CLIP text model or T5 "
                            "encoder directory (save_pretrained) or a Hub id")
        if (path / "text_encoder" / "config.json").is_file():  # a diffusers pipeline
            return str(path / "text_encoder"), str(path / "tokenizer")
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} is not a text encoder directory (no config.json); pass a CLIP text model "
                            "or T5 encoder saved with save_pretrained (with its tokenizer), or a Hub id")
        return str(path), str(path)
    if not _looks_like_hub_id(spec):
        raise UserError(f"text encoder {spec!r} is neither a directory nor a Hub id (owner/name); "
                        "use --text-encoder learned, a local directory or e.g. openai/clip-vit-large-patch14")
    return spec, spec


class PretrainedTextEncoder:
    """``encode(texts, max_tokens) -> (features (N, L, E) float32, mask (N, L) bool)``, frozen."""

    def __init__(self, spec: str, device=None, dtype: torch.dtype = torch.float32):
        transformers = require_transformers()
        self.spec = encoder_key(spec)
        where, tok_where = _locate(str(spec))
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        local = Path(where).exists()
        try:
            config = transformers.AutoConfig.from_pretrained(where, local_files_only=offline or local)
        except Exception as e:
            if local:
                raise UserError(f"{spec} is not a text encoder directory ({first_line(e, 120)})") from None
            why = "it is not in the Hugging Face cache and HF_HUB_OFFLINE is set" if offline else first_line(e, 120)
            raise UserError(f"cannot get text encoder {spec} from the Hub ({why}); pass a local directory "
                            "or use --text-encoder learned") from None
        cls_name = ENCODER_CLASSES.get(getattr(config, "model_type", None))
        if cls_name is None:
            raise UserError(f"{spec} is a {getattr(config, 'model_type', 'unknown')!r} model, not a text encoder "
                            f"dits can use ({', '.join(sorted(ENCODER_CLASSES))})")
        logging = transformers.utils.logging
        verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()  # no load reports or progress bars on the command's output
        logging.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(tok_where, local_files_only=offline or local)
            model = getattr(transformers, cls_name).from_pretrained(where, local_files_only=offline or local)
        except Exception as e:
            raise UserError(f"cannot load the text encoder {spec} ({first_line(e, 140)}); it needs its weights "
                            "and tokenizer files") from None
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.dim = int(getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model"))
        self.model_type = config.model_type
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_positions = int(limit) if isinstance(limit, int) and limit > 0 else None

    def check_tokens(self, max_tokens: int) -> int:
        max_tokens = int(max_tokens)
        if max_tokens < 1:
            raise UserError(f"--max-text-tokens must be >= 1, got {max_tokens}")
        if self.max_positions is not None and max_tokens > self.max_positions:
            raise UserError(f"--max-text-tokens {max_tokens} is more than this {self.model_type} encoder's "
                            f"{self.max_positions} positions")
        return max_tokens

    @torch.no_grad()
    def encode(self, texts, max_tokens: int, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [str(t or "") for t in texts]
        max_tokens = self.check_tokens(max_tokens)
        feats, masks = [], []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            tok = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=max_tokens,
                                 return_tensors="pt")
            ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
            out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            real = mask.bool() & torch.tensor([bool(t.strip()) for t in chunk], device=self.device)[:, None]
            feats.append(torch.where(real[..., None], out, torch.zeros_like(out)).cpu())
            masks.append(real.cpu())
        if not feats:
            return torch.zeros(0, max_tokens, self.dim), torch.zeros(0, max_tokens, dtype=torch.bool)
        return torch.cat(feats), torch.cat(masks)
