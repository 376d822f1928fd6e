"""Gflops of a DiT, counted as the paper counts them.

The paper reports forward-pass multiply-accumulates for one image in fvcore's convention:
one MAC is one "flop". Counted: every Linear (in * out per token), the patch convolution
(k*k*C_in*C_out per output position), the two attention matmuls (q k^T and attn v:
T_q * T_k * D each) and, as fvcore does, LayerNorm at 4 flops per element without a
learned affine and 5 with one. Element-wise work (activations, modulation, residuals,
softmax) and embedding look-ups are free, as in fvcore.

The count is exact arithmetic on the shapes seen in one forward pass of a single image
(taken with hooks on a model built on the ``meta`` device, so DiT-XL/2 costs nothing to
count), not a timing.
"""
from __future__ import annotations

import torch
from torch import nn

from dits.models import DiT, create_model
from dits.models.blocks import Attention, CrossAttention, Linear

__all__ = ["count_flops", "count_gflops", "count_params", "flops_table"]


def _attention_macs(module: nn.Module, inputs: tuple) -> int:
    x = inputs[0]
    n, t_q, d = x.shape
    t_k = inputs[1].shape[1] if isinstance(module, CrossAttention) else t_q
    return 2 * n * t_q * t_k * d  # q k^T and attn @ v


def count_flops(model: DiT, input_size: int | None = None) -> int:
    """Forward MACs for one image (batch of 1) of ``model``.

    ``input_size`` counts the same architecture at another latent size (a copy is built on
    the meta device; the model itself is untouched).
    """
    cfg = model.config
    if input_size is not None and input_size != cfg.input_size:
        with torch.device("meta"):
            model = create_model("DiT", **{**cfg.to_dict(), "input_size": int(input_size)})
    cfg = model.config
    total = 0

    def on_linear(m, inputs, out):
        nonlocal total
        total += inputs[0].numel() // m.in_features * m.in_features * m.out_features

    def on_conv(m, inputs, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += out.numel() * k

    def on_norm(m, inputs, out):
        nonlocal total
        total += inputs[0].numel() * (5 if m.elementwise_affine else 4)

    def on_attention(m, inputs, out):
        nonlocal total
        total += _attention_macs(m, inputs)

    handles = []
    for m in model.modules():
        hook = {nn.Linear: on_linear, Linear: on_linear, nn.Conv2d: on_conv, nn.LayerNorm: on_norm,
                Attention: on_attention, CrossAttention: on_attention}.get(type(m))
        if hook is not None:
            handles.append(m.register_forward_hook(hook))
    try:
        device = next(model.parameters()).device
        x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
        t = torch.zeros(1, device=device)
        y = torch.zeros(1, dtype=torch.long, device=device) if cfg.num_classes > 0 else None
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(x, t, y)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return total


def count_gflops(model: DiT, input_size: int | None = None) -> float:
    """Gflops (forward MACs / 1e9, one image) in the paper's convention."""
    return count_flops(model, input_size) / 1e9


def count_params(model: nn.Module) -> int:
    """All parameters, the fixed ``pos_embed`` included (as the reference counts them)."""
    return sum(p.numel() for p in model.parameters())


def flops_table(names=None, **overrides) -> list[dict]:
    """[{model, params, gflops}] for the named models (default: the paper's twelve)."""
    from dits.models import MODEL_NAMES

    rows = []
    for name in names or MODEL_NAMES:
        with torch.device("meta"):
            model = create_model(name, **overrides)
        rows.append({"model": name, "params": count_params(model), "gflops": count_gflops(model)})
    return rows
