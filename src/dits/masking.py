"""Masked training (MaskDiT, Zheng et al. 2023, arXiv 2306.09305): ``--mask-ratio R``.

In a masked step the encoder (the DiT's ``blocks``) sees a random (1 − R) of the patch tokens of each
image, int(T (1 − R)) of them, the same count for every image; a small decoder (``decoder_blocks``,
``--mask-decoder-depth`` K blocks of the same design and width) gets the encoder's tokens back at
their positions, a learned mask token at the dropped ones, the fixed positions again, and runs over
the full sequence before the final layer. The model's output is full size, so the objectives keep
their shapes; the loss is split by a token mask:

* the denoising loss (L_simple, ε or velocity MSE; and the learned-variance VLB term) is the mean over
  the **visible** tokens' pixels only: the masked tokens' noise was never seen, so their ε is not
  predictable and is not asked for;
* plus ``--mask-loss-weight`` W (0.1, MaskDiT's λ) times MaskDiT's MAE term on the **masked** tokens:
  the model's first C output channels at a dropped patch reconstruct that patch of the model's noisy
  input x_t, normalised per patch (its p·p·C values minus their mean, over √(var + 1e-6), MAE's
  ``norm_pix_loss``), mean squared error over the masked patches. Logged as ``mae``.

The last ``--unmask-steps`` N steps train with R = 0 (MaskDiT's unmasked fine-tune; it also halves the
lr there, which ``--lr-schedule`` does not do for you). Sampling never masks: every token goes
through encoder and decoder. Which tokens are kept is drawn from the step's generator (after t,
label dropout and noise), so a masked run resumes exactly and DDP ranks agree.

Off (R = 0 and no ``--mask-decoder-depth``) the model has no decoder and the step is today's, bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dits.errors import UserError

DEFAULT_DECODER_DEPTH = 2   # small models (MaskDiT uses 8 for XL/2)
DEFAULT_LOSS_WEIGHT = 0.1   # MaskDiT's λ on the MAE term


def check_mask_ratio(ratio) -> float:
    r = float(ratio)
    if not (0.0 <= r < 1.0):
        raise UserError(f"--mask-ratio must be in [0, 1) (the fraction of patch tokens dropped), got {ratio}")
    return r


def kept_tokens(num_tokens: int, ratio: float) -> int:
    """How many of ``num_tokens`` the encoder sees at mask ratio R: int(T (1 − R)), at least one."""
    return max(1, int(num_tokens * (1.0 - float(ratio))))


def with_decoder(options: dict, ratio) -> dict:
    """Model options for counting a model trained with ``--mask-ratio`` (``dits flops``): R checked,
    and the default decoder added when R > 0 and none is given, as the trainer builds it."""
    options = dict(options)
    if ratio is not None and check_mask_ratio(ratio) > 0 and not options.get("decoder_depth"):
        options["decoder_depth"] = DEFAULT_DECODER_DEPTH
    return options


def decoder_depth(cfg) -> int:
    """The decoder a run's model gets: ``--mask-decoder-depth``, default 2 with masking, none without."""
    if cfg.mask_decoder_depth is not None:
        return int(cfg.mask_decoder_depth)
    return DEFAULT_DECODER_DEPTH if cfg.mask_ratio > 0 else 0


def check_train_config(cfg) -> None:
    """The masking flags of a TrainConfig (one line each; called by ``TrainConfig.validate``)."""
    r = check_mask_ratio(cfg.mask_ratio)
    if cfg.mask_decoder_depth is not None and int(cfg.mask_decoder_depth) < 1:
        raise UserError(f"--mask-decoder-depth must be >= 1, got {cfg.mask_decoder_depth}")
    w = float(cfg.mask_loss_weight)
    if not (w >= 0 and math.isfinite(w)):
        raise UserError(f"--mask-loss-weight must be a finite number >= 0, got {cfg.mask_loss_weight}")
    if int(cfg.unmask_steps) < 0:
        raise UserError(f"--unmask-steps must be >= 0, got {cfg.unmask_steps}")
    if cfg.unmask_steps > cfg.steps:
        raise UserError(f"--unmask-steps {cfg.unmask_steps} is more than the run's --steps {cfg.steps}")
    if r == 0:  # (--unmask-steps alone does nothing: it may be typed on --resume, before the run's R is known)
        return
    if cfg.block == "in-context":
        raise UserError("--mask-ratio does not support --block in-context (its condition tokens sit in the "
                        "sequence); use adaln-zero, adaln or cross-attn")
    if cfg.text_encoder is not None:
        raise UserError("--mask-ratio trains class-conditional or unconditional models; drop it for a text run")


