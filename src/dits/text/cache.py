"""Captions and their embeddings inside a latent cache (``dits extract-latents --captions``).

Beside the latents (see :mod:`dits.data.latents`) a cache may hold::

    text.json            the captions of every row (distinct texts, and each row's caption ids),
                         the encoder, its width and the token count
    text_features.npy    (U, L, E) the frozen encoder's features of the U distinct captions
    text_mask.npy        (U, L) bool, True = a real token

With a frozen encoder (``--text-encoder HUB_ID_OR_DIR``) training then never runs the encoder;
without one only the captions are stored, which is all ``--text-encoder learned`` needs. The
arrays are written first and ``text.json`` last, each atomically, so a cache either has
complete text or none; rerunning the same command with the same captions and encoder does
nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dits.errors import UserError
from dits.fileio import atomic_write, write_json_atomic

FORMAT = "dits-text-cache"
VERSION = 1


def read_cache_text(cache_dir) -> dict | None:
    path = Path(cache_dir).expanduser() / "text.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); extract the captions again") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a dits caption cache")
    return meta


def cached_embeddings(cache_dir, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (U + 1, L, E) float32, mask (U + 1, L)): the cached captions, then a null row."""
    d = Path(cache_dir).expanduser()
    try:
        feats = np.load(d / "text_features.npy", mmap_mode="r")
        mask = np.load(d / "text_mask.npy")
    except (OSError, ValueError) as e:
        raise UserError(f"the caption embeddings of {d} are missing or damaged ({e}); extract them again") from None
    u, length = len(meta["texts"]), int(meta["max_tokens"])
    if feats.shape[:2] != (u, length) or mask.shape != (u, length):
        raise UserError(f"the caption embeddings of {d} have shape {feats.shape}, not ({u}, {length}, E); "
                        "extract them again")
    f = torch.zeros(u + 1, length, feats.shape[2])
    f[:u] = torch.from_numpy(np.array(feats, dtype=np.float32))  # a copy: the memory map is read-only
    m = torch.zeros(u + 1, length, dtype=torch.bool)
    m[:u] = torch.from_numpy(mask.astype(bool))
    return f, m


def cache_names(cache_dir) -> list[str]:
    return (Path(cache_dir).expanduser() / "files.txt").read_text().splitlines()


def add_captions(cache_dir, captions_file=None, text_encoder=None, max_tokens: int | None = None,
                 batch_size: int = 64, device=None) -> dict:
    """Store the captions of a finished latent cache's rows (and, with ``text_encoder``, a spec or a
    loaded :class:`PretrainedTextEncoder`, their embeddings). Returns the ``text.json`` contents."""
    from dits.data.captions import match_captions, read_caption_file
    from dits.data.latents import read_meta

    d = Path(cache_dir).expanduser()
    meta = read_meta(d)
    if meta["done"] < meta["n"]:
        raise UserError(f"latent cache {d} is unfinished; finish it before adding captions")
    path = Path(captions_file).expanduser() if captions_file else Path(meta["data"]) / "metadata.jsonl"
    captions = match_captions(cache_names(d), read_caption_file(path), f"the latent cache {d}",
                              f"caption file {path}")
    enc = None
    if text_encoder is not None:
        from dits.text.pretrained import DEFAULT_MAX_TOKENS, PretrainedTextEncoder

        enc = text_encoder if isinstance(text_encoder, PretrainedTextEncoder) else \
            PretrainedTextEncoder(text_encoder, device=device)
        max_tokens = enc.check_tokens(max_tokens or DEFAULT_MAX_TOKENS)
    text = {"format": FORMAT, "version": VERSION, "caption_file": str(path.resolve()),
            "encoder": enc.spec if enc else None, "max_tokens": int(max_tokens) if enc else None,
            "dim": enc.dim if enc else None, "dtype": meta["dtype"],
            "texts": captions.texts, "rows": captions.per_example}
    old = read_cache_text(d)
    if old is not None and all(old.get(k) == text[k] for k in ("encoder", "max_tokens", "texts", "rows", "dtype")) \
            and (enc is None or ((d / "text_features.npy").is_file() and (d / "text_mask.npy").is_file())):
        return old  # already there
    if enc is not None:
        feats, mask = enc.encode(captions.texts, max_tokens, batch_size=batch_size)
        _save_npy(d / "text_features.npy", feats.numpy().astype(meta["dtype"]))
        _save_npy(d / "text_mask.npy", mask.numpy())
    write_json_atomic(d / "text.json", text, indent=None)
    return text


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)
    atomic_write(path, write)
