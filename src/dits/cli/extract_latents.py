"""``dits extract-latents``: encode an image folder once into a latent cache for training."""
from __future__ import annotations

import argparse

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract-latents", help="encode an image folder into a latent cache (resumable)",
        description="Encode every image (and its horizontal flip) of an image folder with a frozen VAE into "
                    "CACHE_DIR, for `dits train --latents CACHE_DIR`. Rerun the same command to resume.")
    p.add_argument("--data", required=True, metavar="FOLDER", help="image folder (class subfolders, or flat)")
    p.add_argument("--vae", required=True, metavar="ID_OR_DIR",
                   help="stabilityai/sd-vae-ft-ema, stabilityai/sd-vae-ft-mse, a local AutoencoderKL directory, "
                        "or 'pixel'")
    p.add_argument("--image-size", type=int, default=256, help="centre-crop size in pixels (default 256)")
    p.add_argument("--out", required=True, metavar="CACHE_DIR", help="cache directory (created or resumed)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")
    p.add_argument("--vae-dtype", default="float32", choices=sorted(DTYPES),
                   help="precision the VAE runs in (default float32)")
    p.add_argument("--store-dtype", default="float16", choices=("float16", "float32"),
                   help="precision of the stored latents (default float16)")
    p.add_argument("--no-flip", action="store_true", help="do not store the flipped images' latents")
    p.add_argument("--posterior", default="sample", choices=("sample", "moments"),
                   help="store one posterior sample per image (default), or mean and std so that training "
                        "draws a fresh sample each time, as the reference (twice the disk)")
    p.add_argument("--scaling-factor", type=float, default=None, help="override the VAE's scaling factor")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples (default 0)")
    p.add_argument("--num-workers", type=int, default=4, help="image decoding workers (default 4)")
    p.add_argument("--small", default="upscale", choices=("upscale", "error", "skip"),
                   help="images smaller than the crop: upscale (as the reference), error, or skip")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dits.data.latents import extract_latents, read_meta

    out = extract_latents(
        args.data, args.vae, args.image_size, args.out, batch_size=args.batch_size, device=args.device,
        dtype=args.store_dtype, flip=not args.no_flip, posterior=args.posterior, seed=args.seed,
        vae_dtype=getattr(torch, DTYPES[args.vae_dtype]), num_workers=args.num_workers,
        scaling_factor=args.scaling_factor, small=args.small)
    meta = read_meta(out)
    print(f"latent cache {out}: {meta['n']} images, latents {tuple(meta['latent_shape'])} x{meta['variants']} "
          f"({meta['dtype']}, posterior {meta['posterior']}), {meta['num_classes'] or 'no'} classes, "
          f"scaling factor {meta['scaling_factor']}")
    return 0
