"""Training configuration as plain data: a dataclass, YAML presets, CLI overrides.

Precedence: dataclass defaults (the paper's recipe, SPEC section 4) < preset YAML
(``src/dits/configs/<name>.yaml``, or a path) < the preset's section for the chosen objective
(e.g. a ``flow:`` mapping of keys that differ under ``--objective flow``) < command-line flags.
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
    data: str = "digits"              # a built-in set (digits, glyphs: dits.data.builtin) or an image folder
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
    learn_sigma: bool | None = None   # None: automatic per objective (diffusion: on, as DiT; flow: off)
    class_dropout_prob: float = 0.1   # also the caption dropout of text runs (to the null caption)
    init: str | None = None           # fine-tune from these weights: run dir, .pt, .safetensors, diffusers dir, Hub id
    backbone: str = "dit"             # dit | unet (diffusers' UNet2DModel, ADM-style; dits.models.registry)
    unet_channels: str | None = None  # --backbone unet: width per level, e.g. "32,64" (default 64,128,128)
    unet_layers: int | None = None    # --backbone unet: residual blocks per level (default 2)
    # ---- text conditioning (docs/text.md); None: class labels from the data
    text_encoder: str | None = None   # learned (trained with the DiT) | a CLIP/T5 Hub id or directory (frozen)
    captions: str | None = None       # FILE.jsonl or built-in "digits"; default: FOLDER/metadata.jsonl or the cache's
    max_text_tokens: int | None = None  # caption tokens; default: learned: the longest caption; frozen: 77
    text_adaln: str = "both"          # adaln/adaln-zero with text: pooled | cross-attn (PixArt) | both
    # ---- modern block options (LightningDiT; docs/convergence.md): the paper's DiT by default
    mlp: str = "gelu"                 # gelu (the paper's tanh-GELU MLP) | swiglu
    norm: str = "layernorm"           # layernorm | rmsnorm
    pos: str = "sincos"               # sincos (fixed additive table) | rope (2-D rotary on q, k)
    # ---- masked training (MaskDiT; dits.masking, docs/convergence.md): off by default
    mask_ratio: float = 0.0           # fraction of patch tokens the encoder does not see (0 = off)
    mask_decoder_depth: int | None = None  # decoder blocks; default 2 with --mask-ratio, none without
    mask_loss_weight: float = 0.1     # weight of the masked tokens' MAE term (MaskDiT's λ)
    unmask_steps: int = 0             # the last N steps train unmasked (MaskDiT's fine-tune)
    # ---- diffusion
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    objective: str = "diffusion"      # diffusion (DiT) | flow (linear interpolant, velocity; docs/flow.md)
    loss_weighting: str = "uniform"   # uniform (the paper) | min-snr[:GAMMA] (Min-SNR-γ on L_simple; docs/convergence.md)
    t_sampling: str = "uniform"       # uniform | logit-normal[:M,S] (flow only: t = sigmoid(M + S·z))
    # ---- optimisation (the paper's recipe)
    steps: int = 400_000
    batch_size: int = 256             # global, over all processes
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta2: float = 0.999         # AdamW's β₂ (β₁ 0.9): torch's default, the reference's; LightningDiT 0.95
    warmup_steps: int = 0
    grad_clip: float = 0.0            # max grad norm; 0 = off
    ema_decay: float = 0.9999
    ema_warmup: bool = False          # decay min(ema_decay, (1+n)/(10+n)): EMA useful early in short runs
    precision: str = "fp32"           # fp32 | bf16 | fp16
    seed: int = 0
    lr_schedule: str = "constant"     # constant | cosine (after warm-up, to 0 at --steps; short runs)
    on_nonfinite: str = "stop"        # a non-finite loss or grad norm: stop (exit non-zero) | skip (drop that update)
    # ---- bookkeeping
    out: str = "runs/dit"
    log_every: int = 100
    ckpt_every: int = 50_000
    sample_every: int = 0             # 0: same as ckpt_every
    sampler: str | None = None        # for preview grids and the evaluation at the end; None: the
                                      # objective's default (ddpm for diffusion, sde for flow)
    sample_steps: int = 250
    cfg_scale: float = 4.0
    samples_per_class: int = 8        # columns of the preview grid (one row per class)
    guidance_interval: str | None = None  # "LO,HI": previews guide only at noise levels in [LO, HI] (docs/flow.md)
    eval_samples: int = 0             # digits metric sample count at each preview and at the end (0 = off)
    num_workers: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    fsdp: bool = False
    keep_last: int = 0                # keep the K newest periodic checkpoints (0 = keep all)
    keep_every: int = 0               # also keep every checkpoint whose step is a multiple of M (0 = none)
    log: str = "none"                 # extra logging sinks besides metrics.jsonl: tensorboard, wandb (comma-separated) | none
    # ---- speed (dits.speed decides the kernels; these only say what the user asked for)
    compile: str = "auto"             # auto | on | off: torch.compile the model (auto: where it pays back)
    plan: str = "auto"                # auto (measured: dits.plan) | a plan name such as eager+onednn+sdpa
    grad_checkpoint: bool = False     # recompute each block's activations in backward: less memory, ~1/3 more compute

    def validate(self) -> "TrainConfig":
        """Everything that can be checked without data or weights, so that a typo fails in the
        first second, before a run directory exists."""
        from dits.models.blocks import BLOCKS
        from dits.models.configs import MODEL_NAMES, canonical_name

        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("on-nonfinite", self.on_nonfinite, ("stop", "skip"))
        _choice("block", self.block, tuple(BLOCKS))
        _choice("noise-schedule", self.noise_schedule, ("linear", "cosine"))
        from dits.models.registry import check_train_config
        check_train_config(self)  # the backbone, and no flag of another backbone
        if self.backbone == "dit" and canonical_name(self.model) not in (*MODEL_NAMES, "DiT"):
            raise UserError(f"unknown model {self.model!r}; valid names: {', '.join(MODEL_NAMES)}, "
                            "or DiT with --depth/--hidden-size/--num-heads/--patch-size")
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "sample_steps", "samples_per_class",
                     "diffusion_steps", "image_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("sample_every", "eval_samples", "num_workers", "keep_last", "keep_every", "warmup_steps"):
            if int(getattr(self, name)) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.sample_steps > self.diffusion_steps:
            raise UserError(f"--sample-steps {self.sample_steps} is more than the {self.diffusion_steps} "
                            "diffusion steps")
        if not self.lr > 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if not (self.grad_clip >= 0 and self.weight_decay >= 0):
            raise UserError("--grad-clip and --weight-decay must be >= 0")
        if not 0 <= self.adam_beta2 < 1:
            raise UserError(f"--adam-beta2 must be in [0, 1), got {self.adam_beta2}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.class_dropout_prob < 1:
            raise UserError(f"--class-dropout-prob must be in [0, 1), got {self.class_dropout_prob}")
        from dits.data.builtin import is_builtin
        if is_builtin(self.data) and not self.latents and self.vae:
            raise UserError(f"the built-in {self.data} train in pixel space; drop --vae (or pass --data FOLDER)")
        _choice("lr-schedule", self.lr_schedule, ("constant", "cosine"))
        _choice("compile", self.compile, ("auto", "on", "off"))
        from dits.plan import check_plan_name
        check_plan_name(self.plan)
        if not isinstance(self.grad_checkpoint, bool):
            raise UserError(f"--grad-checkpoint must be true or false, got {self.grad_checkpoint!r}")
        self._validate_objective()
        self.log = ",".join(log_backends(self.log)) or "none"  # one spelling, so --resume compares like with like
        return self

    def _validate_objective(self) -> None:
        from dits.diffusion.guidance import parse_interval
        from dits.objectives import check_sampler, resolve_learn_sigma

        resolve_learn_sigma(self.objective, self.learn_sigma)
        from dits.training_options import parse_loss_weighting, parse_t_sampling
        parse_loss_weighting(self.loss_weighting)
        parse_t_sampling(self.t_sampling, self.objective)
        if self.sampler is not None:
            check_sampler(self.objective, self.sampler)
        parse_interval(self.guidance_interval)
        from dits.models.configs import TEXT_ADALN
        from dits.text.training import check_text_config

        _choice("text-adaln", self.text_adaln, TEXT_ADALN)
        check_text_config(self)
        from dits.masking import check_train_config as check_masking
        from dits.models.blocks import MLPS, NORMS, POSITIONS

        _choice("mlp", self.mlp, MLPS)
        _choice("norm", self.norm, NORMS)
        _choice("pos", self.pos, POSITIONS)
        if self.pos == "rope" and self.backbone == "dit":
            self._check_rope()
        check_masking(self)

    def _check_rope(self) -> None:
        """--pos rope: no in-context block, and a head width divisible by 4 (known before any data)."""
        from dits.models.configs import MODEL_NAMES, SIZES, canonical_name

        if self.block == "in-context":
            raise UserError("--pos rope gives positions to image tokens only; the in-context block's condition "
                            "tokens have none (use another --block, or --pos sincos)")
        name = canonical_name(self.model)
        _, width, heads = SIZES[name[len("DiT-"):].split("/")[0]] if name in MODEL_NAMES else (None, None, None)
        width, heads = self.hidden_size or width, self.num_heads or heads
        if width and heads and (width % heads or (width // heads) % 4):
            raise UserError(f"--pos rope needs a head width (hidden_size / num_heads) divisible by 4, "
                            f"got {width} / {heads}")

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


def _is_builtin(name) -> bool:
    from dits.data.builtin import is_builtin
    return is_builtin(name)


LOG_BACKENDS = ("tensorboard", "wandb")


def log_backends(value) -> tuple[str, ...]:
    """``--log`` as a tuple of backends, in a fixed order: ``"tensorboard,wandb"``, a list of
    names (repeated flags, a YAML list), ``"none"`` or empty (no backend besides metrics.jsonl)."""
    items = value if isinstance(value, (list, tuple)) else str("none" if value is None else value).split(",")
    names = [str(s).strip().lower() for s in items if str(s).strip()]
    for n in names:
        if n not in (*LOG_BACKENDS, "none"):
            raise UserError(f"--log {n!r} is not a logging backend; choose tensorboard, wandb or none "
                            "(repeat --log or separate names with commas)")
    if "none" in names and len(set(names)) > 1:
        raise UserError(f"--log none cannot be combined with {', '.join(n for n in names if n != 'none')}")
    return tuple(b for b in LOG_BACKENDS if b in names)


def _choice(flag: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"--{flag} must be one of {', '.join(map(str, allowed))}; got {value!r}")


# ---------------------------------------------------------------------------- resume
# What `--resume` does with each flag the user typed. CHANGE: applied from the resumed step
# on, recorded in config.yaml and in the resume log line. FIXED: part of the trajectory (the
# model, the data, the batch, the randomness): refused with one line when it differs from the
# checkpoint's. A name TrainConfig does not have (a field another branch adds) is ignored, so
# new fields are classified here first; a TrainConfig field missing here counts as FIXED.
CHANGE, FIXED = "may change", "fixed"
ON_RESUME = {
    # data
    "data": FIXED, "latents": FIXED, "image_size": FIXED, "vae": FIXED, "vae_scale": FIXED, "flip": FIXED,
    # model and objective
    "model": FIXED, "depth": FIXED, "hidden_size": FIXED, "num_heads": FIXED, "patch_size": FIXED,
    "block": FIXED, "learn_sigma": FIXED, "class_dropout_prob": FIXED, "init": FIXED,
    "backbone": FIXED, "unet_channels": FIXED, "unet_layers": FIXED,
    "text_encoder": FIXED, "captions": FIXED, "max_text_tokens": FIXED, "text_adaln": FIXED,
    "diffusion_steps": FIXED, "noise_schedule": FIXED, "objective": FIXED,
    "loss_weighting": FIXED, "t_sampling": FIXED,   # what each step optimises: part of the trajectory
    "mlp": FIXED, "norm": FIXED, "pos": FIXED, "adam_beta2": FIXED,
    "mask_ratio": FIXED, "mask_decoder_depth": FIXED, "mask_loss_weight": FIXED,
    "unmask_steps": CHANGE,  # where the unmasked tail starts, like --steps: applies from the resumed step on
    # optimisation: the batch and the randomness are the trajectory; the update rule may change
    "batch_size": FIXED, "seed": FIXED,
    "steps": CHANGE, "lr": CHANGE, "lr_schedule": CHANGE, "weight_decay": CHANGE, "warmup_steps": CHANGE,
    "grad_clip": CHANGE, "ema_decay": CHANGE, "ema_warmup": CHANGE, "precision": CHANGE, "on_nonfinite": CHANGE,
    "compile": CHANGE, "plan": CHANGE, "grad_checkpoint": CHANGE,
    # bookkeeping, previews, processes
    "out": CHANGE, "log_every": CHANGE, "ckpt_every": CHANGE, "sample_every": CHANGE, "sampler": CHANGE,
    "sample_steps": CHANGE, "cfg_scale": CHANGE, "guidance_interval": CHANGE, "samples_per_class": CHANGE,
    "eval_samples": CHANGE, "num_workers": CHANGE, "device": CHANGE, "fsdp": CHANGE,
    "keep_last": CHANGE, "keep_every": CHANGE,
    "log": CHANGE,  # a backend added on resume starts at the resumed step; one dropped stops there
}


def merge_resume(saved: dict, cfg: TrainConfig, typed, where: str) -> tuple[TrainConfig, dict]:
    """The checkpoint's config with the typed flags applied: ``(config, {key: (old, new)})``.

    ``typed`` is the set of keys the user actually gave (a flag equal to a built-in default
    still counts: that is the point). A typed FIXED key that differs is an error."""
    merged = {**TrainConfig().to_dict(), **saved}
    new = cfg.to_dict()
    changes = {}
    for key in sorted(set(typed) & set(new)):
        if new[key] == merged.get(key):
            continue
        if ON_RESUME.get(key, FIXED) == FIXED:
            raise UserError(f"--resume: --{key.replace('_', '-')} {new[key]!r} differs from the run's "
                            f"{merged.get(key)!r} ({where}); drop the flag, or start a new run with --out")
        changes[key] = (merged.get(key), new[key])
        merged[key] = new[key]
    return TrainConfig.from_dict(merged, where=where).validate(), changes


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
    TrainConfig.from_dict(_without_sections(data), where=str(path))  # validate keys
    for name, section in _sections(data).items():
        TrainConfig.from_dict(section, where=f"{path} ({name}:)")
    return data


def _sections(data: dict) -> dict:
    """The preset's per-objective mappings, e.g. ``flow: {sampler: heun}``."""
    from dits.objectives import OBJECTIVES
    return {k: v for k, v in data.items() if k in OBJECTIVES and isinstance(v, dict)}


def _without_sections(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in _sections(data)}


def resolve_config(preset: str | None = None, overrides: dict | None = None) -> TrainConfig:
    values: dict = {}
    if preset:
        data = load_preset(preset)
        values.update(_without_sections(data))
        objective = (overrides or {}).get("objective") or values.get("objective") or "diffusion"
        values.update(_sections(data).get(objective, {}))
    typed = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(typed)
    from dits.models.registry import resolve_train_values
    values = resolve_train_values(values, typed)  # a preset's DiT size is not a U-Net's; a typed one is refused
    if values.get("vae") and "vae" not in typed and _is_builtin(values.get("data", "digits")) \
            and not values.get("latents"):
        # the preset's VAE, not the user's: say what is really missing
        raise UserError(f"preset {preset} trains in latent space: pass --data IMAGE_FOLDER or --latents CACHE_DIR "
                        "(from dits extract-latents)")
    return TrainConfig.from_dict(values).validate()
