"""Checkpoints: written atomically, read without executing code.

A dits checkpoint is a ``torch.save`` of plain tensors and primitives only::

    {"format": "dits", "version": 1, "kind": "train" | "model",
     "model_config": {...DiTConfig...}, "model": state_dict, "ema": state_dict,
     "opt": optimizer state, "step": int, "train_config": {...}, "rng": {...}}

so ``torch.load(weights_only=True)`` reads it. ``load_model`` also accepts the reference
implementation's files: a plain state dict (the official ``DiT-XL-2-256x256.pt``) or a
training checkpoint ``{"model", "ema", "opt", "args"}``.

:func:`resolve_weights` is the one resolver of "where the weights are": a run directory, a
dits or reference ``.pt``, a ``.safetensors`` state dict, a diffusers DiTPipeline or
transformer directory, or a Hub id (``facebook/DiT-XL-2-256``). ``dits sample --ckpt``,
``dits convert`` and ``dits train --init`` all go through it.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dits.errors import UserError, first_line
from dits.fileio import atomic_write
from dits.models import DiT, DiTConfig
from dits.models.configs import SIZES, canonical_name
from dits.models.registry import build, config_from_dict, describe

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
    kind = _file_kind(path)
    if kind != "torch":
        raise UserError(f"{path} is not a checkpoint file ({kind}); pass a run directory, a .pt or "
                        ".safetensors file, a diffusers DiT directory or a Hub id")
    try:
        # argparse.Namespace is allowed so the reference's training checkpoints ({"args": ...})
        # load; it is a plain attribute bag, nothing executes.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"{path} is not a plain-tensor checkpoint (it would need to execute code "
                            f"to load); refusing it") from None
        raise UserError(f"{path} is truncated or damaged ({first_line(e, 100)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a checkpoint: expected a dict, found {type(obj).__name__}")
    return obj


def _file_kind(path: Path) -> str:
    """"torch" (zip or legacy pickle), "safetensors", or a few words saying what it is."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if not head:
        return "an empty file"
    if path.suffix == ".safetensors":
        return "safetensors"  # let the reader say what is wrong with it
    try:
        head.decode("utf-8")
        return f"a text file{' (YAML)' if path.suffix in ('.yaml', '.yml') else ''}"
    except UnicodeDecodeError:
        return "an unknown binary format"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"{step:07d}.pt"


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's numbered checkpoints ``checkpoints/NNNNNNN.pt``, oldest first."""
    d = Path(run_dir) / CKPT_DIR
    return sorted(p for p in d.glob("*.pt") if p.stem.isdigit()) if d.is_dir() else []


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    files = run_checkpoints(run_dir)
    return files[-1] if files else None


