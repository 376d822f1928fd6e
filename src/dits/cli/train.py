"""``dits train``: a thin layer over ``dits.train.train``."""
from __future__ import annotations

import argparse


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a DiT (the built-in digits by default)",
                       description="Train a DiT. Defaults are the paper's recipe; --preset digits (the default "
                                   "when no --data/--latents is given) trains on the built-in 8x8 digits in minutes.")
    a = p.add_argument
    a("--preset", default=None, help="preset name (digits, imagenet256) or a YAML file")
    a("--data", default=None, help="'digits' (built in) or an image folder (class subfolders = labels)")
    a("--latents", default=None, help="latent cache from `dits extract-latents`")
    a("--image-size", type=int, default=None)
    a("--vae", default=None, help="diffusers AutoencoderKL hub id or directory (latent space)")
    a("--vae-scale", type=float, default=None, help="latent scaling factor (default: the VAE's, 0.18215 for SD)")
    a("--flip", type=_bool, default=None, help="random horizontal flips (true/false)")
    a("--model", default=None, help="DiT-S/2 ... DiT-XL/8, or DiT with --depth/--hidden-size/--num-heads/--patch-size")
    a("--depth", type=int, default=None)
    a("--hidden-size", type=int, default=None)
    a("--num-heads", type=int, default=None)
    a("--patch-size", type=int, default=None)
    a("--block", default=None, help="adaln-zero | adaln | cross-attn | in-context")
    a("--learn-sigma", type=_bool, default=None)
    a("--class-dropout-prob", type=float, default=None)
    a("--steps", type=int, default=None, help="total optimisation steps")
    a("--batch-size", type=int, default=None, help="global batch size (over all processes)")
    a("--lr", type=float, default=None)
    a("--weight-decay", type=float, default=None)
    a("--warmup-steps", type=int, default=None)
    a("--grad-clip", type=float, default=None)
    a("--ema-decay", type=float, default=None)
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    a("--seed", type=int, default=None)
    a("--out", default=None, help="run directory")
    a("--log-every", type=int, default=None)
    a("--ckpt-every", type=int, default=None, help="checkpoint (and preview) every K steps")
    a("--sample-every", type=int, default=None, help="preview grid every K steps (default: --ckpt-every)")
    a("--sampler", default=None, help="sampler for previews: ddpm | ddim | dpm++ | heun")
    a("--sample-steps", type=int, default=None)
    a("--cfg-scale", type=float, default=None)
    a("--eval-samples", type=int, default=None, help="digits metric sample count (0 = off)")
    a("--num-workers", type=int, default=None)
    a("--device", default=None, help="auto | cpu | cuda | cuda:N")
    a("--resume", default=None, metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    a("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


KEYS = ["data", "latents", "image_size", "vae", "vae_scale", "flip", "model", "depth", "hidden_size", "num_heads",
        "patch_size", "block", "learn_sigma", "class_dropout_prob", "steps", "batch_size", "lr", "weight_decay",
        "warmup_steps", "grad_clip", "ema_decay", "precision", "seed", "out", "log_every", "ckpt_every",
        "sample_every", "sampler", "sample_steps", "cfg_scale", "eval_samples", "num_workers", "device"]


def run(args) -> int:
    from dits.config import resolve_config
    from dits.train import train

    overrides = {k: getattr(args, k) for k in KEYS}
    preset = args.preset
    if preset is None and not args.resume and args.data in (None, "digits") and not args.latents:
        preset = "digits"
    cfg = resolve_config(preset, overrides)
    summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    if summary:
        m = summary.get("digits_metric")
        print(f"done: run dir {summary.get('run_dir')}; samples {summary.get('samples')}")
        if m:
            from dits.evaluate.digits import format_digits_metric
            print("digits metric:", format_digits_metric(m))
    return 0
