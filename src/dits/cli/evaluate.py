"""``dits evaluate``: sample-quality numbers (thin layer over :mod:`dits.evaluate`).

    dits evaluate SAMPLES.npz --ref REF.npz [--inception PATH] [--batch-size B]
    dits evaluate SAMPLES.npz --ref digits
    dits evaluate --make-ref SRC --out REF.npz [--inception PATH]
    dits evaluate --digits-check
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dits.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="FID/sFID/IS/precision/recall (ADM conventions) or the digits metric",
        description="Score an ADM samples .npz (arr_0 uint8 N×H×W×C, optional arr_1 labels) "
                    "against a reference batch, or against the built-in digits; or make a "
                    "reference batch. Inception weights: pt_inception-2015-12-05-6726825d.pth "
                    "(pytorch-fid release asset) via --inception or $DITS_INCEPTION.")
    p.add_argument("samples", nargs="?", help="samples .npz (ADM layout)")
    p.add_argument("--ref", help="reference batch .npz (ADM layout), or a built-in data set: 'digits', 'glyphs'")
    p.add_argument("--make-ref", metavar="SRC",
                   help="write a reference batch from an image folder (recursive png/jpg) or an .npz")
    p.add_argument("--out", help="output .npz for --make-ref")
    p.add_argument("--max-images", type=int, default=10_000,
                   help="images kept in the reference's arr_0 (default 10000, as ADM)")
    p.add_argument("--inception", metavar="PATH", help="FID Inception weights (.pth)")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default 50)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--json", metavar="PATH",
                   help="where to write results (default: SAMPLES stem + .eval.<ref>.json beside it)")
    p.add_argument("--fd-method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="matrix square root for FID: sqrtm (ADM, default) or eigh (faster, same value)")
    p.add_argument("--input-mode", choices=("pytorch-fid", "tf"), default="pytorch-fid",
                   help="resize/normalise like pytorch-fid (default) or like the TF graph in ADM")
    p.add_argument("--kid", action="store_true", help="also compute KID")
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write cached reference activations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--digits-check", action="store_true",
                   help="print the digits classifiers' held-out accuracy and the FD floor")
    p.add_argument("--seed", type=int, default=0, help="seed for the digits floor's draws")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.digits_check:
        return _digits_check(args)
    if args.make_ref:
        return _make_ref(args)
    if not args.samples or not args.ref:
        raise UserError("give SAMPLES.npz --ref REF.npz|digits|glyphs, or --make-ref SRC --out REF.npz, "
                        "or --digits-check")
    from dits.data.builtin import is_builtin

    if is_builtin(args.ref):
        return _builtin(args)
    return _inception(args)


def _json_path(args: argparse.Namespace) -> Path:
    if args.json:
        return Path(args.json)
    s = Path(args.samples)
    from dits.data.builtin import is_builtin

    ref = args.ref if is_builtin(args.ref) else Path(args.ref).stem
    return s.with_name(f"{s.stem}.eval.{ref}.json")


def _make_ref(args: argparse.Namespace) -> int:
    from dits.evaluate import make_reference

    if not args.out:
        raise UserError("--make-ref needs --out REF.npz")
    if args.samples or args.ref:
        raise UserError("--make-ref takes no SAMPLES or --ref; run the evaluation separately")
    if args.max_images < 2:
        raise UserError("--max-images must be at least 2")
    info = make_reference(args.make_ref, args.out, inception=args.inception,
                          batch_size=args.batch_size, device=args.device,
                          max_images=args.max_images, progress=not args.no_progress,
                          input_mode=args.input_mode, use_cache=not args.no_cache)
    print(f"wrote {info['out']}: statistics of {info['n_images']} images, "
          f"{info['n_kept']} kept in arr_0")
    return 0


def _inception(args: argparse.Namespace) -> int:
    from dits.evaluate import evaluate_samples, format_results
    from dits.evaluate.reference import write_json

    results = evaluate_samples(args.samples, args.ref, inception=args.inception,
                               batch_size=args.batch_size, device=args.device,
                               progress=not args.no_progress, fd_method=args.fd_method,
                               kid=args.kid, input_mode=args.input_mode,
                               use_cache=not args.no_cache)
    print(format_results(results))
    path = _json_path(args)
    write_json(path, results)
    print(f"wrote {path}")
    return 0


def _builtin(args: argparse.Namespace) -> int:
    """``--ref digits`` / ``--ref glyphs``: the built-in data set's own metric."""
    import numpy as np

    from dits.data.builtin import get
    from dits.evaluate.builtin import score
    from dits.evaluate.images import NpzImages, load_labels
    from dits.evaluate.reference import write_json

    side = get(args.ref).image_size
    arr = NpzImages(args.samples)  # validates layout and dtype without loading
    if arr.shape[1:3] != (side, side):
        raise UserError(f"--ref {args.ref} needs {side}×{side} samples, {args.samples} holds "
                        f"{arr.shape[1]}×{arr.shape[2]} images")
    n = len(arr)
    with np.load(args.samples, allow_pickle=False) as z:
        images = z["arr_0"]
    labels = load_labels(args.samples, n)
    d = score(args.ref, images, labels, seed=args.seed)
    d["samples"] = str(args.samples)
    floor_std = f" ± {d['fd_floor_std']:.4f}" if d.get("fd_floor_std") is not None else ""
    rows = [("samples", f"{d['n']}"),
            ("class accuracy (MLP)", _pct(d["accuracy"])),
            *([("class accuracy (SVC)", _pct(d["svc_accuracy"]))] if "svc_accuracy" in d else []),
            ("FD (MLP features)", f"{d['fd']:.4f}"),
            ("real-vs-real floor", f"{d['fd_floor']:.4f}{floor_std}"),
            ("held-out FD", f"{d['fd_heldout']:.4f}"),
            ("held-out real floor", f"{d['fd_heldout_floor']:.4f}"),
            ("held-out ratio", f"{d['fd_heldout'] / d['fd_heldout_floor']:.2f}x")]
    for name, value in rows:
        print(f"{name:<22} {value:>16}")
    path = _json_path(args)
    write_json(path, d)
    print(f"wrote {path}")
    return 0


def _pct(v) -> str:
    return "n/a (no arr_1)" if v is None else f"{100 * v:.2f}%"


def _digits_check(args: argparse.Namespace) -> int:
    from dits.evaluate.digits import digits_reference_check

    c = digits_reference_check(seed=args.seed)
    print(f"MLP held-out accuracy  {100 * c['mlp_heldout_accuracy']:.2f}% "
          f"(train {c['n_train']}, test {c['n_test']})")
    print(f"SVC held-out accuracy  {100 * c['svc_heldout_accuracy']:.2f}%")
    print(f"FD real-vs-real floor  {c['fd_floor']:.4f} ± {c['fd_floor_std']:.4f} at n={c['n']} "
          "(class-balanced)")
    print(f"classifier cache       {c['cache']}")
    return 0
