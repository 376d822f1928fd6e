"""Transformer blocks of DiT: the four conditioning designs the paper compares (Fig. 3).

All blocks are pre-norm (LayerNorm eps 1e-6), MLP ratio 4 with tanh-GELU, qkv with bias,
and take ``(x, c, cond_tokens, cond_mask)``: image tokens (N, T, D), the conditioning vector
c = t_emb + y_emb (N, D), the conditioning as a token sequence (N, S, D) holding the
timestep and label embeddings (used by cross-attention and in-context conditioning), and
a key-padding mask (N, S) or None (all tokens real).

With text (``dits.models.conditioning``) the sequence holds the caption's tokens and the mask
marks its padding; for in-context blocks, whose condition tokens sit inside ``x``, the mask
covers all of ``x``. The blocks never see where tokens came from: a class label, a learned text
encoder or a frozen CLIP/T5 are the same (sequence, mask) to them.

Modern options (LightningDiT, arXiv 2501.01423, Table 1; each off by default, and off is the paper's
block exactly): ``mlp="swiglu"`` (:class:`SwiGLU` instead of the GELU MLP), ``norm="rmsnorm"``
(every LayerNorm an RMSNorm with the same affine flag and eps) and, from the model, ``rope``: the
(cos, sin) tables of a 2-D rotary position embedding applied to self-attention's q and k.
"""
from __future__ import annotations

import torch
from torch import nn

from dits.models.embeddings import apply_rope
from dits.speed import attention, linear, masked_attention

