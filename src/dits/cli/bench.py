"""``dits bench``: reproducible benchmarks.

- ``dits bench samplers [--quick]``: each sampler's error against the number of network
  evaluations (NFE) on data whose exact denoiser is known (see dits.bench.samplers).
- ``dits bench train`` / ``dits bench sample``: speed of the trainer's step and of the
  sampler at any model size, batch, precision, plan and device; with ``--official PATH`` side
  by side with the official DiT code, each contender in its own process (see dits.bench.speed);
  ``--plan all`` times every candidate plan, ``--torch-info`` prints what the figures depend on.
- ``dits bench flow --diffusion RUN --flow RUN``: the two objectives compared on the digits
  (see dits.bench.flow and docs/flow.md).
- ``dits bench convergence [--variants ...]``: time to quality of the training options, each an
  ordinary `dits train` run against the preset's (see dits.bench.convergence, docs/convergence.md).
"""
from __future__ import annotations

import os

PRESET_SHAPES = {  # --preset: the model and data shape of a training preset
    "digits": dict(model="DiT", depth=4, hidden_size=128, num_heads=4, patch_size=2, input_size=8, in_channels=1,
                   num_classes=10, batch=64),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark (samplers, train, sample)",
                              description="Reproducible benchmarks.")
    targets = p.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True
    s = targets.add_parser("samplers", help="sampler error against NFE (DDPM, DDIM, DPM-Solver++, Heun)",
                           description="Sampler error (W1 to the true distribution) against NFE, with an exact "
                                       "denoiser for a Gaussian and a Gaussian mixture. About 40 s on 2 CPU cores; "
                                       "--quick takes a few seconds.")
    # torch is imported only when the command runs, so `dits --help` stays fast.
    s.add_argument("--quick", action="store_true", help="fewer samples and NFE (5, 10, 20, 50)")
    s.add_argument("--samples", type=int, default=None, help="samples per run (default 2^18, quick 2^14)")
    s.add_argument("--seed", type=int, default=0, help="seed for x_T and DDPM's noise (default 0)")
    s.set_defaults(func=_samplers)
    _register_flow(targets)
    _register_convergence(targets)

    t = targets.add_parser("train", help="training step speed (optionally against the official code)",
                           description="Time `dits train`'s step (its defaults) at a model size, batch and precision: "
                                       "ms/step, images/s, TFLOP/s, MFU against a matmul peak measured in the same "
                                       "run, peak memory. With --official, the official DiT loop body runs too, "
                                       "each contender alone in its own process, alternated round by round, and "
                                       "the ratio is printed.")
    _common(t, batch_default=None)
    t.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per block")
    t.add_argument("--attention", choices=("auto", "sdpa", "math"), default="auto",
                   help="force an attention kernel (default auto: the plan's)")
    t.add_argument("--plan", default="auto", metavar="PLAN",
                   help="auto (what `dits train` would choose for the run: cache or probe), a plan name "
                        "(e.g. eager+onednn+sdpa, compile-blocks), a comma-separated list of them, or all: every "
                        "candidate plan side by side")
    t.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    t.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported (default 5)")
    t.set_defaults(func=_train)

    m = targets.add_parser("sample", help="sampling speed (optionally against the official code)",
                           description="Time dits.sample.generate (what `dits sample` runs) on one batch; with "
                                       "--official, the official p_sample_loop with forward_with_cfg, each "
                                       "contender in its own process, alternated.")
    _common(m, batch_default=None)
    m.add_argument("--sampler", default="ddpm", help="ddpm | ddim | dpm++ | heun (default ddpm)")
    m.add_argument("--sample-steps", type=int, default=250, help="sampling steps (default 250)")
    m.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale (default 4.0)")
    m.add_argument("--plan", default="auto", metavar="PLAN",
                   help="auto (what `dits sample` would choose for a run of --run-samples: cache or probe), a plan "
                        "name (e.g. eager+mkl+math, compile-model), a comma-separated list of them, or all: every "
                        "candidate plan side by side")
    m.add_argument("--run-samples", type=int, default=50_000,
                   help="the sampling run the plan is chosen for, in samples (default 50,000: FID's)")
    m.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    m.set_defaults(func=_sample)


