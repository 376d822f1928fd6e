"""A U-Net denoiser: diffusers' ``UNet2DModel`` behind the trainer's denoiser interface.

The DiT paper sets its transformers against U-Nets (ADM, LDM). This is the second backbone of
dits (``dits train --backbone unet``), built ADM's way from diffusers' parts:

* ``channels`` (c_0, c_1, ...) gives one resolution level per entry: the first at the input
  resolution, each next one downsampled 2x by a strided 3x3 convolution (and upsampled back by
  nearest-neighbour plus a convolution on the way up); ``layers`` residual blocks per level on the
  way down, ``layers + 1`` on the way up (each taking a skip connection), a middle block of two
  residual blocks around one self-attention;
* self-attention at every level below the input resolution (ADM: "attention at low resolution";
  the first level has none), heads of ``head_dim`` channels (8, the width of the study's DiT heads);
* residual blocks with GroupNorm and SiLU, conditioned by ADM's scale-shift norm (the time and
  class embedding regresses a scale and a shift of the second norm: diffusers'
  ``resnet_time_scale_shift="scale_shift"``, the counterpart of DiT's adaLN);
* the timestep as diffusers' sinusoidal embedding (``c_0`` features) and a 2-layer MLP to
  ``4 c_0`` (ADM's ``time_embed_dim``); the class through ``num_class_embeds``: an
  ``nn.Embedding`` added to it. diffusers has no null class, so the table gets one more row,
  ``num_classes``, the label classifier-free guidance runs as its unconditional half (as DiT's
  ``LabelEmbedder``); during training labels drop to it with ``class_dropout_prob``;
* learned variance as DiT has it: ``2 C`` output channels (epsilon, then the interpolation v);
* ADM's zero initialisation: the output convolution, the second convolution of every residual
  block and every attention output projection start at zero, so every block starts as the
  identity and the untrained network predicts exactly 0 (as DiT's zero-initialised final layer).

The wrapper has what the trainer, the samplers and the checkpoints ask of a denoiser:
``forward(x, t, y=None, force_drop_ids=None)`` with t on the 0..T-1 scale, ``forward_with_cfg``,
``config`` (a :class:`UNetConfig` whose ``to_dict`` round-trips through checkpoints and names its
``backbone``), ``in_channels``, ``out_channels``, ``input_size``, ``num_classes``, ``learn_sigma``
and ``grad_checkpoint``. It has no ``blocks``: the run's plan (dits.plan) then never compiles
"each transformer block", only the whole model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from dits.errors import UserError
from dits.models.conditioning import check_class_labels

BACKBONE = "unet"
DEFAULT_CHANNELS = (64, 128, 128)
DEFAULT_LAYERS = 2
MAX_GROUPS = 32            # ADM's GroupNorm(32)
MIN_GROUP_WIDTH = 4        # narrow U-Nets: fewer groups, never fewer than 4 channels in one


def parse_channels(value) -> tuple[int, ...]:
    """``"32,64"``, ``[32, 64]`` or ``32`` -> (32, 64); one line for anything else."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            out = tuple(int(p) for p in parts)
        except ValueError:
            raise UserError(f"--unet-channels must be comma-separated positive integers (one per level, e.g. "
                            f"32,64), got {value!r}") from None
    elif isinstance(value, int):
        out = (value,)
    else:
        try:
            out = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise UserError(f"U-Net channels must be a list of positive integers, got {value!r}") from None
    if not out or any(c < 1 for c in out):
        raise UserError(f"--unet-channels must be positive integers, one per level (e.g. 32,64), got {value!r}")
    return out


