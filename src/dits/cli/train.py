"""``dits train``: a thin layer over ``dits.train.train``.

Every ``TrainConfig`` field is a flag (``--batch-size``, ``--ema-decay``, ...), so a preset
and the command line can set the same things. The flags the user typed are passed down as
such: on ``--resume`` each one is applied or refused, never ignored (``dits.config.ON_RESUME``).
"""
from __future__ import annotations

import argparse

HELP = {
    "data": "a built-in set ('digits'; 'glyphs', the study testbed) or an image folder (class subfolders = "
            "labels, flat = unconditional)",
    "latents": "latent cache from `dits extract-latents` (trains without loading the VAE)",
    "vae": "diffusers AutoencoderKL hub id or directory (latent space); default pixel space",
    "model": "DiT-S/2 ... DiT-XL/8, or DiT with --depth/--hidden-size/--num-heads/--patch-size",
    "block": "adaln-zero | adaln | cross-attn | in-context",
    "backbone": "dit | unet (diffusers' UNet2DModel, ADM-style; docs/backbones.md)",
    "unet_channels": "--backbone unet: width of each resolution level, comma-separated, e.g. 16,32 (64,128,128)",
    "unet_layers": "--backbone unet: residual blocks per level (2)",
    "steps": "total optimisation steps",
    "batch_size": "global batch size (over all processes)",
    "precision": "fp32 | bf16 | fp16 (autocast; fp16 uses a grad scaler)",
    "out": "run directory",
    "ckpt_every": "checkpoint every K steps",
    "sample_every": "preview grid (and digits metric) every K steps; 0 = --ckpt-every",
    "sampler": "sampler for previews and evaluation: ddpm | ddim | dpm++ | heun (diffusion), "
               "euler | heun | sde (flow); default per objective",
    "objective": "diffusion (DiT) | flow (linear interpolant, velocity prediction; docs/flow.md)",
    "learn_sigma": "learned variance channels; default: on for diffusion, off for flow",
    "guidance_interval": "LO,HI: previews guide only at noise levels in [LO, HI] (0 data .. 1 noise)",
    "eval_samples": "samples for the digits metric (0 = off)",
    "loss_weighting": "uniform (the paper) | min-snr[:GAMMA] (weights L_simple by min(SNR, GAMMA)/SNR; GAMMA 5)",
    "t_sampling": "uniform | logit-normal[:M,S] (flow only: t = sigmoid(M + S z); default 0,1)",
    "mlp": "gelu (the paper's MLP) | swiglu (SwiGLU, hidden 2/3 of 4D rounded up to 8: about the same size)",
    "norm": "layernorm (the paper) | rmsnorm (every norm of the blocks and final layer; same eps, same affine)",
    "pos": "sincos (the paper's fixed additive table) | rope (2-D rotary embedding on q, k; no pos_embed; "
           "not with --block in-context)",
    "adam_beta2": "AdamW's beta2 (the reference and torch: 0.999; LightningDiT: 0.95)",
    "mask_ratio": "masked training (MaskDiT): the fraction R in [0, 1) of patch tokens the encoder does not see "
                  "(0 = off; docs/convergence.md)",
    "mask_decoder_depth": "with --mask-ratio: decoder blocks over the full sequence (2; MaskDiT-XL: 8)",
    "mask_loss_weight": "with --mask-ratio: weight of the masked tokens' reconstruction (MAE) term",
    "unmask_steps": "with --mask-ratio: the last N steps train unmasked (N <= --steps)",
    "device": "auto | cpu | cuda | cuda:N",
    "init": "fine-tune: start model and EMA from a run dir, .pt, .safetensors, diffusers dir or Hub id "
            "(fresh optimiser, step 0)",
    "on_nonfinite": "on a NaN/inf loss or grad norm: stop (exit non-zero, last good checkpoint kept) | skip",
    "keep_last": "keep only the K newest checkpoints (0 = all)",
    "keep_every": "with --keep-last: also keep every checkpoint whose step is a multiple of M",
    "compile": "auto | on | off: torch.compile the model (auto: as the measured plan decides, see --plan)",
    "plan": "auto | MODE[+GEMM][+ATTENTION], e.g. eager+onednn+sdpa, compile-blocks: how the step runs (auto: "
            "timed on this machine for this run's length, cached; docs/performance.md)",
    "grad_checkpoint": "true | false: recompute block activations in backward (less memory)",
    "text_encoder": "text conditioning: learned (a small transformer over the captions' words, trained with the "
                    "DiT, no download) or a CLIP text model / T5 encoder Hub id or directory (frozen; dits[text]); "
                    "docs/text.md",
    "captions": "captions: FILE.jsonl (file_name, text per line), or digits (built-in); default FOLDER/metadata.jsonl "
                "or the latent cache's",
    "max_text_tokens": "caption tokens (default: learned: the longest caption; frozen encoder: 77)",
    "text_adaln": "how text reaches adaln/adaln-zero blocks: pooled (c = t + pooled caption) | cross-attn "
                  "(PixArt-alpha: adaLN on t, cross-attention to the tokens) | both",
    "log": "tensorboard | wandb | none: logging sinks besides metrics.jsonl; repeat the flag or separate with "
           "commas (tensorboard: RUN_DIR/tensorboard, extra dits[tb]; wandb: extra dits[wandb], WANDB_MODE=offline "
           "works without an account); rank 0 only, --resume continues the same curves",
}


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _flag_type(annotation: str):
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "float": float, "bool": _bool}.get(base, str)


