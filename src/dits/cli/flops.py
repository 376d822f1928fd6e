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
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from dits.flops import flops_table

    if args.all == bool(args.model):
        raise UserError("give a model name (e.g. DiT-XL/2) or --all")
    overrides = dict(input_size=args.input_size, in_channels=args.in_channels,
                     num_classes=args.num_classes, block=args.block)
    rows = flops_table(None if args.all else [args.model], **overrides)
    if args.json:
        out = rows if args.all else rows[0]
        print(json.dumps(out))
        return 0
    print(f"{'model':<10} {'params':>14} {'Gflops':>9}")
    for r in rows:
        print(f"{r['model']:<10} {r['params']:>14,} {r['gflops']:>9.2f}")
    return 0
