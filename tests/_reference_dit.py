"""An independent adaLN-Zero DiT in the official checkpoint's key layout, for tests.

Written from the paper's equations (Peebles & Xie 2022, sections 3.1-3.2) and the released
checkpoints' parameter names, with no import from dits. It stands in for the official code
where the tests need one: a state dict whose key layout is built here (not by dits' model),
and a forward pass that dits' must reproduce. Everything is plain torch.

Layout of a depth-L model of width D, patch p, C input channels, K classes:

    pos_embed                      (1, T, D)   fixed 2-D sin-cos, first half: column
    x_embedder.proj.{weight,bias}  Conv2d(C, D, p, stride p)
    t_embedder.mlp.0 / .2          Linear(256, D), Linear(D, D)
    y_embedder.embedding_table     (K + 1, D) when labels are dropped for guidance
    blocks.i.attn.qkv / .proj      Linear(D, 3D), Linear(D, D)
    blocks.i.mlp.fc1 / .fc2        Linear(D, 4D), Linear(4D, D)
    blocks.i.adaLN_modulation.1    Linear(D, 6D)
    final_layer.linear             Linear(D, p*p*C_out)
    final_layer.adaLN_modulation.1 Linear(D, 2D)
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sincos_positions(width: int, grid: int) -> torch.Tensor:
    """(grid*grid, width) float64: token (r, c) gets [sin/cos of c | sin/cos of r], each half
    built as [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (width/4))."""
    quarter = width // 4
    w = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = []
    for r in range(grid):
        for c in range(grid):
            col = torch.cat([torch.sin(c * w), torch.cos(c * w)])
            row = torch.cat([torch.sin(r * w), torch.cos(r * w)])
            rows.append(torch.cat([col, row]))
    return torch.stack(rows)


def timestep_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)], f_k = 10000^(-k / (dim/2)), k = 0 .. dim/2 - 1."""
    half = dim // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    a = t.float()[:, None] * f[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = True  # the attribute the official (timm) attention has; both paths are the same math

    def forward(self, x):
        n, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(n, t, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        u = self.fc1(x)
        u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        return self.fc2(u)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = _Attention(dim, heads)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, g1, a1, s2, g2, a2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + a1 * self.attn(_layer_norm(x) * (1 + g1) + s1)
        return x + a2 * self.mlp(_layer_norm(x) * (1 + g2) + s2)


class _Final(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(_layer_norm(x) * (1 + scale) + shift)


class _Patches(nn.Module):
    def __init__(self, c: int, dim: int, p: int):
        super().__init__()
        self.proj = nn.Conv2d(c, dim, p, stride=p)


class _Labels(nn.Module):
    def __init__(self, k: int, dim: int, null_row: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(k + int(null_row), dim)


class _Timesteps(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))


class DiT(nn.Module):
    """The official constructor's arguments; ``forward(x, t, y)`` and ``forward_with_cfg``."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__()
        self.p, self.c_in = patch_size, in_channels
        self.c_out = 2 * in_channels if learn_sigma else in_channels
        self.grid = input_size // patch_size
        self.x_embedder = _Patches(in_channels, hidden_size, patch_size)
        self.t_embedder = _Timesteps(hidden_size)
        self.y_embedder = _Labels(num_classes, hidden_size, class_dropout_prob > 0)
        self.pos_embed = nn.Parameter(sincos_positions(hidden_size, self.grid).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList(_Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = _Final(hidden_size, patch_size * patch_size * self.c_out)

    def forward(self, x, t, y):
        n = x.shape[0]
        tok = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder.mlp(timestep_features(t).to(tok.dtype)) + self.y_embedder.embedding_table(y)
        for blk in self.blocks:
            tok = blk(tok, c)
        out = self.final_layer(tok, c)                               # (N, T, p*p*C_out)
        g, p = self.grid, self.p
        out = out.reshape(n, g, g, p, p, self.c_out)                 # token (r, c), pixel (i, j), channel
        return out.permute(0, 5, 1, 3, 2, 4).reshape(n, self.c_out, g * p, g * p)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """The official sampling forward: the first half of the batch duplicated, the first three
        channels guided, eps_u + s (eps_c - eps_u); the rest passed through."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def randomised(model: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Every trainable weight drawn afresh (so no zero-initialised layer hides a mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model
