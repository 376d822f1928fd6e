"""One flop counter for every backbone: PyTorch's ``FlopCounterMode``, in the paper's unit.

:mod:`dits.flops` counts a DiT from its modules (hooks on Linear, the patch convolution,
attention and LayerNorm, fvcore's convention). A U-Net has other modules, so the comparison of
the two families needs a counter that knows neither: ``torch.utils.flop_counter.FlopCounterMode``
sees the aten operators a forward pass runs, and counts 2 flops per multiply-accumulate of every
matrix product (``mm``, ``addmm``, ``bmm``, ``baddbmm``) and convolution (bias left out). dits
reports MACs (the DiT paper's "Gflops" are fvcore's, one multiply-accumulate = one flop), so the
count here is FlopCounterMode's total / 2. Element-wise work, norms, softmax, embedding look-ups
and resampling are not counted, by either family.

What the mode cannot see, and how it is made to: CPU attention kernels
(``_scaled_dot_product_flash_attention_for_cpu``) and oneDNN's fused linear
(``mkldnn::_linear_pointwise``, dits.speed's CPU fp32 GEMM) have no formula in PyTorch's
registry. The count runs on the **reference path**, a copy of the model built on the ``meta``
device (no memory, no kernels: SDPA falls back to its matmul decomposition there), with
dits.speed forced to explicit-matmul attention and ``F.linear``, and diffusers' attention on its
plain processor (``baddbmm`` + ``bmm``); the two kernels also get formulas here, so a model
counted on the CPU as it stands gives the same number.

The difference from :mod:`dits.flops` on a DiT is exactly its LayerNorm term (fvcore charges 4-5
flops per element): 0.02-0.06 % on the paper's twelve models, more on the study's narrow ones
(tested in ``tests/test_unet.py``; docs/backbones.md lists them).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["count_macs", "count_flops", "count_gflops", "count_params", "reference_path"]


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _onednn_linear_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    rows = 1
    for s in x_shape[:-1]:
        rows *= s
    return 2 * rows * w_shape[0] * w_shape[1]


def _custom_mapping() -> dict:
    """Formulas for the kernels FlopCounterMode's registry lacks (those this torch build has)."""
    mapping = {}
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
    try:
        mapping[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flop
    except (AttributeError, RuntimeError):  # a build without oneDNN
        pass
    return mapping


@contextlib.contextmanager
def reference_path(model: nn.Module | None = None):
    """Within the block, dits.speed runs attention as two matmuls and linears as ``F.linear``, and
    every diffusers attention of ``model`` uses the plain processor; all restored afterwards."""
    from dits import speed

    saved = []
    if model is not None:
        try:
            from diffusers.models.attention_processor import Attention, AttnProcessor
        except ImportError:  # pragma: no cover - diffusers is a dependency
            Attention = None
        if Attention is not None:
            for m in model.modules():
                if isinstance(m, Attention):
                    saved.append((m, m.processor))
                    m.set_processor(AttnProcessor())
    forced = getattr(speed, "forced", None)
    ctx = forced(attention="math", gemm="mkl") if forced is not None else contextlib.nullcontext()
    try:
        with ctx:
            yield
    finally:
        for m, proc in saved:
            m.set_processor(proc)


def count_macs(module: nn.Module, *args, **kwargs) -> int:
    """Forward multiply-accumulates of ``module(*args, **kwargs)`` as FlopCounterMode counts them
    (its flops / 2), on the reference path, without gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    try:
        with reference_path(module), torch.no_grad(), \
                FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
            module(*args, **kwargs)
    finally:
        module.train(was_training)
    total = counter.get_total_flops()
    return total // 2


def _example(cfg, device) -> tuple:
    x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    t = torch.zeros(1, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if cfg.num_classes > 0 else None
    return x, t, y


def count_flops(model_or_config, input_size: int | None = None, mask_ratio: float | None = None) -> int:
    """Forward MACs of one image for a backbone model or its config (any family in
    :mod:`dits.models.registry`): a copy is built on the ``meta`` device and counted there.
    ``input_size`` counts the same architecture at another image size; ``mask_ratio`` R > 0 (a DiT
    with a masked-training decoder) the masked training step's forward, as :mod:`dits.flops` does."""
    from dits.models.registry import build, config_from_dict

    cfg = getattr(model_or_config, "config", model_or_config)
    if getattr(cfg, "text", False):
        from dits.errors import UserError
        raise UserError("text models are counted by dits.flops (dits flops --text-tokens N)")
    d = cfg.to_dict()
    if input_size is not None:
        d["input_size"] = int(input_size)
    cfg = config_from_dict(d)
    with torch.device("meta"):
        model = build(cfg)
    kwargs = {}
    if mask_ratio:
        from dits.errors import UserError
        from dits.masking import kept_tokens

        if not getattr(cfg, "decoder_depth", 0):
            raise UserError("a masked training step needs a DiT with a decoder (--mask-decoder-depth)")
        kwargs["mask_keep"] = torch.arange(kept_tokens(cfg.num_tokens, mask_ratio), device="meta")[None]
    return count_macs(model, *_example(cfg, "meta"), **kwargs)


def count_gflops(model_or_config, input_size: int | None = None, mask_ratio: float | None = None) -> float:
    """Gflops (forward MACs / 1e9, one image) in the paper's unit, for either backbone."""
    return count_flops(model_or_config, input_size, mask_ratio) / 1e9


def count_params(model_or_config) -> int:
    """All parameters of the model (for a config: of the model it builds, on the meta device)."""
    if isinstance(model_or_config, nn.Module):
        return sum(p.numel() for p in model_or_config.parameters())
    from dits.models.registry import build

    with torch.device("meta"):
        return sum(p.numel() for p in build(model_or_config).parameters())


def flops_rows(backbone: str = "dit", names=None, *, unet_channels=None, unet_layers: int | None = None,
               input_size: int | None = None, in_channels: int | None = None, num_classes: int | None = None,
               block: str | None = None, options: dict | None = None,
               mask_ratio: float | None = None) -> list[dict]:
    """[{model, params, gflops}] counted by FlopCounterMode: the named DiTs (default the paper's
    twelve), or for ``backbone="unet"`` the one U-Net of ``unet_channels`` x ``unet_layers``
    (defaults as ``dits train --backbone unet``: 64,128,128 x 2; image 32, 4 channels, 1000
    classes, as ``dits flops`` counts DiTs)."""
    from dits.errors import UserError
    from dits.models.registry import get_backbone

    family = get_backbone(backbone)
    common = {k: v for k, v in dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes).items()
              if v is not None}
    if family.name == "unet":
        from dits.models.unet import DEFAULT_CHANNELS, DEFAULT_LAYERS, UNetConfig

        if names:
            raise UserError(f"--backbone unet counts the U-Net of --unet-channels/--unet-layers; drop the model "
                            f"name {names[0]!r}")
        if block is not None:
            raise UserError("--block describes a DiT; --backbone unet is sized by --unet-channels and --unet-layers")
        dit_only = [k for k in (options or {})] + (["mask_ratio"] if mask_ratio is not None else [])
        if dit_only:
            flags = ", ".join("--" + {"decoder_depth": "mask_decoder_depth"}.get(k, k).replace("_", "-")
                              for k in dit_only)
            raise UserError(f"{flags} describe{'s' if len(dit_only) == 1 else ''} a DiT; --backbone unet is sized by "
                            "--unet-channels and --unet-layers")
        cfg = UNetConfig(channels=unet_channels if unet_channels is not None else DEFAULT_CHANNELS,
                         layers=unet_layers if unet_layers is not None else DEFAULT_LAYERS,
                         **{"input_size": 32, **common})
        return [{"model": cfg.describe(), "params": count_params(cfg), "gflops": count_gflops(cfg)}]
    if unet_channels is not None or unet_layers is not None:
        raise UserError("--unet-channels and --unet-layers size a U-Net; add --backbone unet")
    from dits.models import MODEL_NAMES, config_for

    from dits.masking import with_decoder

    options = with_decoder(options or {}, mask_ratio)
    rows = []
    for name in names or MODEL_NAMES:
        cfg = config_for(name, **common, block=block, **options)
        row = {"model": name, "params": count_params(cfg), "gflops": count_gflops(cfg)}
        if mask_ratio:
            row.update(mask_ratio=float(mask_ratio), masked_gflops=count_gflops(cfg, mask_ratio=mask_ratio))
        rows.append(row)
    return rows