def _common(p, batch_default) -> None:
    p.add_argument("--preset", choices=sorted(PRESET_SHAPES), default=None,
                   help="take the model, data shape and recipe of a training preset (digits: depth 4, width 128, 8x8x1, "
                        "b64), with the official code's objective, Gaussian diffusion")
    p.add_argument("--model", default="DiT-S/2", help="DiT-S/2 ... DiT-XL/8, or DiT with the sizes below (default DiT-S/2)")
    for name in ("depth", "hidden-size", "num-heads", "patch-size"):
        p.add_argument(f"--{name}", type=int, default=None, help="custom size (with --model DiT)")
    p.add_argument("--image-size", type=int, default=None, help="latent/pixel side the model sees (default 32)")
    p.add_argument("--channels", type=int, default=None, help="input channels (default 3)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default 1000)")
    p.add_argument("--batch", type=int, default=batch_default, help="batch size (default 8; digits 64)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile (default auto, as `dits train`)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default), or this process's CPU time: steadier on a shared CPU (one thread)")
    p.add_argument("--official", metavar="PATH", default=None,
                   help="a facebookresearch/DiT checkout (models.py + diffusion/) to compare with; never part of dits")
    p.add_argument("--official-path", metavar="DIR", action="append", default=[],
                   help="extra sys.path entry for the official code's imports (timm); repeatable; also "
                        "DITS_BENCH_PATH (':'-separated)")
    p.add_argument("--isolation", choices=("process", "shared"), default="process",
                   help="process (default): each contender alone in its own process; shared: all interleaved in "
                        "this one (the old way, which slows the reference after dits' compiled graphs)")
    p.add_argument("--torch-info", action="store_true",
                   help="first print the CPU/GPU model, ISA, torch / MKL / oneDNN versions and matmul peaks")


def _setup(args):
    from dits.bench import Setup
    from dits.errors import UserError

    v = dict(PRESET_SHAPES.get(args.preset, {}))
    # the preset's recipe and run length, as `dits train` runs them; the objective stays diffusion, the
    # official code's (the digits preset trains flow: `dits train --preset digits --objective diffusion`)
    if args.preset:
        from dits.config import resolve_config
        cfg = resolve_config(args.preset, {"objective": "diffusion"})
        v.update(run_steps=cfg.steps, grad_clip=cfg.grad_clip, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                 ema_decay=cfg.ema_decay, ema_warmup=cfg.ema_warmup)
    given = {"model": None if args.model == "DiT-S/2" and args.preset else args.model, "depth": args.depth,
             "hidden_size": args.hidden_size, "num_heads": args.num_heads, "patch_size": args.patch_size,
             "input_size": args.image_size, "in_channels": args.channels, "num_classes": args.num_classes,
             "batch": args.batch}
    v.update({k: x for k, x in given.items() if x is not None})
    v.setdefault("input_size", 32)
    v.setdefault("in_channels", 3)
    v.setdefault("num_classes", 1000)
    v.setdefault("batch", 8)
    if v["model"] != "DiT":
        v.update(depth=None, hidden_size=None, num_heads=None, patch_size=None)
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    if v["batch"] < 1:
        raise UserError(f"--batch must be >= 1, got {v['batch']}")
    extra = dict(precision=args.precision, compile=args.compile, device=args.device)
    plan = getattr(args, "plan", "auto")
    if plan not in ("auto", "all"):
        from dits.bench.speed import plan_names
        plan_names(plan)  # checked before any work
    for k in ("sampler", "sample_steps", "cfg_scale", "grad_checkpoint", "run_samples"):
        if hasattr(args, k):
            extra[k] = getattr(args, k)
    return Setup(**v, **extra)


def _extra_paths(args) -> list[str]:
    env = [p for p in os.environ.get("DITS_BENCH_PATH", "").split(":") if p]
    return list(args.official_path) + env


def _header(kind: str, s, args) -> None:
    size = s.model if s.model != "DiT" else f"DiT depth {s.depth} width {s.hidden_size} heads {s.num_heads} patch {s.patch_size}"
    plan = (f", plan {args.plan} (for a {s.run_steps:,}-step run)" if kind == "train" else
            f", plan {args.plan} (for a {s.run_samples:,}-sample run)")
    print(f"dits bench {kind}: {size}, {s.input_size}x{s.input_size}x{s.in_channels}, batch {s.batch}, "
          f"{s.precision}, compile {s.compile}{plan}, {s.device}", flush=True)
    if args.torch_info:
        from dits.bench import torch_info
        for line in torch_info(s.device):
            print(f"  {line}", flush=True)


def _train(args) -> int:
    from dits.bench import bench_train

    s = _setup(args)
    if args.steps < 1 or args.rounds < 1:
        from dits.errors import UserError
        raise UserError("--steps and --rounds must be >= 1")
    _header("train", s, args)
    print(bench_train(s, args.official, _extra_paths(args), rounds=args.rounds, per_round=args.steps,
                      attention=args.attention, clock=args.clock, isolation=args.isolation, plan=args.plan))
    return 0