def default_groups(channels: tuple[int, ...]) -> int:
    """GroupNorm groups: the most (up to ADM's 32) that divide every level's width while keeping
    at least 4 channels per group in the narrowest level (1 for widths under 8)."""
    g = math.gcd(*channels)
    ok = [d for d in range(1, MAX_GROUPS + 1) if g % d == 0 and min(channels) // d >= MIN_GROUP_WIDTH]
    return max(ok) if ok else 1


@dataclass
class UNetConfig:
    input_size: int = 32              # image (or latent) side
    in_channels: int = 4
    channels: tuple = DEFAULT_CHANNELS  # width of each level, input resolution first
    layers: int = DEFAULT_LAYERS      # residual blocks per level (down; up has one more)
    num_classes: int = 1000           # 0 = unconditional
    learn_sigma: bool = True          # 2 C output channels: epsilon and the variance interpolation v
    class_dropout_prob: float = 0.1
    head_dim: int = 8                 # channels per attention head
    norm_groups: int | None = None    # GroupNorm groups; None: default_groups(channels)

    def __post_init__(self):
        self.channels = parse_channels(self.channels)
        if self.norm_groups is None:
            self.norm_groups = default_groups(self.channels)
        self.validate()

    backbone = BACKBONE
    text = False                      # class labels only (text conditioning is DiT's)

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def downsampling(self) -> int:
        return 2 ** (self.levels - 1)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def validate(self) -> None:
        for name in ("input_size", "in_channels", "layers", "head_dim", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"U-Net {name} must be a positive integer, got {getattr(self, name)}")
        if self.input_size % self.downsampling:
            raise UserError(
                f"a U-Net with {self.levels} levels (--unet-channels {','.join(map(str, self.channels))}) "
                f"downsamples by {self.downsampling}, which does not divide the image size {self.input_size}; "
                f"use fewer levels or an image size that is a multiple of {self.downsampling}")
        attn = sorted({*self.channels[1:], self.channels[-1]})  # levels with attention, and the middle block
        bad = [c for c in attn if c % self.head_dim]
        if bad:
            raise UserError(f"U-Net levels with attention need widths that are multiples of the head width "
                            f"{self.head_dim}; got {', '.join(map(str, bad))} (--unet-channels "
                            f"{','.join(map(str, self.channels))})")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise UserError(f"U-Net widths {', '.join(map(str, bad))} are not divisible by {self.norm_groups} "
                            "GroupNorm groups")
        if self.num_classes < 0:
            raise UserError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise UserError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)  # plain data in a checkpoint
        return {"backbone": BACKBONE, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = {k: v for k, v in d.items() if k != "backbone"}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise UserError(f"unknown U-Net config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def describe(self) -> str:
        return f"U-Net {','.join(map(str, self.channels))} x {self.layers}"


def build_unet2d(cfg: UNetConfig):
    """The diffusers ``UNet2DModel`` that ``cfg`` describes (no dits parts)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:  # pragma: no cover - diffusers is a dependency
        raise UserError("the U-Net backbone needs diffusers: pip install diffusers") from None
    n = cfg.levels
    return UNet2DModel(
        sample_size=cfg.input_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1),
        up_block_types=("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        norm_num_groups=cfg.norm_groups, attention_head_dim=cfg.head_dim,
        resnet_time_scale_shift="scale_shift", dropout=0.0,
        num_class_embeds=(cfg.num_classes + int(cfg.class_dropout_prob > 0)) if cfg.num_classes > 0 else None)


class UNet(nn.Module):
    """Noised image (N, C, I, I), timestep t (0..T-1 scale), label y -> (N, C_out, I, I)."""

    def __init__(self, config: UNetConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a UNetConfig or keyword arguments, not both")
        self.config = cfg = config
        self.in_channels, self.out_channels = cfg.in_channels, cfg.out_channels
        self.input_size, self.num_classes = cfg.input_size, cfg.num_classes
        self.learn_sigma = cfg.learn_sigma
        self.unet = build_unet2d(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """diffusers' initialisation, then ADM's zeros (see the module docstring)."""
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D

        for m in self.unet.modules():
            if isinstance(m, ResnetBlock2D):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
            elif isinstance(m, Attention):
                nn.init.zeros_(m.to_out[0].weight)
                nn.init.zeros_(m.to_out[0].bias)
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)

    # the trainer's speed switches (dits.speed / dits.plan) ask for these
    @property
    def grad_checkpoint(self) -> bool:
        return bool(getattr(self.unet, "gradient_checkpointing", False))

    @grad_checkpoint.setter
    def grad_checkpoint(self, on: bool) -> None:
        if on:
            self.unet.enable_gradient_checkpointing()
        elif self.grad_checkpoint:
            self.unet.disable_gradient_checkpointing()

    def _labels(self, x: torch.Tensor, y, force_drop_ids):
        if self.num_classes == 0:
            if y is not None:
                raise UserError("this U-Net is unconditional: do not pass labels y")
            return None
        check_class_labels(y, x.shape[0], self.num_classes, self.config.class_dropout_prob, what="U-Net")
        drop = None
        if force_drop_ids is not None:
            drop = force_drop_ids.to(device=y.device, dtype=torch.bool)
        elif self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.config.class_dropout_prob
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return y.long()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``force_drop_ids`` (bool, N): labels to replace by the null label, instead of the random
        draw of training (the trainer draws it from its seeded generator)."""
        i, c = self.input_size, self.in_channels
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, i, i):
            raise UserError(f"expected input of shape (N, {c}, {i}, {i}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise UserError(f"expected timesteps of shape ({x.shape[0]},), got {tuple(t.shape)}")
        labels = self._labels(x, y, force_drop_ids)
        return self.unet(x, t, class_labels=labels, return_dict=False)[0]

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance in one pass over [conditional; null] halves, as DiT's."""
        from dits.diffusion.guidance import combine_guided

        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        return combine_guided(out, cfg_scale, self.in_channels, guided_channels)


def create_unet(channels=DEFAULT_CHANNELS, layers: int = DEFAULT_LAYERS, **overrides) -> UNet:
    """``create_unet((32, 64), 2, input_size=16, in_channels=1, num_classes=10)``."""
    return UNet(UNetConfig(channels=channels, layers=layers, **overrides))
