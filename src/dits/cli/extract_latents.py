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
    p.add_argument("--captions", nargs="?", const="", default=None, metavar="FILE.jsonl",
                   help="also store the images' captions (default file: FOLDER/metadata.jsonl); with --text-encoder "
                        "their embeddings too, so text training never runs the encoder (docs/text.md)")
    p.add_argument("--text-encoder", default=None, metavar="HUB_ID_OR_DIR",
                   help="with --captions: a CLIP text model or T5 encoder (transformers) whose embeddings to cache")
    p.add_argument("--max-text-tokens", type=int, default=None, help="with --text-encoder: caption tokens (default 77)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dits.data.latents import extract_latents, read_meta

    encoder = _check_captions(args)  # before any work: bad captions or encoder are one line, nothing written
    out = extract_latents(
        args.data, args.vae, args.image_size, args.out, batch_size=args.batch_size, device=args.device,
        dtype=args.store_dtype, flip=not args.no_flip, posterior=args.posterior, seed=args.seed,
        vae_dtype=getattr(torch, DTYPES[args.vae_dtype]), num_workers=args.num_workers,
        scaling_factor=args.scaling_factor, small=args.small, captioned=args.captions is not None)
    meta = read_meta(out)
    print(f"latent cache {out}: {meta['n']} images, latents {tuple(meta['latent_shape'])} x{meta['variants']} "
          f"({meta['dtype']}, posterior {meta['posterior']}), {meta['num_classes'] or 'no'} classes, "
          f"scaling factor {meta['scaling_factor']}")
    if args.captions is not None:
        from dits.text.cache import add_captions

        text = add_captions(out, args.captions or None, encoder, args.max_text_tokens, batch_size=args.batch_size,
                            device=args.device)
        emb = (f", embeddings of {text['encoder']} ({text['max_tokens']} tokens x {text['dim']})"
               if text["encoder"] else " (no embeddings: for --text-encoder learned)")
        print(f"captions: {len(text['texts'])} distinct for {len(text['rows'])} images{emb}")
    return 0


def _check_captions(args):
    """The captions and the text encoder, checked (and the encoder loaded) before any latent is made."""
    from dits.errors import UserError

    if args.captions is None:
        if args.text_encoder or args.max_text_tokens is not None:
            raise UserError("--text-encoder and --max-text-tokens go with --captions (caption embeddings)")
        return None
    if args.max_text_tokens is not None and args.max_text_tokens < 1:
        raise UserError(f"--max-text-tokens must be >= 1, got {args.max_text_tokens}")
    if args.max_text_tokens is not None and not args.text_encoder:
        raise UserError("--max-text-tokens needs --text-encoder (the tokens of its embeddings)")
    if args.text_encoder == "learned":
        raise UserError("--text-encoder learned is trained with the DiT: cache the captions alone (drop "
                        "--text-encoder) and train with --text-encoder learned")
    import os

    from dits.data.captions import folder_caption_file, match_captions, read_caption_file
    from dits.data.folder import scan_captioned

    files = scan_captioned(args.data)
    root = os.path.expanduser(args.data)
    path = folder_caption_file(root, args.captions or None)
    match_captions([os.path.relpath(f, root) for f in files], read_caption_file(path), f"the data folder {args.data}",
                   f"caption file {path}")
    if not args.text_encoder:
        return None
    from dits.text.pretrained import PretrainedTextEncoder

    enc = PretrainedTextEncoder(args.text_encoder, device=args.device)
    enc.check_tokens(args.max_text_tokens or 77)
    return enc
