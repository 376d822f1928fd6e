"""Gflops of a DiT, counted as the paper counts them.

The paper reports forward-pass multiply-accumulates for one image in fvcore's convention:
one MAC is one "flop". Counted: every Linear (in * out per token), the patch convolution
(k*k*C_in*C_out per output position), the two attention matmuls (q k^T and attn v:
T_q * T_k * D each) and, as fvcore does, LayerNorm at 4 flops per element without a
learned affine and 5 with one. Element-wise work (activations, modulation, residuals,
softmax) and embedding look-ups are free, as in fvcore.

The block options follow the same rules: SwiGLU is its three Linears (its gate product is
element-wise); RoPE's rotation of q and k is element-wise, so free; RMSNorm (which fvcore has no
rule for) is charged as a LayerNorm without the centring: 3 flops per element, 4 with an affine.
A masked training step (``mask_ratio`` R) is counted with int(T (1 − R)) tokens through the encoder
blocks and all T through the decoder and the final layer; sampling always runs all T through both.

The count is exact arithmetic on the shapes seen in one forward pass of a single image
(taken with hooks on a model built on the ``meta`` device, so DiT-XL/2 costs nothing to
count), not a timing.

Text models (docs/text.md) are counted with a caption of ``text_tokens`` real tokens: the
caption projection, the pooled vector, the text path of each block and, for the learned
encoder, the encoder itself. A frozen CLIP/T5 runs outside the model (once per caption, or
never when its embeddings are cached) and is not counted.
"""
from __future__ import annotations

import torch
from torch import nn

from dits.errors import UserError
from dits.models import DiT, create_model
from dits.models.blocks import Attention, CrossAttention, Linear

__all__ = ["count_flops", "count_gflops", "count_params", "flops_table"]


def _attention_macs(module: nn.Module, inputs: tuple) -> int:
    x = inputs[0]
    n, t_q, d = x.shape
    t_k = inputs[1].shape[1] if isinstance(module, CrossAttention) else t_q
    return 2 * n * t_q * t_k * d  # q k^T and attn @ v


def count_flops(model: DiT, input_size: int | None = None, text_tokens: int | None = None,
                mask_ratio: float | None = None) -> int:
    """Forward MACs for one image (batch of 1) of ``model``.

    ``input_size`` counts the same architecture at another latent size (a copy is built on
    the meta device; the model itself is untouched). ``text_tokens`` (text models only) is the
    caption length counted, default the model's ``text_tokens``. ``mask_ratio`` R > 0 (models
    with a masked-training decoder) counts the masked training step's forward: the encoder on
    :func:`dits.masking.kept_tokens` tokens.
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

    def on_rms_norm(m, inputs, out):
        nonlocal total
        total += inputs[0].numel() * (4 if m.elementwise_affine else 3)

    def on_attention(m, inputs, out):
        nonlocal total
        total += _attention_macs(m, inputs)

    handles = []
    for m in model.modules():
        hook = {nn.Linear: on_linear, Linear: on_linear, nn.Conv2d: on_conv, nn.LayerNorm: on_norm,
                nn.RMSNorm: on_rms_norm, Attention: on_attention, CrossAttention: on_attention}.get(type(m))
        if hook is not None:
            handles.append(m.register_forward_hook(hook))
    try:
        device = next(model.parameters()).device
        x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
        t = torch.zeros(1, device=device)
        y = torch.zeros(1, dtype=torch.long, device=device) if cfg.num_classes > 0 else None
        text = {}
        if cfg.text:
            n_text = int(text_tokens or cfg.text_tokens)
            if n_text < 1:
                raise UserError(f"text tokens must be >= 1, got {n_text}")
            if cfg.text_encoder == "learned":  # ids >= 2: real words
                text = {"text": torch.full((1, n_text), 2, dtype=torch.long, device=device)}
            else:
                text = {"text": torch.zeros(1, n_text, cfg.text_dim, device=device)}
            text["text_mask"] = torch.ones(1, n_text, dtype=torch.bool, device=device)
        elif text_tokens:
            raise UserError("text tokens are counted for text models only (give a text encoder)")
        if mask_ratio:
            if not cfg.decoder_depth:
                raise UserError("a masked training step needs a model with a decoder (--mask-decoder-depth)")
            from dits.masking import kept_tokens

            keep = kept_tokens(cfg.num_tokens, mask_ratio)
            text["mask_keep"] = torch.arange(keep, device=device)[None]  # which tokens does not change the count
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(x, t, y, **text)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return total


def count_gflops(model: DiT, input_size: int | None = None, text_tokens: int | None = None,
                 mask_ratio: float | None = None) -> float:
    """Gflops (forward MACs / 1e9, one image) in the paper's convention."""
    return count_flops(model, input_size, text_tokens, mask_ratio) / 1e9


def count_params(model: nn.Module) -> int:
    """All parameters, the fixed ``pos_embed`` included (as the reference counts them)."""
    return sum(p.numel() for p in model.parameters())


def flops_table(names=None, text_tokens: int | None = None, text_encoder: str | None = None,
                text_dim: int | None = None, mask_ratio: float | None = None, **overrides) -> list[dict]:
    """[{model, params, gflops}] for the named models (default: the paper's twelve).

    ``overrides`` are DiTConfig fields (``block``, ``mlp``, ``norm``, ``pos``, ``decoder_depth``, ...).
    ``mask_ratio`` R > 0 adds ``masked_gflops``, the masked training step's forward (``gflops`` stays
    the sampling forward: all tokens through encoder and decoder); the decoder depth defaults to
    that of ``dits train --mask-ratio`` (:data:`dits.masking.DEFAULT_DECODER_DEPTH`).

    ``text_tokens`` counts text models with captions of that many tokens: ``text_encoder``
    "frozen" (default; features of width ``text_dim``, default 4096 as T5-XXL's in PixArt-alpha,
    the encoder itself not counted) or "learned" (width ``text_dim``, default the model's, and
    counted; a placeholder vocabulary of 1,000 words for the parameter count)."""
    from dits.models import MODEL_NAMES

    text = {}
    if text_tokens is not None or text_encoder is not None or text_dim is not None:
        if text_tokens is None or int(text_tokens) < 1:
            raise UserError(f"--text-tokens must be >= 1 to count a text model, got {text_tokens}")
        kind = text_encoder or "frozen"
        if kind not in ("frozen", "learned"):
            raise UserError(f"--text-encoder for counting is frozen or learned, got {kind!r}")
        text = dict(text_encoder="learned" if kind == "learned" else "frozen", text_tokens=int(text_tokens),
                    num_classes=0, text_vocab=[f"w{i}" for i in range(998)] if kind == "learned" else None)
        if text_dim is not None:
            text["text_dim"] = int(text_dim)
        elif kind == "frozen":
            text["text_dim"] = 4096
    if mask_ratio is not None:
        from dits.masking import with_decoder

        overrides = with_decoder(overrides, mask_ratio)
    rows = []
    for name in names or MODEL_NAMES:
        extra = dict(text)
        if text and "text_dim" not in extra:  # learned: the model's own width
            with torch.device("meta"):
                extra["text_dim"] = create_model(name, **{**overrides, "num_classes": 0}).config.hidden_size
        with torch.device("meta"):
            model = create_model(name, **{**overrides, **extra})
        row = {"model": name, "params": count_params(model), "gflops": count_gflops(model)}
        if mask_ratio:
            row["mask_ratio"] = float(mask_ratio)
            row["masked_gflops"] = count_gflops(model, mask_ratio=mask_ratio)
        rows.append(row)
    return rows