def _sample(args) -> int:
    from dits.bench import bench_sample

    s = _setup(args)
    if args.rounds < 1 or args.sample_steps < 1 or args.run_samples < 1:
        from dits.errors import UserError
        raise UserError("--rounds, --sample-steps and --run-samples must be >= 1")
    _header("sample", s, args)
    print(bench_sample(s, args.official, _extra_paths(args), rounds=args.rounds, clock=args.clock,
                       isolation=args.isolation, plan=args.plan))
    return 0


def _samplers(args) -> int:
    from dits.bench import samplers
    return samplers.run_from_args(args)


def _register_flow(targets) -> None:
    f = targets.add_parser("flow", help="diffusion vs flow matching on the digits: quality against NFE, "
                                        "interval vs constant guidance",
                           description="Score two trained digits runs (one per objective) with the digits metric: "
                                       "each sampler against NFE, and interval vs constant guidance. Results are "
                                       "cached in OUT/results.json; see docs/flow.md for the commands and times.")
    f.add_argument("--diffusion", required=True, metavar="RUN", help="run dir (or checkpoint) of a diffusion model")
    f.add_argument("--flow", required=True, metavar="RUN", help="run dir (or checkpoint) of a flow model")
    f.add_argument("--out", default="flow-bench", help="where results.json, the table and the plots go")
    f.add_argument("--samples", type=int, default=1000, help="samples per evaluation (default 1000)")
    f.add_argument("--nfe", default="10,20,50,250", help="target model calls per sample (default 10,20,50,250; "
                                                         "only ddpm and sde run 250 and more)")
    f.add_argument("--scales", default="1,1.3,2,3", help="guidance scales for the interval comparison")
    f.add_argument("--interval", action="append", metavar="LO,HI",
                   help="guidance interval(s) to compare with constant guidance (default 0.2,0.8; repeatable)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_flow)


def _flow(args) -> int:
    from dits.bench import flow
    return flow.run_from_args(args)


def _register_convergence(targets) -> None:
    from dits.bench.convergence import DEFAULT_EVAL_SAMPLES, EVALS_PER_RUN, VARIANTS

    c = targets.add_parser("convergence", help="time to quality: the baseline preset and each training option, "
                                               "quality vs steps and vs seconds",
                           description="Train the data set's preset (the baseline) and each variant (extra `dits "
                                       "train` flags) at the same steps, several seeds, evaluating often; write "
                                       "OUT/convergence.csv, convergence.md (final metrics, steps and seconds to the "
                                       "baseline's final held-out FD and loss) and convergence_{steps,seconds}.png. "
                                       "Resumable: rerun the same command to continue. docs/convergence.md.")
    c.add_argument("--data", default="digits", help="built-in data set: digits (default) | glyphs (the testbed)")
    c.add_argument("--variants", default=None, metavar="NAME,NAME",
                   help=f"variants to run besides the baseline (always run): {', '.join(VARIANTS)}; default: every "
                        "one this dits train has the flags for")
    c.add_argument("--variant", action="append", default=[], metavar="NAME='FLAGS'",
                   help="a variant of your own, e.g. lr1e-3='--lr 1e-3' (repeatable; run in addition to --variants)")
    c.add_argument("--seeds", type=int, default=2, help="seeds per variant, 0..N-1 (default 2)")
    c.add_argument("--steps", type=int, default=None, help="steps of every run (default: the preset's)")
    c.add_argument("--eval-every", type=int, default=None,
                   help=f"evaluate (and checkpoint) every K steps (default steps / {EVALS_PER_RUN})")
    c.add_argument("--eval-samples", type=int, default=DEFAULT_EVAL_SAMPLES,
                   help=f"samples per evaluation (default {DEFAULT_EVAL_SAMPLES})")
    c.add_argument("--train-args", default=None, metavar="'FLAGS'",
                   help="extra `dits train` flags for every run, the baseline too (e.g. '--depth 2' for a quick look)")
    c.add_argument("--jobs", type=int, default=1, help="runs trained in parallel (at most the CPU cores; "
                                                       "seconds then share the machine)")
    c.add_argument("--out", default=None, help="output directory (default convergence-DATA)")
    c.add_argument("--report-only", action="store_true", help="only (re)write the report from the run dirs")
    c.set_defaults(func=_convergence)


def _convergence(args) -> int:
    from dits.bench import convergence
    return convergence.run_from_args(args)