def register(sub) -> None:
    from dits.config import TrainConfig, load_preset

    digits = load_preset("digits")
    p = sub.add_parser("train", help="train a DiT (the built-in digits by default)",
                       description="Train a DiT. A bare `dits train` trains the digits preset (a 1.3M-param DiT "
                                   "on the built-in 8x8 digits, a few minutes on a CPU; rectified flow with logit-normal t, "
                                   "measured fastest to quality, --objective diffusion for the paper's Gaussian "
                                   "diffusion) into runs/digits; "
                                   "--preset imagenet256 is the paper's recipe. Defaults below are the digits "
                                   "preset's where it sets one, else the paper's (used with --data/--latents).")
    p.add_argument("--preset", default=None, help="preset name (digits, imagenet256) or a YAML file")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a run from its latest checkpoint; typed flags apply if they may change "
                        "(steps, lr, sampling, logging, devices, fsdp, precision), else are refused")
    p.add_argument("--overwrite", action="store_true", help="let --out replace the run already there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, field in TrainConfig.fields().items():
        ann = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "str")
        default = f"default {field.default!r}"
        if name in digits and digits[name] != field.default:
            default = f"digits {digits[name]!r}, else {field.default!r}"
        if name == "log":  # repeatable: --log tensorboard --log wandb, or --log tensorboard,wandb
            p.add_argument("--log", dest=name, action="append", default=None, metavar="BACKEND",
                           help=f"{HELP[name]} ({default})")
            continue
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_flag_type(ann), default=None,
                       help=f"{HELP.get(name, '')} ({default})".strip())
    p.set_defaults(func=run)


def run(args) -> int:
    from dits.config import TrainConfig, resolve_config
    from dits.data.builtin import is_builtin
    from dits.train import train

    overrides = {k: getattr(args, k) for k in TrainConfig.fields()}
    if overrides.get("log") is not None:
        overrides["log"] = ",".join(overrides["log"])  # the repeated flags, as one value
    preset = args.preset
    if preset is None and not args.resume and (args.data is None or is_builtin(args.data)) and not args.latents:
        preset = args.data or "digits"  # a built-in set trains with its own preset
    cfg = resolve_config(preset, overrides)
    typed = {k for k, v in overrides.items() if v is not None}
    if args.preset and args.resume:
        from dits.config import load_preset
        typed |= set(load_preset(args.preset)) - {"out"}  # a preset typed on resume counts, key by key
    summary = train(cfg, resume=args.resume, progress=not args.no_progress, typed=typed, overwrite=args.overwrite)
    if summary.get("stopped_by"):
        return summary["exit_code"]  # preempted: the checkpoint is written, the job is not done
    if summary:
        print(f"done: run dir {summary.get('run_dir')}; samples {summary.get('samples')}")
        if summary.get("digits_text"):
            from dits.text.digits import format_report
            print(format_report(summary["digits_text"]))
        m = summary.get("digits_metric")
        if m:
            from dits.evaluate.builtin import format_metric
            data = summary.get("data", cfg.data)  # the run's own data set (on --resume, not the flags')
            print(f"{data} metric:", format_metric(data, m))
    return 0