@dataclass(frozen=True)
class Masking:
    """One run's masking: ``draw`` the kept tokens of a step, ``token_mask`` for the loss."""
    ratio: float
    loss_weight: float
    num_tokens: int                 # T of the model
    patch_size: int
    steps: int                      # the run's --steps
    unmask_steps: int = 0

    @classmethod
    def for_run(cls, cfg, model_config) -> "Masking | None":
        if not cfg.mask_ratio:
            return None
        return cls(float(cfg.mask_ratio), float(cfg.mask_loss_weight), model_config.num_tokens,
                   model_config.patch_size, int(cfg.steps), int(cfg.unmask_steps))

    @property
    def kept(self) -> int:
        return kept_tokens(self.num_tokens, self.ratio)

    def active(self, step: int) -> bool:
        """Masked at ``step`` (0-based): all but the last ``unmask_steps`` steps."""
        return self.ratio > 0 and step < self.steps - self.unmask_steps

    def draw(self, step: int, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """(n, kept) token indices, increasing along each row (a uniform random subset per image),
        from ``generator``; None when the step is unmasked (nothing is drawn then)."""
        if not self.active(step):
            return None
        return draw_keep(n, self.num_tokens, self.kept, generator)

    def token_mask(self, keep: torch.Tensor, x: torch.Tensor) -> "TokenMask":
        return TokenMask(keep.to(x.device), self.num_tokens, self.patch_size, x.shape[1])


def draw_keep(n: int, num_tokens: int, kept: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random subset of ``kept`` of ``num_tokens`` positions per row, in increasing order:
    the first ``kept`` of a random permutation (argsort of uniform noise), sorted."""
    noise = torch.rand(n, num_tokens, generator=generator)
    return noise.argsort(dim=1)[:, :kept].sort(dim=1).values


class TokenMask:
    """Which tokens of a batch were dropped, and the loss terms that depend on it."""

    def __init__(self, keep: torch.Tensor, num_tokens: int, patch_size: int, channels: int):
        self.keep, self.patch, self.channels = keep, patch_size, channels
        n = keep.shape[0]
        vis = torch.zeros(n, num_tokens, dtype=torch.bool, device=keep.device)
        self.tokens = vis.scatter(1, keep, True)                 # (N, T): True = seen by the encoder
        grid = int(round(num_tokens ** 0.5))
        pix = self.tokens.reshape(n, 1, grid, grid)
        self.visible = pix.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)  # (N, 1, H, W)

    def mean_visible(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample mean of ``values`` (N, C, H, W) over the visible pixels (all channels)."""
        vis = self.visible.to(values.dtype)
        count = vis.sum(dim=(1, 2, 3)) * values.shape[1]
        return (values * vis).sum(dim=tuple(range(1, values.dim()))) / count

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, T, p*p*C), tokens in row-major order (the model's order)."""
        n, c, h, _ = x.shape
        p, g = self.patch, h // self.patch
        return x.reshape(n, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, p * p * c)

    def mae(self, x_t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """MaskDiT's reconstruction term per sample: the prediction's patches at the dropped tokens
        against the same patches of the noisy input, normalised per patch; 0 for a row with none dropped."""
        target = self._patches(x_t.float())
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, correction=0, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        err = ((self._patches(pred.float()) - target) ** 2).mean(dim=-1)  # (N, T)
        dropped = (~self.tokens).to(err.dtype)
        return (err * dropped).sum(dim=1) / dropped.sum(dim=1).clamp(min=1)

    def extra_terms(self, x_t: torch.Tensor, pred: torch.Tensor) -> dict:
        return {"mae": self.mae(x_t, pred[:, : self.channels])}
