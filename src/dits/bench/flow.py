"""``dits bench flow``: diffusion vs flow matching on the digits, from two trained runs.

Two questions, answered with the digits metric (independent SVC accuracy, held-out FD as a
multiple of the real-data level; docs/evaluation.md) on ``samples`` samples each:

1. **Quality against NFE**: the diffusion run with ddpm / ddim / dpm++ and the flow run with
   euler / heun / sde, at each target number of model calls (heun: the odd count 2·steps − 1
   at or below it), all with the run's guidance scale. Only the stochastic defaults (ddpm,
   sde) run at 250 calls and more (the ODE solvers have converged long before; CPU is scarce).
2. **Interval vs constant guidance**: each run with its preview sampler at several guidance
   scales, guided everywhere or only inside each interval (flow-t noise scale), with the NFE
   each costs (a guided call counts twice).

Every evaluation is cached in ``OUT/results.json`` (keyed by its settings), so a rerun only
computes what is missing; ``OUT/flow_nfe.png``, ``OUT/flow_guidance.png`` and ``OUT/flow_bench.md``
are rewritten from it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from dits.errors import UserError

NFES = (10, 20, 50, 250)
SAMPLERS = {"diffusion": ("ddpm", "ddim", "dpm++"), "flow": ("euler", "heun", "sde")}
LONG = ("ddpm", "sde")              # the stochastic defaults: the only ones run at LONG_NFE and above
LONG_NFE = 250
SCALES = (1.0, 1.3, 2.0, 3.0)
INTERVALS = ((0.2, 0.8),)


def steps_for_nfe(objective: str, sampler: str, target: int) -> int:
    """Steps whose unguided model calls are ``target`` (flow heun: 2·steps − 1 ≤ target)."""
    return (target + 1) // 2 if (objective, sampler) == ("flow", "heun") else target


def _load(run: str, objective: str):
    from dits.checkpoint import load_model
    from dits.objectives import objective_of

    model, info = load_model(run)
    if objective_of(info) != objective:
        raise UserError(f"--{objective} {run} holds a {objective_of(info)} model")
    if model.in_channels != 1 or model.input_size != 8 or model.num_classes != 10:
        raise UserError(f"{run} is not a digits model (1x8x8, 10 classes)")
    return model, info


def evaluate(model, objective: str, sampler: str, steps: int, cfg_scale: float, interval, samples: int,
             seed: int = 0) -> dict:
    """Sample ``samples`` balanced digits and score them; returns the numbers and the cost."""
    from dits.evaluate.digits import digits_metric, svc_accuracy
    from dits.objectives import count_nfe
    from dits.sample import generate

    start = time.perf_counter()
    images, labels = generate(model, samples, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                              batch_size=500, objective=objective, guidance_interval=interval)
    seconds = time.perf_counter() - start
    m = digits_metric(images, labels)
    return {"objective": objective, "sampler": sampler, "steps": steps, "cfg_scale": cfg_scale,
            "interval": list(interval) if interval else None, "samples": samples,
            "calls": count_nfe(objective, sampler, steps),
            "nfe": count_nfe(objective, sampler, steps, cfg_scale, interval),
            "svc_accuracy": svc_accuracy(images, labels), "mlp_accuracy": m["accuracy"], "fd": m["fd"],
            "fd_heldout_ratio": m["fd_heldout"] / m["fd_heldout_floor"], "sample_seconds": round(seconds, 2)}


def _key(objective, sampler, steps, cfg, interval, samples, seed) -> str:
    iv = "-" if not interval else f"{interval[0]:g},{interval[1]:g}"
    return f"{objective}|{sampler}|{steps}|{cfg:g}|{iv}|{samples}|{seed}"


def plan(cfgs: dict, nfes, scales, intervals) -> list[tuple]:
    """Every (objective, sampler, steps, cfg, interval) the bench evaluates."""
    jobs = []
    for objective in ("diffusion", "flow"):
        for sampler in SAMPLERS[objective]:
            for target in nfes:
                if target >= LONG_NFE and sampler not in LONG:
                    continue
                jobs.append((objective, sampler, steps_for_nfe(objective, sampler, target), cfgs[objective], None))
    for objective in ("diffusion", "flow"):
        sampler, steps = cfgs[objective + "_preview"]
        for s in scales:
            for iv in (None, *intervals) if s != 1 else (None,):
                jobs.append((objective, sampler, steps, s, iv))
    return list(dict.fromkeys(jobs))


def run(diffusion_run: str, flow_run: str, out_dir: str | Path, *, samples: int = 1000, nfes=NFES,
        scales=SCALES, intervals=INTERVALS, seed: int = 0, out=print) -> dict:
    from dits.fileio import write_json_atomic
    from dits.objectives import DEFAULT_SAMPLER

    models, cfgs = {}, {}
    for objective, run_dir in (("diffusion", diffusion_run), ("flow", flow_run)):
        model, info = _load(run_dir, objective)
        tc = info.get("train_config") or {}
        models[objective] = (model, info)
        cfgs[objective] = float(tc.get("cfg_scale", 1.0))
        cfgs[objective + "_preview"] = (tc.get("sampler") or DEFAULT_SAMPLER[objective], int(tc.get("sample_steps", 50)))
    steps_d, steps_f = models["diffusion"][1].get("step"), models["flow"][1].get("step")
    out(f"dits bench flow: diffusion {models['diffusion'][1]['source']} (step {steps_d}) vs flow "
        f"{models['flow'][1]['source']} (step {steps_f}); {samples} samples per evaluation")
    if steps_d != steps_f:
        out(f"  note: the runs were trained for different numbers of steps ({steps_d} vs {steps_f})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_file = out_dir / "results.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    jobs = plan(cfgs, nfes, scales, intervals)
    start = time.perf_counter()
    for i, (objective, sampler, steps, cfg, iv) in enumerate(jobs):
        key = _key(objective, sampler, steps, cfg, iv, samples, seed)
        if key not in cache:
            cache[key] = evaluate(models[objective][0], objective, sampler, steps, cfg, iv, samples, seed)
            write_json_atomic(cache_file, cache)
        r = cache[key]
        out(f"[{i + 1}/{len(jobs)}] {objective:9s} {sampler:5s} steps {steps:3d} cfg {cfg:g} "
            f"interval {r['interval'] or '-'}: NFE {r['nfe']}, SVC {100 * r['svc_accuracy']:.1f}%, "
            f"held-out FD {r['fd_heldout_ratio']:.2f}x ({r['sample_seconds']:.0f} s)")
    results = [cache[_key(*j, samples, seed)] for j in jobs]
    meta = {"diffusion_run": str(diffusion_run), "flow_run": str(flow_run), "steps": [steps_d, steps_f],
            "samples": samples, "seed": seed, "cfg_scale": {k: cfgs[k] for k in ("diffusion", "flow")},
            "preview": {k: cfgs[k + "_preview"] for k in ("diffusion", "flow")}}
    report(results, meta, out_dir)
    out(f"wrote {out_dir / 'flow_bench.md'}, {out_dir / 'flow_nfe.png'}, {out_dir / 'flow_guidance.png'} "
        f"({time.perf_counter() - start:.0f} s)")
    return {"meta": meta, "results": results}


# ----------------------------------------------------------------------------- report
def _fmt(r: dict) -> str:
    iv = f"{r['interval'][0]:g}–{r['interval'][1]:g}" if r["interval"] else ("constant" if r["cfg_scale"] != 1 else "none")
    return (f"| {r['objective']} | {r['sampler']} | {r['steps']} | {r['calls']} | {r['cfg_scale']:g} | {iv} | {r['nfe']} | "
            f"{100 * r['svc_accuracy']:.1f} % | {r['fd']:.3f} | {r['fd_heldout_ratio']:.2f}× |")


def report(results: list[dict], meta: dict, out_dir: Path) -> None:
    from dits.fileio import write_text_atomic

    head = ("| objective | sampler | steps | calls | cfg | guidance | NFE | SVC acc. | FD | held-out FD / real |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    sweep = [r for r in results if r["cfg_scale"] == meta["cfg_scale"][r["objective"]] and not r["interval"]]
    guide = [r for r in results if [r["sampler"], r["steps"]] == list(meta["preview"][r["objective"]])]
    text = [f"Digits, {meta['samples']} samples per row, seed {meta['seed']}; runs at steps {meta['steps']}.",
            "calls = model calls per sample; NFE = the same with a guided call counting 2.", "",
            "### Quality against NFE (each run's guidance scale)", "", head,
            *(_fmt(r) for r in sorted(sweep, key=lambda r: (r["objective"], r["sampler"], r["calls"]))), "",
            "### Interval vs constant guidance (each run's preview sampler)", "", head,
            *(_fmt(r) for r in sorted(guide, key=lambda r: (r["objective"], r["cfg_scale"], bool(r["interval"]))))]
    write_text_atomic(out_dir / "flow_bench.md", "\n".join(text) + "\n")
    _plot_nfe(sweep, out_dir / "flow_nfe.png")
    _plot_guidance(guide, out_dir / "flow_guidance.png")


def _figure(nrows: int, ncols: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), dpi=100, squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path: Path) -> None:
    """Write a benchmark figure, naming at its foot the machine it was measured on (this one)."""
    import torch

    from dits.fileio import atomic_write
    from dits.plan import cpu_name

    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.text(0.995, 0.003, f"measured on {cpu_name()}, torch {torch.__version__}", ha="right", va="bottom",
             fontsize=6, color="0.35")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _plot_nfe(rows: list[dict], path: Path) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    plt, fig, axes = _figure(1, 2)
    a1, a2 = axes[0]
    for (objective, sampler) in sorted({(r["objective"], r["sampler"]) for r in rows}):
        pts = sorted((r["calls"], r) for r in rows if (r["objective"], r["sampler"]) == (objective, sampler))
        style = "-o" if objective == "diffusion" else "--s"
        label = f"{objective} {sampler}"
        a1.plot([c for c, _ in pts], [r["fd_heldout_ratio"] for _, r in pts], style, label=label)
        a2.plot([c for c, _ in pts], [100 * r["svc_accuracy"] for _, r in pts], style, label=label)
    # tick the targets, not heun's odd counts next to them (9 beside 10 would overlap)
    calls = sorted({r["calls"] for r in rows if (r["objective"], r["sampler"]) != ("flow", "heun")})
    for ax, name in ((a1, "held-out FD / real-data level (lower is better; bar: 2x)"),
                     (a2, "SVC class accuracy, % (bar: 98)")):
        ax.set_xscale("log")
        ax.set_xticks(calls)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("model calls per sample (before guidance doubles them)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    a1.axhline(2.0, color="grey", lw=0.8, ls=":")
    a2.axhline(98.0, color="grey", lw=0.8, ls=":")
    a1.legend(fontsize=8)
    _save(plt, fig, path)


def _plot_guidance(rows: list[dict], path: Path) -> None:
    objectives = sorted({r["objective"] for r in rows})
    plt, fig, axes = _figure(len(objectives), 2)
    for (a1, a2), objective in zip(axes, objectives):
        mine = [r for r in rows if r["objective"] == objective]
        intervals = sorted({tuple(r["interval"]) for r in mine if r["interval"]})
        for iv, marker in zip((None, *intervals), "o^vsdx"):
            # scale 1 (no guidance) starts every line; then constant or this interval's rows
            pts = sorted((r["cfg_scale"], r) for r in mine if r["cfg_scale"] == 1
                         or (tuple(r["interval"]) if r["interval"] else None) == iv)
            nfe = ", ".join(sorted({str(r["nfe"]) for _, r in pts if r["cfg_scale"] != 1}))
            label = (f"interval {iv[0]:g}–{iv[1]:g}" if iv else "constant") + f" (NFE {nfe})"
            style = ("-" if iv is None else "--") + marker
            a1.plot([c for c, _ in pts], [r["fd_heldout_ratio"] for _, r in pts], style, label=label)
            a2.plot([c for c, _ in pts], [100 * r["svc_accuracy"] for _, r in pts], style, label=label)
        sampler = f"{mine[0]['sampler']} {mine[0]['steps']} steps"
        for ax, name in ((a1, "held-out FD / real-data level"), (a2, "SVC class accuracy, %")):
            ax.set_xlabel("guidance scale")
            ax.set_title(f"{objective} ({sampler}): {name}", fontsize=10)
            ax.grid(alpha=0.3)
        a1.legend(fontsize=8)
    _save(plt, fig, path)


def run_from_args(args) -> int:
    from dits.diffusion.guidance import parse_interval

    def ints(s):
        try:
            v = tuple(int(x) for x in s.split(","))
        except ValueError:
            raise UserError(f"--nfe takes comma-separated integers, got {s!r}") from None
        if not v or min(v) < 1:
            raise UserError(f"--nfe values must be >= 1, got {s!r}")
        return v

    def floats(s):
        try:
            return tuple(float(x) for x in s.split(","))
        except ValueError:
            raise UserError(f"--scales takes comma-separated numbers, got {s!r}") from None

    if args.samples < 100:
        raise UserError(f"--samples must be at least 100 (the held-out FD needs them), got {args.samples}")
    intervals = tuple(parse_interval(s) for s in args.interval) if args.interval else INTERVALS
    run(args.diffusion, args.flow, args.out, samples=args.samples, nfes=ints(args.nfe), scales=floats(args.scales),
        intervals=intervals, seed=args.seed)
    return 0