def newest_readable_checkpoint(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of a run that loads, and its contents (None if there is none).

    A newer file that does not load (a torn write from a crash, a full disk) is renamed to
    ``NNNNNNN.pt.bad`` (kept for inspection, no longer picked up) with a one-line warning."""
    for path in reversed(run_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            bad = path.with_name(path.name + ".bad")
            try:
                os.replace(path, bad)  # under torchrun another rank may have moved it already
            except FileNotFoundError:
                pass
            warnings.warn(f"{e}; moved it to {bad.name}, resuming from the previous checkpoint", stacklevel=2)
    return None


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CKPT_DIR).is_dir() or (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file()


# ------------------------------------------------------------------ where weights come from
@dataclass
class Weights:
    """What :func:`resolve_weights` found: an architecture, one state dict, and where it came from
    (``source``, ``weights`` ("ema" or "model"), ``step``, ``train_config``, ``vae_spec``)."""
    config: DiTConfig
    state_dict: dict
    info: dict = field(default_factory=dict)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_weights(spec: str | Path, model_name: str | None = None, use_ema: bool = True) -> Weights:
    """Turn whatever the user passed into (config, weights, provenance); one line if it cannot."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if latest_checkpoint(path) is not None:
            return _from_file(latest_checkpoint(path), model_name, use_ema)
        if _diffusers_layout(path):
            return _from_diffusers(path, str(spec))
        if is_run_dir(path):
            raise UserError(f"no checkpoint in {path / CKPT_DIR}; train first or pass a checkpoint file")
        raise UserError(f"{path} is neither a run directory (no {CKPT_DIR}/) nor a diffusers DiT directory "
                        "(no model_index.json or config.json)")
    if path.is_file():
        return _from_file(path, model_name, use_ema)
    if _looks_like_hub_id(str(spec)):
        return _from_diffusers(_hub_snapshot(str(spec)), str(spec))
    raise UserError(f"checkpoint not found: {spec} (not a file, a directory, or a Hub id like facebook/DiT-XL-2-256)")


def _looks_like_hub_id(spec: str) -> bool:
    """owner/name, not a weight file's name, and not inside a local directory of that name."""
    return (bool(HUB_ID.fullmatch(spec)) and not spec.startswith(".") and not Path(spec.split("/")[0]).is_dir()
            and Path(spec).suffix not in (".pt", ".pth", ".bin", ".ckpt", ".safetensors"))


def _from_file(file: Path, model_name: str | None, use_ema: bool) -> Weights:
    if _file_kind(file) == "safetensors":
        sd = _read_safetensors(file)
        if any(k.startswith("transformer_blocks.") for k in sd):  # diffusers layout: its directory has the config
            if _diffusers_layout(file.parent):
                return _from_diffusers(file.parent, str(file))
            raise UserError(f"{file} holds diffusers weights but {file.parent} has no config.json; "
                            "pass the pipeline or transformer directory")
        obj = sd
    else:
        obj = load_checkpoint(file)
    info = {"source": str(file), "step": obj.get("step"), "train_config": obj.get("train_config"),
            "vae_spec": obj.get("vae_spec"), "objective": obj.get("objective")}  # see dits.objectives.objective_of
    if obj.get("format") == FORMAT:
        cfg = config_from_dict(obj["model_config"])  # the backbone it names (dits.models.registry); none: a DiT
        key = "ema" if use_ema and obj.get("ema") is not None else "model"
        sd = obj[key]
    elif "model" in obj and isinstance(obj["model"], dict) and "pos_embed" in obj["model"]:
        # the reference training checkpoint {"model", "ema", "opt", "args"}
        key = "ema" if use_ema and isinstance(obj.get("ema"), dict) else "model"
        sd = obj[key]
        name = model_name or getattr(obj.get("args"), "model", None)
        cfg = infer_config(sd, name)
    elif "pos_embed" in obj:
        key, sd = "model", obj
        cfg = infer_config(sd, model_name)
    else:
        raise UserError(f"{file} is not a DiT checkpoint (no model weights found)")
    info["weights"] = key
    return Weights(cfg, sd, info)


def _read_safetensors(file: Path) -> dict:
    try:
        from safetensors.torch import load_file
        return load_file(str(file), device="cpu")
    except Exception as e:  # safetensors raises its own error type (and OSError, ValueError...)
        raise UserError(f"{file} is not a readable .safetensors file ({first_line(e, 100)})") from None


def _diffusers_layout(path: Path) -> bool:
    return any((path / f).is_file() for f in ("model_index.json", "config.json", "transformer/config.json"))


def _from_diffusers(directory: Path, source: str) -> Weights:
    """A DiTPipeline or transformer directory, converted exactly (the reference's timestep
    frequencies: see dits.interop.diffusers). A pipeline dits exported carries ``dits.json``
    with the run's provenance, so it samples like the run it came from."""
    from dits.interop.diffusers import METADATA, from_diffusers

    model = from_diffusers(directory)
    meta = {}
    for d in (directory, directory.parent):
        if (d / METADATA).is_file():
            meta = json.loads((d / METADATA).read_text())
            break
    vae_dir = directory / "vae"
    vae_spec = str(vae_dir) if (vae_dir / "config.json").is_file() else meta.get("vae_spec")
    info = {"source": source, "step": meta.get("step"), "train_config": meta.get("train_config"),
            "vae_spec": vae_spec, "weights": meta.get("weights", "model")}
    return Weights(model.config, {k: v.float() for k, v in model.state_dict().items()}, info)


def _hub_snapshot(repo_id: str) -> Path:
    """A local snapshot of a Hub repository's DiT parts (the cache first; offline: the cache only)."""
    import huggingface_hub

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    parts = ["model_index.json", "dits.json", "config.json", "transformer/config.json", "vae/config.json"]
    try:
        local = Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=parts + ["*.safetensors", "transformer/*.safetensors", "vae/*.safetensors"],
            local_files_only=offline))
        if not any(local.glob("**/*.safetensors")):  # an older repository: PyTorch .bin weights only
            local = Path(huggingface_hub.snapshot_download(
                repo_id, allow_patterns=parts + ["*.bin", "transformer/*.bin", "vae/*.bin"], local_files_only=offline))
    except Exception as e:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        if offline:
            raise UserError(f"{repo_id} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
                            "unset HF_HUB_OFFLINE to download it, or pass a local directory") from None
        raise UserError(f"cannot get {repo_id} from the Hugging Face Hub ({first_line(e, 120)}); "
                        "check the id and the network, or pass a local directory") from None
    return local


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
    """Load a model for inference from anything :func:`resolve_weights` accepts.

    Returns ``(model, info)``; the model is in eval mode on the CPU, with the EMA weights
    when the checkpoint has them (and ``use_ema``). ``info`` has ``source``, ``step``,
    ``train_config`` (when known), ``vae_spec`` and ``weights`` ("ema" or "model").
    """
    w = resolve_weights(path, model_name, use_ema)
    model = build(w.config)  # a DiT, or the backbone the checkpoint names
    try:
        model.load_state_dict(w.state_dict, strict=True)
    except RuntimeError as e:
        cfg = w.config
        raise UserError(f"{w.info['source']} does not match model {describe(cfg)}: "
                        f"{first_line(e, 160)}") from None
    return model.eval(), w.info
