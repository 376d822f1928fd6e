"""Model configurations as plain data.

``DiTConfig`` fully describes a network; the twelve names of the paper (``DiT-S/2`` ...
``DiT-XL/8``) are a size (depth, width, heads) times a patch size. ``"DiT"`` with explicit
``depth``/``hidden_size``/``num_heads``/``patch_size`` gives any custom size.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from dits.errors import UserError
from dits.models.blocks import BLOCK_TYPES, MLPS, NORMS, POSITIONS

# How text reaches adaLN / adaLN-Zero blocks (docs/text.md): "pooled" adds the pooled caption
# vector to c (as a class embedding is), "cross-attn" is PixArt-alpha's block (adaLN on t only,
# cross-attention to the caption tokens), "both" does the two.
TEXT_ADALN = ("pooled", "cross-attn", "both")
# The text fields of DiTConfig: left out of ``to_dict`` when there is no text, so the config
# (and every checkpoint) of a class-conditional model is exactly what it was before text.
TEXT_FIELDS = ("text_encoder", "text_dim", "text_tokens", "text_vocab", "text_depth", "text_adaln")
# The block options of issue 21 and masked training's decoder: each left out of ``to_dict`` while it
# has its default (the paper's DiT), so such a config and its checkpoints are exactly what they were.
OPTION_DEFAULTS = {"mlp": "gelu", "norm": "layernorm", "pos": "sincos", "decoder_depth": 0}

# size -> (depth, hidden_size, num_heads), Table 1 of the paper
SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
MODEL_NAMES = tuple(f"DiT-{s}/{p}" for s in SIZES for p in PATCH_SIZES)


@dataclass
class DiTConfig:
    input_size: int = 32          # latent (or pixel) side length I
    patch_size: int = 2           # p: T = (I/p)^2 tokens
    in_channels: int = 4          # C
    hidden_size: int = 1152       # D
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000       # 0 = unconditional
    learn_sigma: bool = True      # output 2C channels: eps and the variance interpolation v
    block: str = "adaln-zero"     # one of BLOCK_TYPES
    # ---- text conditioning (dits.text, docs/text.md); text_encoder None: labels as above
    text_encoder: str | None = None  # "learned" (trained with the DiT) or the frozen CLIP/T5 (Hub id or dir)
    text_dim: int = 0             # width of the caption features the model takes (learned: the encoder's)
    text_tokens: int = 0          # the most caption tokens it was built for
    text_vocab: list | None = None  # the learned encoder's words (plain data)
    text_depth: int = 2           # layers of the learned encoder
    text_adaln: str = "both"      # adaLN(-Zero) blocks with text: pooled | cross-attn | both
    # ---- modern block options (docs/convergence.md; defaults: the paper's DiT)
    mlp: str = "gelu"             # gelu (tanh-GELU MLP, ratio 4) | swiglu (SwiGLU of about the same size)
    norm: str = "layernorm"       # layernorm | rmsnorm (every norm; same eps 1e-6, same affine flags)
    pos: str = "sincos"           # sincos (fixed additive pos_embed) | rope (2-D RoPE on q, k; no pos_embed)
    decoder_depth: int = 0        # masked training (MaskDiT): blocks of the decoder after the encoder; 0 = none

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.block not in BLOCK_TYPES:
            raise UserError(f"unknown block design {self.block!r}; choose one of {', '.join(BLOCK_TYPES)}")
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.input_size % self.patch_size:
            raise UserError(
                f"input size {self.input_size} is not divisible by patch size {self.patch_size}; "
                f"use an input size that is a multiple of {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise UserError(f"hidden_size must be a multiple of 4 (2-D sin-cos positions), got {self.hidden_size}")
        if self.num_classes < 0:
            raise UserError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise UserError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.text_encoder is not None:
            self._validate_text()
        self._validate_options()

    def _validate_options(self) -> None:
        for name, allowed in (("mlp", MLPS), ("norm", NORMS), ("pos", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.pos == "rope":
            if self.block == "in-context":
                raise UserError("--pos rope gives positions to image tokens only; the in-context block's "
                                "condition tokens have none (use another --block, or --pos sincos)")
            head = self.hidden_size // self.num_heads
            if head % 4:
                raise UserError(f"--pos rope needs a head width (hidden_size / num_heads) divisible by 4, "
                                f"got {self.hidden_size} / {self.num_heads} = {head}")
        if isinstance(self.decoder_depth, bool) or int(self.decoder_depth) != self.decoder_depth \
                or self.decoder_depth < 0:
            raise UserError(f"decoder_depth must be an integer >= 0, got {self.decoder_depth!r}")
        self.decoder_depth = int(self.decoder_depth)
        if self.decoder_depth and self.block == "in-context":
            raise UserError("masked training does not support the in-context block (its condition tokens sit in "
                            "the sequence); use --block adaln-zero, adaln or cross-attn")

    def _validate_text(self) -> None:
        if self.num_classes:
            raise UserError("a model is conditioned on class labels or on text, not both: "
                            "use num_classes=0 with a text encoder")
        if int(self.text_dim) < 1 or int(self.text_tokens) < 1:
            raise UserError(f"a text model needs text_dim >= 1 and text_tokens >= 1, got {self.text_dim} and "
                            f"{self.text_tokens}")
        if self.text_adaln not in TEXT_ADALN:
            raise UserError(f"text_adaln must be one of {', '.join(TEXT_ADALN)}, got {self.text_adaln!r}")
        if self.text_encoder == "learned":
            if not isinstance(self.text_vocab, (list, tuple)):
                raise UserError("the learned text encoder needs its vocabulary (text_vocab, a list of words)")
            if int(self.text_depth) < 1:
                raise UserError(f"text_depth must be >= 1, got {self.text_depth}")
            self.text_vocab = [str(w) for w in self.text_vocab]

    @property
    def text(self) -> bool:
        """Whether the model is conditioned on text."""
        return self.text_encoder is not None
    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.text_encoder is None:
            for k in TEXT_FIELDS:
                d.pop(k)
        for k, default in OPTION_DEFAULTS.items():
            if d[k] == default:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise UserError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


def canonical_name(name: str) -> str:
    """'DiT-XL/2', 'DiT-XL-2', 'dit_xl_2' -> 'DiT-XL/2'; 'DiT' (custom) stays."""
    m = re.fullmatch(r"(?i)dit[-_/]?(s|b|l|xl)[-_/](\d+)", name.strip())
    if m:
        return f"DiT-{m.group(1).upper()}/{m.group(2)}"
    if name.strip().lower() in ("dit", "custom"):
        return "DiT"
    return name


def config_for(name: str, **overrides) -> DiTConfig:
    """The config of a named model, with field overrides."""
    cname = canonical_name(name)
    base: dict = {}
    if cname != "DiT":
        if cname not in MODEL_NAMES:
            raise UserError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}, "
                            "or 'DiT' with depth/hidden_size/num_heads/patch_size")
        size, patch = cname[len("DiT-"):].split("/")
        depth, hidden, heads = SIZES[size]
        base = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise UserError(f"unknown model option(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(fields))}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return DiTConfig(**base)
