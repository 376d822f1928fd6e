"""Training configuration as plain data: a dataclass, YAML presets, CLI overrides.

Precedence: dataclass defaults (the paper's recipe, SPEC section 4) < preset YAML
(``src/dits/configs/<name>.yaml``, or a path) < command-line flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from dits.errors import UserError

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class TrainConfig:
    # ---- data
    data: str = "digits"              # "digits" (built in) or an image folder (class subfolders = labels)
    latents: str | None = None        # a cache written by `dits extract-latents` (then `data` is unused)
    image_size: int = 256             # pixel side length for image folders
    vae: str | None = None            # None: pixel space; else a diffusers AutoencoderKL hub id or directory
    vae_scale: float | None = None    # latent scaling factor override (default: the VAE config's, 0.18215 for SD)
    flip: bool = True                 # random horizontal flips (the paper's only augmentation)
    # ---- model
    model: str = "DiT-XL/2"           # DiT-S/2 ... DiT-XL/8, or "DiT" with the sizes below
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    block: str = "adaln-zero"
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    # ---- diffusion
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    # ---- optimisation (the paper's recipe)
    steps: int = 400_000
    batch_size: int = 256             # global, over all processes
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0            # max grad norm; 0 = off
    ema_decay: float = 0.9999
    ema_warmup: bool = False          # decay min(ema_decay, (1+n)/(10+n)): EMA useful early in short runs
    precision: str = "fp32"           # fp32 | bf16 | fp16
    seed: int = 0
    lr_schedule: str = "constant"     # constant | cosine (after warm-up, to 0 at --steps; short runs)
    # ---- bookkeeping
    out: str = "runs/dit"
    log_every: int = 100
    ckpt_every: int = 50_000
    sample_every: int = 0             # 0: same as ckpt_every
    sampler: str = "ddpm"             # for preview grids and the evaluation at the end
    sample_steps: int = 250
    cfg_scale: float = 4.0
    samples_per_class: int = 8        # columns of the preview grid (one row per class)
    eval_samples: int = 0             # digits metric sample count at each preview and at the end (0 = off)
    num_workers: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    fsdp: bool = False
    # ---- speed (dits.speed decides the kernels; these only say what the user asked for)
    compile: str = "auto"             # auto | on | off: torch.compile the model (auto: where it pays back)
    grad_checkpoint: bool = False     # recompute each block's activations in backward: less memory, ~1/3 more compute

    def validate(self) -> "TrainConfig":
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise UserError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        for name in ("steps", "batch_size", "log_every", "ckpt_every"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UserError(f"lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.compile not in ("auto", "on", "off"):
            raise UserError(f"compile must be auto, on or off, got {self.compile!r}")
        if not isinstance(self.grad_checkpoint, bool):
            raise UserError(f"grad-checkpoint must be true or false, got {self.grad_checkpoint!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def fields(cls) -> dict:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        unknown = set(d) - set(cls.fields())
        if unknown:
            raise UserError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))}")
        return cls(**d)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"unknown preset {name_or_path!r}; available: {', '.join(list_presets())} (or a YAML file)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    TrainConfig.from_dict(data, where=str(path))  # validate keys
    return data


def resolve_config(preset: str | None = None, overrides: dict | None = None) -> TrainConfig:
    values: dict = {}
    if preset:
        values.update(load_preset(preset))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig.from_dict(values).validate()
