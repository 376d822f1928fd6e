"""Input embeddings of DiT: patches, fixed 2-D sin-cos positions, timesteps, labels."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


# --------------------------------------------------------------------------------------
# Fixed sine-cosine position embedding (the MAE / ViT recipe)
# --------------------------------------------------------------------------------------
def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k/(dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, dim) embedding of a square grid of tokens in row-major order.

    Half the channels encode one coordinate, half the other. As in the reference (which
    builds the grid with ``np.meshgrid(w, h)``), the *first* half encodes the column and
    the second half the row; we keep that order so the values equal the reference's
    ``pos_embed`` exactly.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


# --------------------------------------------------------------------------------------
# Patchify
# --------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """A p x p convolution with stride p: image (N, C, I, I) -> tokens (N, (I/p)^2, D)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Made contiguous here, once: the (N, D, T) -> (N, T, D) transpose is otherwise a strided view,
        # and every residual add downstream inherits its token-minor layout, so each LayerNorm, gated
        # residual and their gradients in every block read and write across strides (4 % of the
        # compiled DiT-S/2 bf16 step; docs/performance.md). Same values, rows in token order.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------
# Timestep embedding
# --------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (N,) -> (N, dim), float32.

    Frequencies f_k = max_period^(-k/half), k = 0..half-1; the first half holds cos(t f_k),
    the second half sin(t f_k) (the reference order; note the exponent divides by
    ``half``, not ``half - 1`` as diffusers' default ``downscale_freq_shift=1`` does).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t -> sinusoid(256) -> Linear -> SiLU -> Linear: the timestep token of width D."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector, with the extra "null" row used by classifier-free guidance.

    The table has ``num_classes + 1`` rows when label dropout is on; the null label is
    ``num_classes``. During training each label is replaced by the null label with
    probability ``dropout_prob``, which teaches the same network the unconditional model.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``force_drop_ids`` (bool, N) replaces the random draw: the trainer draws the mask
        from its own seeded generator so a run is reproducible across resumes and ranks."""
        if force_drop_ids is not None:
            drop = force_drop_ids.to(device=labels.device, dtype=torch.bool)
        elif train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            return self.embedding_table(labels)
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)

    # the conditioning interface (dits.models.conditioning): class labels are one kind of condition
    kind = "class"

    def null_like(self, labels: torch.Tensor) -> torch.Tensor:
        """The null condition for a batch of labels: the extra row, ``num_classes``."""
        return torch.full_like(labels, self.num_classes)

    def embed(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        """``Embedded(vector, tokens, mask)``: the label's row as the vector and as a one-token sequence."""
        from dits.models.conditioning import Embedded

        v = self(labels, train, force_drop_ids)
        return Embedded(v, v[:, None], None)


# --------------------------------------------------------------------------------------
# 2-D rotary position embedding (--pos rope)
# --------------------------------------------------------------------------------------
ROPE_BASE = 10000.0  # the frequencies of the sin-cos table above (and of RoFormer / EVA's 2-D RoPE)


def rope_2d(head_dim: int, grid_size: int, base: float = ROPE_BASE, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (1, T, 2, head_dim/4) float32, for the T = grid_size² tokens in row-major order.

    Axis 0 is the token's row, axis 1 its column; frequency k of each is base^(-k / (head_dim/4)).
    :func:`apply_rope` rotates the first half of each head's channels by the row angles and the
    second half by the column angles, so q·k after rotation depends on the two tokens' offset
    (Δrow, Δcol) only.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    idx = torch.arange(grid_size * grid_size, device=device)
    rows, cols = (idx // grid_size).double(), (idx % grid_size).double()
    angles = torch.stack([rows[:, None] * freqs, cols[:, None] * freqs], dim=1).float()  # (T, 2, quarter)
    return angles.cos()[None], angles.sin()[None]


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate queries or keys (N, H, T, d) by ``rope`` = (cos, sin) of shape (1 or N, T, 2, d/4).

    Per axis the d/2 channels form d/4 pairs (channel j with channel j + d/4, the "rotate-half"
    layout), each pair turned by its angle: a norm-preserving rotation. Computed in float32,
    returned in ``x``'s dtype."""
    cos, sin = (r[:, None, :, :, None, :] for r in rope)        # (B, 1, T, 2, 1, d/4)
    n, h, t, d = x.shape
    xf = x.float().reshape(n, h, t, 2, 2, d // 4)                # (.., axis, half, freq)
    x1, x2 = xf[..., :1, :], xf[..., 1:, :]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-2)
    return out.reshape(n, h, t, d).to(x.dtype)