BLOCK_TYPES = ("adaln-zero", "adaln", "cross-attn", "in-context")
MLPS = ("gelu", "swiglu")            # --mlp: the paper's tanh-GELU MLP | SwiGLU
NORMS = ("layernorm", "rmsnorm")     # --norm
POSITIONS = ("sincos", "rope")       # --pos: the paper's fixed additive sin-cos table | 2-D RoPE on q, k


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive LayerNorm parameters applied per sample: x * (1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) computed by :func:`dits.speed.linear`:
    F.linear, or oneDNN's fused kernel for CPU inference. ``gelu=True`` returns the tanh-GELU of
    the output, fused into the matmul where the kernel allows."""

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        return linear(x, self.weight, self.bias, gelu)


class Attention(nn.Module):
    """Multi-head self-attention, parameter layout of timm's ``Attention`` (qkv, proj)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, bias=True)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        n, t, d = x.shape
        # (N, T, 3, H, d/H) -> three (N, H, T, d/H): the order of the reference's weights. unbind, not
        # tuple-unpacking: its gradient is one stack of dq, dk, dv (unpacking traces three selects, whose
        # summed gradients the compiler writes as a blend reading all three for each of q, k and v).
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:  # --pos rope: rotate q and k by each token's (row, column) angles
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if key_mask is None:
            x = attention(q, k, v)  # SDPA or explicit matmuls, by device/dtype/length (dits.speed)
        else:
            x = masked_attention(q, k, v, key_mask)  # padded keys get zero weight
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the conditioning tokens (keys and values)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, dim, bias=True)
        self.kv = Linear(dim, dim * 2, bias=True)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(n, t, h, d // h).transpose(1, 2)
        k, v = self.kv(context).reshape(n, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        x = attention(q, k, v) if key_mask is None else masked_attention(q, k, v, key_mask)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, parameter layout of timm's ``Mlp``."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fc2(GELU_tanh(fc1(x))), with the GELU inside fc1's kernel where it can be fused
        return self.fc2(self.fc1(x, gelu=True))


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLU's hidden width: 2/3 of the GELU MLP's (three matrices instead of two, so about the
    same parameters and MACs), rounded up to a multiple of 8 (LLaMA's rule). D = 384: 1024, exactly
    the GELU MLP's 2 x 384 x 1536 weights; D = 1152: 3072."""
    h = int(2 * int(dim * mlp_ratio) / 3)
    return 8 * -(-h // 8)


class SwiGLU(nn.Module):
    """w3(SiLU(w1 x) * w2 x) (Shazeer 2020): w1 the gate, w2 the value, w3 the output; biases
    like the GELU MLP's Linears; width :func:`swiglu_hidden`."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = swiglu_hidden(dim, mlp_ratio)
        self.w1 = Linear(dim, hidden)
        self.w2 = Linear(dim, hidden)
        self.w3 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(torch.nn.functional.silu(self.w1(x)) * self.w2(x))


def make_mlp(dim: int, mlp_ratio: float = 4.0, kind: str = "gelu") -> nn.Module:
    if kind not in MLPS:
        raise ValueError(f"mlp must be one of {', '.join(MLPS)}, got {kind!r}")
    return SwiGLU(dim, mlp_ratio) if kind == "swiglu" else Mlp(dim, mlp_ratio)


def _norm(dim: int, affine: bool, kind: str = "layernorm") -> nn.Module:
    """The paper's LayerNorm (eps 1e-6), or with ``kind="rmsnorm"`` an RMSNorm with the same eps and
    the same affine flag."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=affine)
    if kind != "layernorm":
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)


class AdaLNZeroBlock(nn.Module):
    """adaLN-Zero, the paper's choice: c regresses shift, scale *and a gate* per branch.

    The modulation Linear is zero-initialised (see ``DiT.initialize_weights``), so every gate
    starts at 0 and every block starts as the identity function: the network begins as a
    (learned) linear map of its input and adds depth gradually, which is what made this
    design train best in the paper.
    """

    modulations = 6  # shift, scale, gate for attention and for the MLP

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, text_cross_attn: bool = False,
                 mlp: str = "gelu", norm: str = "layernorm"):
        super().__init__()
        self.norm1 = _norm(dim, affine=False, kind=norm)
        self.attn = Attention(dim, num_heads)
        self.norm2 = _norm(dim, affine=False, kind=norm)
        self.mlp = make_mlp(dim, mlp_ratio, mlp)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, self.modulations * dim, bias=True))
        # Text only (PixArt-alpha's block): cross-attention to the caption tokens between
        # self-attention and the MLP, without norm or gate, output projection zero-initialised
        # (DiT.initialize_weights), so the block starts as the class-free adaLN block.
        self.cross_attn = CrossAttention(dim, num_heads) if text_cross_attn else None

    def _cross(self, x, cond_tokens, cond_mask):
        if self.cross_attn is None:
            return x
        return x + self.cross_attn(x, cond_tokens, cond_mask)

    def forward(self, x, c, cond_tokens=None, cond_mask=None, rope=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        x = self._cross(x, cond_tokens, cond_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class AdaLNBlock(AdaLNZeroBlock):
    """adaLN: c regresses the LayerNorms' shift and scale; no gate, plain residuals.

    The modulation Linear is zero-initialised, so each block starts as a standard pre-norm
    block with unit scale and zero shift (not as the identity: there is no gate).
    """

    modulations = 4  # shift and scale for attention and for the MLP

    def forward(self, x, c, cond_tokens=None, cond_mask=None, rope=None):
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        x = self._cross(x, cond_tokens, cond_mask)
        x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class InContextBlock(nn.Module):
    """In-context conditioning: a plain ViT block. The model appends [t_emb, y_emb] as two
    extra tokens to the sequence and drops them after the last block. With text, the appended
    tokens are [t_emb, caption tokens] and ``cond_mask`` is the key-padding mask of the whole
    sequence (padded caption tokens are never attended to)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, mlp: str = "gelu", norm: str = "layernorm"):
        super().__init__()
        self.norm1 = _norm(dim, affine=True, kind=norm)
        self.attn = Attention(dim, num_heads)
        self.norm2 = _norm(dim, affine=True, kind=norm)
        self.mlp = make_mlp(dim, mlp_ratio, mlp)

    def forward(self, x, c, cond_tokens=None, cond_mask=None, rope=None):
        x = x + self.attn(self.norm1(x), cond_mask, rope=rope)
        x = x + self.mlp(self.norm2(x))
        return x


class CrossAttnBlock(InContextBlock):
    """Cross-attention: the ViT block with multi-head cross-attention to the length-2
    sequence [t_emb, y_emb] between self-attention and the MLP. ~15 % more flops. With text the
    sequence is [t_emb, caption tokens] and ``cond_mask`` marks the caption's padding."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, mlp: str = "gelu", norm: str = "layernorm"):
        super().__init__(dim, num_heads, mlp_ratio, mlp=mlp, norm=norm)
        self.norm_cross = _norm(dim, affine=True, kind=norm)
        self.cross_attn = CrossAttention(dim, num_heads)

    def forward(self, x, c, cond_tokens=None, cond_mask=None, rope=None):
        x = x + self.attn(self.norm1(x), rope=rope)
        x = x + self.cross_attn(self.norm_cross(x), cond_tokens, cond_mask)
        x = x + self.mlp(self.norm2(x))
        return x


BLOCKS = {
    "adaln-zero": AdaLNZeroBlock,
    "adaln": AdaLNBlock,
    "cross-attn": CrossAttnBlock,
    "in-context": InContextBlock,
}


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then Linear(D -> p*p*C_out); both Linears zero-initialised,
    so the untrained model predicts exactly zero. Shared by all four block designs, so the
    comparison between them isolates the blocks."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = _norm(dim, affine=False, kind=norm)
        self.linear = Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
