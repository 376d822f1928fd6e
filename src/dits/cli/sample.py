"""``dits sample``: draw samples from a run, a checkpoint, or an official DiT file."""
from __future__ import annotations

from pathlib import Path

from dits.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a trained DiT",
                       description="Sample with the EMA weights. --out FILE.npz writes ADM's layout (arr_0 uint8 "
                                   "NxHxWxC, arr_1 labels); FILE.png a grid (one row per class); DIR one PNG each.")
    a = p.add_argument
    a("--ckpt", required=True, help="run directory, dits or reference DiT .pt, .safetensors state dict, diffusers "
                                   "DiTPipeline/transformer directory, or Hub id (facebook/DiT-XL-2-256)")
    a("--model", default=None, help="model name for reference checkpoints (default: inferred from the shapes)")
    a("--vae", default=None, help="AutoencoderKL hub id or dir to decode latents (default: the run's)")
    a("--vae-scale", type=float, default=None, help="latent scaling factor override")
    a("--num-samples", type=int, default=None, help="default: 8 per class for a .png grid, else 100")
    a("--cfg-scale", type=float, default=None, help="guidance scale (default: the run's; 4.0 for reference files)")
    a("--guided-channels", type=int, default=None, help="guide only the first K eps channels (3 = reference FID)")
    a("--sampler", default=None, help="diffusion: ddpm | ddim | dpm++ | heun; flow: euler | heun | sde "
                                      "(default: the run's preview sampler; else ddpm / sde)")
    a("--steps", type=int, default=None, help="sampling steps (default: the run's preview steps with its sampler; "
                                              "else 250 for ddpm and sde, 50 for the others)")
    a("--guidance-interval", default=None, metavar="LO,HI",
      help="guide only at noise levels in [LO, HI] (0 = data, 1 = noise; docs/flow.md); default: the run's")
    a("--seed", type=int, default=0)
    a("--class", dest="classes", default=None, help="comma-separated class ids (default: balanced over classes)")
    a("--prompt", dest="prompt", action="append", default=None, metavar="TEXT",
      help="text models: a prompt (repeat the flag for several; a .png grid has one row per prompt)")
    a("--prompts", dest="prompts_file", default=None, metavar="FILE", help="text models: prompts, one per line")
    a("--max-text-tokens", type=int, default=None,
      help="text models: caption tokens (default: the model's; more only for cross-attention with a frozen encoder)")
    a("--batch-size", type=int, default=256)
    a("--plan", default="auto", metavar="PLAN",
      help="how the model runs: auto (a run of >= 500 model calls times the candidate plans once per machine and "
           "model, then takes the fastest; docs/performance.md), or a plan name (eager+mkl+math, compile-model, ...)")
    a("--compile", choices=("auto", "on", "off"), default="auto",
      help="torch.compile: auto (when it pays for the run, as measured), on (the whole model), off (eager plans only)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--out", required=True, help="FILE.npz | FILE.png | DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import torch

    from dits.checkpoint import load_model
    from dits.sample import class_row_labels, generate, save_folder, save_grid, save_npz
    from dits.train.distributed import resolve_device

    out = Path(args.out)
    kind = out.suffix.lower()
    if kind not in (".npz", ".png", ""):
        raise UserError(f"--out must end in .npz or .png, or be a directory; got {args.out}")
    if kind and not _writable(out.parent if str(out.parent) else Path(".")):
        raise UserError(f"cannot write to {out.parent}: not a writable directory")
    for flag in ("num_samples", "steps", "batch_size", "max_text_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    from dits.plan import check_plan_name
    check_plan_name(args.plan)
    prompts = _prompts(args)
    from dits.objectives import SAMPLERS
    known = sorted(set().union(*SAMPLERS.values()))
    if args.sampler is not None and args.sampler not in known:  # before any weights load; per objective below
        raise UserError(f"unknown sampler {args.sampler!r}: --sampler must be one of {', '.join(known)}")
    device = resolve_device(args.device)
    model, info = load_model(args.ckpt, model_name=args.model)
    tc = info.get("train_config") or {}
    model.to(device)

    vae_spec = args.vae or info.get("vae_spec") or tc.get("vae")
    vae = None
    if vae_spec:
        from dits.vae import check_latent_channels, load_autoencoder
        vae = load_autoencoder(vae_spec, scaling_factor=args.vae_scale or tc.get("vae_scale"), device=device)
        check_latent_channels(vae, model.in_channels)
    elif not tc and model.in_channels == 4:
        raise UserError("this looks like a latent-space model: pass --vae (e.g. stabilityai/sd-vae-ft-ema "
                        "or a local AutoencoderKL directory) to decode its samples")

    from dits.objectives import DEFAULT_SAMPLER, check_sampler, default_steps, objective_of
    objective = objective_of(info)
    sampler = check_sampler(objective, args.sampler or tc.get("sampler") or DEFAULT_SAMPLER[objective])
    if args.steps:
        steps = args.steps
    elif sampler == tc.get("sampler") and tc.get("sample_steps"):
        steps = tc["sample_steps"]  # the run's previews: what its grids showed
    else:
        steps = default_steps(sampler)
    interval = args.guidance_interval if args.guidance_interval is not None else tc.get("guidance_interval")
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else tc.get("cfg_scale", 4.0)
    k = model.num_classes
    if model.config.text or prompts is not None:
        k = _check_text_request(model, args, prompts)
    if k == 0:
        cfg_scale = 1.0 if args.cfg_scale is None else cfg_scale
    labels = None
    if args.classes:
        try:
            cls = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise UserError(f"--class takes comma-separated integers, got {args.classes!r}") from None
        n = args.num_samples or len(cls) * (8 if kind == ".png" else 1)
        labels = torch.tensor(cls).repeat(-(-n // len(cls)))[:n]
        if kind == ".png":
            labels = labels.sort(stable=True).values
    else:
        n = args.num_samples or ((k if k else 8) * 8 if kind == ".png" else 100)
        if kind == ".png" and k:
            labels = (torch.arange(n) * k // n).long()  # rows of classes, in order
    images, labs = generate(model, n, labels=labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                            guided_channels=args.guided_channels, seed=args.seed, batch_size=args.batch_size,
                            vae=vae, objective=objective, guidance_interval=interval,
                            diffusion_steps=tc.get("diffusion_steps", 1000),
                            noise_schedule=tc.get("noise_schedule", "linear"), device=device,
                            progress=not args.no_progress, prompts=prompts, max_text_tokens=args.max_text_tokens,
                            plan=args.plan, compile=args.compile, say=_say)
    if kind == ".npz":
        save_npz(out, images, labs, prompts=prompts)
    elif kind == ".png":
        ncol = int(np.bincount(labs).max()) if k and labels is not None else 8
        if prompts is not None:
            rows = [prompts[i] for i in np.unique(labs)]
        else:  # a per-class grid: one row per class, named (the built-in data's class names, else the index)
            even = k and labels is not None and (np.bincount(labs)[np.unique(labs)] == ncol).all()
            rows = class_row_labels(np.unique(labs), tc.get("data")) if even else None
        save_grid(images, out, ncol=max(1, min(ncol, 32)), row_labels=rows if rows and ncol <= 32 else None)
    else:
        save_folder(out, images, labs)
    extra = f", guidance interval {interval}" if interval and cfg_scale != 1 else ""
    print(f"wrote {n} samples ({objective} {sampler}, {steps} steps, cfg {cfg_scale}{extra}) from {info['source']} "
          f"({info['weights']} weights) to {out}")
    return 0


def _prompts(args) -> list | None:
    """The prompts typed (--prompt, repeatable) and read (--prompts FILE), in that order; None if none."""
    prompts = [p for p in (args.prompt or [])]
    if any(not p.strip() for p in prompts):
        raise UserError("--prompt is empty; pass the text to sample, e.g. --prompt 'a handwritten seven'")
    if args.prompts_file:
        from dits.text.prompts import read_prompts
        prompts += read_prompts(args.prompts_file)
    if prompts and args.classes:
        raise UserError("--class and --prompt/--prompts exclude each other: a model takes class labels or text")
    if not prompts and args.max_text_tokens is not None:
        raise UserError("--max-text-tokens applies to prompts; pass --prompt TEXT or --prompts FILE")
    return prompts or None


def _check_text_request(model, args, prompts) -> int:
    """Prompts on a text model (their count is the number of 'classes'); one line otherwise."""
    if not model.config.text:
        kind = "class-conditional: use --class" if model.num_classes else "unconditional"
        raise UserError(f"--prompt needs a text-conditional model; this one is {kind}")
    if args.classes:
        raise UserError("this model is text-conditional: pass --prompt TEXT or --prompts FILE, not --class")
    if prompts is None:
        raise UserError("this model is text-conditional: pass --prompt TEXT (repeatable) or --prompts FILE")
    from dits.text.prompts import check_max_tokens
    check_max_tokens(model.config, args.max_text_tokens)
    return len(prompts)


def _writable(d: Path) -> bool:
    import os
    d = d if str(d) else Path(".")
    while not d.exists() and d != d.parent:
        d = d.parent
    return d.is_dir() and os.access(d, os.W_OK)


def _say(line: str) -> None:
    import sys
    print(f"dits sample: {line}", file=sys.stderr, flush=True)
