"""Checkpoints: written atomically, read without executing code.

A dits checkpoint is a ``torch.save`` of plain tensors and primitives only::

    {"format": "dits", "version": 1, "kind": "train" | "model",
     "model_config": {...DiTConfig...}, "model": state_dict, "ema": state_dict,
     "opt": optimizer state, "step": int, "train_config": {...}, "rng": {...}}

so ``torch.load(weights_only=True)`` reads it. ``load_model`` also accepts the reference
implementation's files: a plain state dict (the official ``DiT-XL-2-256x256.pt``) or a
training checkpoint ``{"model", "ema", "opt", "args"}``.
"""
from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path

import torch

from dits.errors import UserError
from dits.fileio import atomic_write
from dits.models import DiT, DiTConfig
from dits.models.configs import SIZES, canonical_name

FORMAT = "dits"
CKPT_DIR = "checkpoints"


# ------------------------------------------------------------------ raw files
def save_checkpoint(path: str | Path, obj: dict) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file safely (no code execution); one clear error if it is bad."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        # argparse.Namespace is allowed so the reference's training checkpoints ({"args": ...})
        # load; it is a plain attribute bag, nothing executes.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"{path} is not a plain-tensor checkpoint (it would need to execute code "
                            f"to load); refusing it") from None
        raise UserError(f"{path} is truncated or not a PyTorch checkpoint ({first[:120]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a checkpoint: expected a dict, found {type(obj).__name__}")
    return obj


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"{step:07d}.pt"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    d = Path(run_dir) / CKPT_DIR
    files = sorted(p for p in d.glob("*.pt") if p.stem.isdigit()) if d.is_dir() else []
    return files[-1] if files else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its latest checkpoint; a file means itself."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise UserError(f"no checkpoint in {path / CKPT_DIR}; train first or pass a checkpoint file")
        return latest
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    return path


# ------------------------------------------------------------------ models
def save_model(path: str | Path, model: DiT, **extra) -> Path:
    """An inference checkpoint: the config and one set of weights."""
    obj = {"format": FORMAT, "version": 1, "kind": "model", "model_config": model.config.to_dict(),
           "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    obj.update(extra)
    return save_checkpoint(path, obj)


def infer_config(sd: dict, model_name: str | None = None) -> DiTConfig:
    """Architecture of a reference-layout (adaLN-Zero) state dict, from its shapes."""
    need = ("pos_embed", "x_embedder.proj.weight", "final_layer.linear.weight")
    if not all(k in sd for k in need):
        raise UserError("not a DiT state dict: missing " + ", ".join(k for k in need if k not in sd))
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if "y_embedder.embedding_table.weight" in sd:
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
        # The reference always trains with label dropout, so the table has a null row.
        num_classes, dropout = rows - 1, 0.1
    else:
        num_classes, dropout = 0, 0.0
    overrides = dict(input_size=int(round(tokens ** 0.5)) * p, in_channels=in_ch, num_classes=num_classes,
                     learn_sigma=out_ch == 2 * in_ch, class_dropout_prob=dropout)
    if model_name:
        cfg = DiTConfig(**{**_named(model_name), **overrides})
        if (cfg.depth, cfg.hidden_size, cfg.patch_size) != (depth, hidden, p):
            raise UserError(f"checkpoint holds depth {depth}, width {hidden}, patch {p}, which is not {model_name}")
        return cfg
    heads = {(d, w): h for d, w, h in SIZES.values()}.get((depth, hidden))
    if heads is None:
        raise UserError(f"checkpoint has a custom size (depth {depth}, width {hidden}); "
                        "pass --model with the head count, e.g. a dits checkpoint of it")
    return DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=p, **overrides)


def _named(name: str) -> dict:
    from dits.models.configs import config_for
    cfg = config_for(canonical_name(name)).to_dict()
    return {k: cfg[k] for k in ("depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio", "block")}


def load_model(path: str | Path, model_name: str | None = None, use_ema: bool = True) -> tuple[DiT, dict]:
    """Load a model for inference from a run dir, a dits checkpoint, or a reference file.

    Returns ``(model, info)``; the model is in eval mode on the CPU, with the EMA weights
    when the checkpoint has them (and ``use_ema``). ``info`` has ``source``, ``step``,
    ``train_config`` (when known) and ``weights`` ("ema" or "model").
    """
    file = resolve_checkpoint(path)
    obj = load_checkpoint(file)
    info = {"source": str(file), "step": obj.get("step"), "train_config": obj.get("train_config"),
            "vae_spec": obj.get("vae_spec"), "objective": obj.get("objective")}  # see dits.objectives.objective_of
    if obj.get("format") == FORMAT:
        cfg = DiTConfig.from_dict(obj["model_config"])
        key = "ema" if use_ema and obj.get("ema") is not None else "model"
        sd = obj[key]
    elif "model" in obj and isinstance(obj["model"], dict) and "pos_embed" in obj["model"]:
        # the reference training checkpoint {"model", "ema", "opt", "args"}
        key = "ema" if use_ema and isinstance(obj.get("ema"), dict) else "model"
        sd = obj[key]
        args = obj.get("args")
        name = model_name or getattr(args, "model", None)
        cfg = infer_config(sd, name)
    elif "pos_embed" in obj:
        key, sd = "model", obj
        cfg = infer_config(sd, model_name)
    else:
        raise UserError(f"{file} is not a DiT checkpoint (no model weights found)")
    info["weights"] = key
    model = DiT(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"{file} does not match model {cfg.depth}x{cfg.hidden_size}/{cfg.patch_size}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    return model.eval(), info
