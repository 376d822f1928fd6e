"""``dits flops``: parameters and Gflops (paper convention) of a DiT."""
from __future__ import annotations

import json

from dits.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("flops", help="count parameters and Gflops (fvcore convention, one image)",
                       description="Forward Gflops of one image as the DiT paper counts them "
                                   "(one multiply-accumulate = one flop).")
    p.add_argument("model", nargs="?", help="model name, e.g. DiT-XL/2 (omit with --all)")
    p.add_argument("--all", action="store_true", help="print the paper's twelve configurations")
    p.add_argument("--input-size", type=int, default=None, help="latent side length (default 32)")
    p.add_argument("--in-channels", type=int, default=None, help="input channels (default 4)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default 1000; 0 = unconditional)")
    p.add_argument("--block", default=None, help="adaln-zero | adaln | cross-attn | in-context")
    p.add_argument("--mlp", default=None, help="gelu (the paper) | swiglu")
    p.add_argument("--norm", default=None, help="layernorm (the paper) | rmsnorm")
    p.add_argument("--pos", default=None, help="sincos (the paper) | rope (elementwise: no flops of its own)")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="also count the masked training step (MaskDiT) at this ratio R in [0, 1): the encoder on "
                        "int(T (1-R)) tokens; Gflops stays the sampling forward (all tokens, encoder + decoder)")
    p.add_argument("--mask-decoder-depth", type=int, default=None,
                   help="decoder blocks of a masked-training model (default 2 with --mask-ratio)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="count a text-conditional model with captions of N tokens (docs/text.md)")
    p.add_argument("--text-encoder", default=None, choices=("frozen", "learned"),
                   help="with --text-tokens: frozen (features from CLIP/T5, not counted; default) or learned "
                        "(the small text transformer, counted)")
    p.add_argument("--text-dim", type=int, default=None,
                   help="with --text-tokens: caption feature width (frozen default 4096, T5-XXL as PixArt-alpha; "
                        "learned default the model's width)")
    p.add_argument("--backbone", default="dit", help="dit | unet (counted by FlopCounterMode; docs/backbones.md)")
    p.add_argument("--unet-channels", default=None, help="--backbone unet: width per level, e.g. 16,32 (64,128,128)")
    p.add_argument("--unet-layers", type=int, default=None, help="--backbone unet: residual blocks per level (2)")
    p.add_argument("--counter", default=None, choices=("modules", "torch"),
                   help="modules: dits.flops (fvcore's convention, DiTs only; the default for a DiT) | torch: "
                        "FlopCounterMode (MACs = its flops / 2), the one counter for both backbones")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from dits.flops import flops_table

    if args.backbone != "dit" or args.counter == "torch":  # FlopCounterMode (dits.flop_counter), any backbone
        return _torch_counter(args)
    if args.unet_channels is not None or args.unet_layers is not None:
        raise UserError("--unet-channels and --unet-layers size a U-Net; add --backbone unet")
    if args.all == bool(args.model):
        raise UserError("give a model name (e.g. DiT-XL/2) or --all")
    overrides = dict(input_size=args.input_size, in_channels=args.in_channels,
                     num_classes=args.num_classes, block=args.block, **_block_options(args))
    if args.text_tokens is None and (args.text_encoder or args.text_dim is not None):
        raise UserError("--text-encoder and --text-dim describe a text model: add --text-tokens N")
    if args.text_tokens is not None and args.num_classes:
        raise UserError("--text-tokens counts a text-conditional model; drop --num-classes")
    text = dict(text_tokens=args.text_tokens, text_encoder=args.text_encoder, text_dim=args.text_dim) \
        if args.text_tokens is not None else {}
    rows = flops_table(None if args.all else [args.model], **overrides, **text, mask_ratio=args.mask_ratio)
    if args.json:
        out = rows if args.all else rows[0]
        print(json.dumps(out))
        return 0
    print(f"{'model':<10} {'params':>14} {'Gflops':>9}")
    for r in rows:
        print(f"{r['model']:<10} {r['params']:>14,} {r['gflops']:>9.2f}")
    _masked_lines(rows)
    return 0


def _block_options(args) -> dict:
    """--mlp/--norm/--pos/--mask-decoder-depth as DiTConfig overrides (None: the paper's)."""
    if args.mask_decoder_depth is not None and args.mask_decoder_depth < 1:
        raise UserError(f"--mask-decoder-depth must be >= 1, got {args.mask_decoder_depth}")
    return {k: v for k, v in dict(mlp=args.mlp, norm=args.norm, pos=args.pos,
                                  decoder_depth=args.mask_decoder_depth).items() if v is not None}


def _masked_lines(rows) -> None:
    for r in rows:
        if "masked_gflops" in r:
            print(f"{r['model']}: masked training step (R={r['mask_ratio']:g}): {r['masked_gflops']:.4g} Gflops "
                  f"forward; sampling (all tokens, encoder + decoder): {r['gflops']:.4g} Gflops")


def _torch_counter(args) -> int:
    from dits.flop_counter import flops_rows
    from dits.models.registry import get_backbone

    unet = get_backbone(args.backbone).name == "unet"
    if args.counter == "modules" and unet:
        raise UserError("--counter modules counts DiTs only; a U-Net is counted by FlopCounterMode (--counter torch)")
    if args.text_tokens is not None or args.text_encoder or args.text_dim is not None:
        raise UserError("text models are counted by --counter modules (dits.flops)")
    if not unet and args.all == bool(args.model):
        raise UserError("give a model name (e.g. DiT-XL/2) or --all")
    if unet and args.all:
        raise UserError("--all lists the paper's DiTs; drop it with --backbone unet")
    rows = flops_rows(args.backbone, [args.model] if args.model else None, unet_channels=args.unet_channels,
                      unet_layers=args.unet_layers, input_size=args.input_size, in_channels=args.in_channels,
                      num_classes=args.num_classes, block=args.block, options=_block_options(args),
                      mask_ratio=args.mask_ratio)
    if args.json:
        print(json.dumps(rows if args.all else rows[0]))
        return 0
    width = max(10, *(len(r["model"]) for r in rows))
    print(f"{'model':<{width}} {'params':>14} {'Gflops':>9}  (FlopCounterMode)")
    for r in rows:
        print(f"{r['model']:<{width}} {r['params']:>14,} {r['gflops']:>9.4g}")
    _masked_lines(rows)
    return 0
