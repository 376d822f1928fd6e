"""``dits convert``: move adaLN-Zero DiTs between dits checkpoints and diffusers.

    dits convert --to diffusers CKPT OUT_DIR     # a DiTPipeline directory (transformer, scheduler[, vae]),
                                                 # with a model card (README.md) and the run's sample grid
    dits convert --to diffusers RUN OUT_DIR --push-to-hub OWNER/NAME   # ... and upload it to the Hub
    dits convert --from diffusers DIR OUT        # a dits model checkpoint (OUT, a .pt file)
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from dits.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert checkpoints to / from diffusers",
        description="Convert an adaLN-Zero DiT between dits checkpoints (also official DiT .pt files and "
                    "reference training checkpoints) and diffusers' DiTTransformer2DModel / DiTPipeline.")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=("diffusers",), help="write SRC (a checkpoint or run dir) as a DiTPipeline DST")
    way.add_argument("--from", dest="from_", choices=("diffusers",),
                     help="read SRC (a diffusers pipeline or transformer dir, or a Hub id) into a dits checkpoint DST")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--model", default=None, help="model name (e.g. DiT-XL/2) if SRC's size cannot be inferred")
    p.add_argument("--vae", default=None, metavar="ID_OR_DIR",
                   help="--to: copy this VAE into the pipeline (else pass vae= when loading it)")
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "ddpm", "dpm"),
                   help="--to: scheduler written with the pipeline (default ddim)")
    p.add_argument("--class-names", default=None, metavar="FILE",
                   help="--to: class names for id2label: a text file (one per line) or a latent cache directory")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="--to: also upload the pipeline (with its model card) to this Hugging Face Hub model "
                        "repository, created if needed; needs a token (hf auth login or HF_TOKEN)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run)


def _class_names(spec: str | None, info: dict) -> list[str] | None:
    if spec is None:
        train_config = info.get("train_config")
        names = train_config.get("classes") if isinstance(train_config, dict) else None
        return list(names) if names else None
    path = Path(spec).expanduser()
    if path.is_dir():
        from dits.data.latents import read_meta
        return list(read_meta(path)["classes"]) or None
    if not path.is_file():
        raise UserError(f"class names file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        return [data[k] for k in sorted(data, key=int)] if isinstance(data, dict) else list(data)
    return [line.strip() for line in text.splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    from dits.checkpoint import load_model, save_model
    from dits.interop import diffusers as interop

    if args.push_to_hub and not args.to:
        raise UserError("--push-to-hub uploads a diffusers export: use it with --to diffusers")
    if args.to:
        from dits.interop.hub import check_push, push_folder
        from dits.interop.model_card import find_run_dir, model_card

        token = check_push(args.push_to_hub) if args.push_to_hub else None  # before any work
        model, info = load_model(args.src, model_name=args.model)
        interop.diffusers_config(model.config)  # one line for what does not convert (a U-Net), before any work
        from dits.objectives import objective_of
        if objective_of(info) != "diffusion":
            raise UserError(f"{args.src} is a {objective_of(info)} model; diffusers' DiTPipeline would sample it "
                            "as Gaussian diffusion, so it is not exported (sample it with dits sample)")
        meta = {k: info.get(k) for k in ("source", "step", "weights", "train_config", "vae_spec")}
        names = _class_names(args.class_names, info)
        if names is not None and len(names) != model.num_classes:
            raise UserError(f"{len(names)} class names given for a model with {model.num_classes} classes")
        run_dir = find_run_dir(args.src)
        repo = args.push_to_hub
        card, files = model_card(model, info, where=repo or str(args.dst), has_vae=args.vae is not None,
                                 vae_spec=args.vae or info.get("vae_spec"), scheduler=args.scheduler,
                                 class_names=names, run_dir=run_dir, name=repo.split("/")[-1] if repo else None)
        pushed = []

        def publish(folder):  # the finished export, before it is moved to DST: a failed upload leaves nothing
            step = f" at step {info['step']}" if info.get("step") is not None else ""
            pushed.append(push_folder(folder, repo, token, f"dits convert: {Path(str(info.get('source'))).name}{step}"))

        with warnings.catch_warnings(record=True) as caught:  # shown as one line each, not tracebacks
            warnings.simplefilter("always", UserWarning)
            out = interop.save_diffusers(model, args.dst, vae=args.vae, scheduler=args.scheduler,
                                         class_names=names, overwrite=args.overwrite, metadata=meta,
                                         card=card, files=files, publish=publish if repo else None)
        for w in caught:
            print(f"dits convert: warning: {w.message}", file=sys.stderr)
        print(f"wrote DiTPipeline {out} ({info.get('weights', 'model')} weights of {info.get('source', args.src)})"
              f"; model card {out / 'README.md'}")
        if pushed:
            print(f"pushed to {pushed[0]}")
        print(f"dits convert: {interop.FREQ_SHIFT_WARNING}", file=sys.stderr)
        return 0

    if Path(args.dst).exists() and not args.overwrite:
        raise UserError(f"{args.dst} already exists; choose another output file, or replace it with --overwrite")
    model, info = load_model(args.src, model_name=args.model)  # a pipeline/transformer dir or a Hub id
    out = save_model(args.dst, model, **{k: info[k] for k in ("train_config", "vae_spec", "step") if info.get(k)})
    cfg = model.config
    print(f"wrote dits checkpoint {out}: depth {cfg.depth}, width {cfg.hidden_size}, patch {cfg.patch_size}, "
          f"{cfg.num_classes or 'no'} classes, input {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}")
    return 0
