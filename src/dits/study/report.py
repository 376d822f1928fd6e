"""The study's report, computed only from the run directories' own files.

Each run dir gives ``config.yaml`` (architecture and steps), ``eval.jsonl`` (the built-in data
set's metric and the held-out denoising loss at every evaluation step), ``samples_NNNNNNN.png`` and ``checkpoints/``; the study
dir gives ``logs/<cell>.failed`` for cells whose process failed and ``sampling/*.json``
(finding 4). Out come ``study.csv``, ``study.md``, the figures, and a verdict per finding.

Which metric ranks (``grid.DATA_SETS[data]["metric"]``): on the glyphs testbed the FD of the samples
to the *held-out* split (sample quality, as the paper's FID; the real-data level is its floor), on
the digits the FD to all real digits, as before. Every scaling verdict is also given on the held-out
denoising loss (fixed draws, no sampling noise). Where a study repeats cells with a second seed,
their spread sets the bar: a comparison is a win only when its margin (in log units) exceeds the
largest seed-to-seed difference of the same metric, a loss only when it falls short by as much,
and a tie in between.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dits.checkpoint import latest_checkpoint
from dits.fileio import atomic_write, write_text_atomic
from dits.study.grid import BATCH_SIZE, BLOCKS, DATA_SETS, SIZES, Named, build_grid
from dits.study.runner import run_dir
from dits.study.stats import interp_log, spearman

COLUMNS = ("model", "patch", "tokens", "params", "gflops", "steps", "train_compute", "fd",
           "heldout_ratio", "accuracy", "status", "run", "seed", "fd_heldout", "heldout_loss", "train_loss",
           "loss_gap")
METRIC_NAMES = {"fd": "FD", "fd_heldout": "held-out FD", "heldout_mse": "held-out loss (L_simple)"}
SIZE_ORDER = list(SIZES)
COLORS = {"S": "tab:blue", "B": "tab:orange", "L": "tab:green", "XL": "tab:red"}
PATCH_STYLE = {8: "-.", 4: ":", 2: "--", 1: "-"}
PAPER_FIG5 = {"adaln-zero": 19, "adaln": 23, "cross-attn": 26, "in-context": 35}


@dataclass
class Run(Named):
    """What one cell's run dir says."""
    name: str
    size: str
    patch: int
    block: str
    planned_steps: int
    status: str = "missing"          # done | partial | failed | missing
    error: str = ""
    gflops: float = float("nan")
    params: int = 0
    evals: list = field(default_factory=list)    # eval.jsonl records, one per step, sorted
    samples: Path | None = None
    data: str = "digits"
    seed: int = 0

    @property
    def last(self) -> dict | None:
        return self.evals[-1] if self.evals else None

    def compute(self, step: int) -> float:
        return self.gflops * 3 * BATCH_SIZE * step

    def value(self, key: str = "fd") -> float | None:
        return (self.last or {}).get(key)

    def curve(self, key: str = "fd") -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.evals if r.get(key) is not None]


def heldout_ratio(rec: dict) -> float | None:
    try:
        return rec["fd_heldout"] / rec["fd_heldout_floor"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _read_evals(path: Path) -> list[dict]:
    """eval.jsonl, one record per step (a resumed run may repeat a step: the last one wins);
    unreadable lines (a run killed mid-write) are skipped."""
    by_step = {}
    if path.is_file():
        for ln in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(ln)
                by_step[int(rec["step"])] = rec
            except (ValueError, KeyError, TypeError):
                continue
    return [by_step[s] for s in sorted(by_step)]


def _model_numbers(cfg: dict, image_size: int) -> tuple[float, int]:
    import torch

    from dits.flops import count_gflops, count_params
    from dits.models import create_model

    with torch.device("meta"):
        m = create_model("DiT", depth=cfg["depth"], hidden_size=cfg["hidden_size"], num_heads=cfg["num_heads"],
                         patch_size=cfg["patch_size"], input_size=image_size, in_channels=1, num_classes=10,
                         block=cfg.get("block", "adaln-zero"), learn_sigma=cfg.get("learn_sigma", True))
    return count_gflops(m), count_params(m)


def read_run(out: Path, cell) -> Run:
    d = run_dir(out, cell)
    run = Run(cell.name, cell.size, cell.patch, cell.block, cell.steps, data=cell.data, seed=cell.seed)
    failed = Path(out) / "logs" / f"{cell.name}.failed"
    if failed.is_file():
        run.status, run.error = "failed", failed.read_text().strip()
    cfg_path = d / "config.yaml"
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        run.patch, run.block = int(cfg["patch_size"]), cfg.get("block", run.block)
        run.planned_steps = int(cfg.get("steps", run.planned_steps))
        run.gflops, run.params = _model_numbers(cfg, DATA_SETS[cell.data]["image_size"])
        run.evals = _read_evals(d / "eval.jsonl")
        pngs = sorted(d.glob("samples_*.png"))
        run.samples = pngs[-1] if pngs else None
        ckpt = latest_checkpoint(d)
        done = ckpt is not None and int(ckpt.stem) >= run.planned_steps and (d / "summary.json").is_file()
        if done:  # finished since an earlier attempt failed: the marker is stale
            run.status, run.error = "done", ""
        elif run.status != "failed":
            run.status = "partial" if ckpt is not None else "missing"
    return run


def study_data(out: str | Path) -> str:
    """The data set a study directory was run on (manifests from before ``--data``: digits)."""
    from dits.study.runner import read_manifest

    return (read_manifest(Path(out)) or {}).get("data", "digits")


def read_study(out: str | Path, kind: str, budget: str, data: str | None = None) -> list[Run]:
    data = data or study_data(out)
    return [read_run(Path(out), c) for c in build_grid(kind, budget, data)]


# ------------------------------------------------------------------ the table
def rows(runs: list[Run]) -> list[dict]:
    mixed = len({r.block for r in runs}) > 1  # a blocks study: name every design, adaLN-Zero too
    out = []
    for r in runs:
        last = r.last or {}
        step = last.get("step")
        out.append({"model": f"{r.size}/{r.patch} {r.block}" if mixed else r.label, "patch": r.patch, "tokens": r.tokens, "params": r.params or None,
                    "gflops": None if math.isnan(r.gflops) else r.gflops, "steps": step,
                    "train_compute": r.compute(step) if step else None, "fd": last.get("fd"),
                    "heldout_ratio": heldout_ratio(last) if last else None, "accuracy": last.get("accuracy"),
                    "status": r.status if not r.error else f"failed ({r.error})", "run": r.name, "seed": r.seed,
                    "fd_heldout": last.get("fd_heldout"), "heldout_loss": last.get("heldout_mse"),
                    "train_loss": last.get("train_mse"), "loss_gap": last.get("loss_gap")})
    return out


def to_csv(table: list[dict], columns=COLUMNS) -> str:
    """``columns`` of each row (missing or None: empty), one line per row."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for row in table:
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    return buf.getvalue()


def _f(v, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _unit(v, fmt: str, unit: str, scale: float = 1.0) -> str:
    """``v × scale`` formatted with its unit, or the dash alone when missing."""
    return _f(v, fmt) if v is None else _f(scale * v, fmt) + unit


def quality_cells(r: dict) -> str:
    """The columns every study table ends with: held-out ratio, accuracy, held-out loss, train/held-out
    gap, status (the scaling and the backbones tables)."""
    return (f"{_unit(r['heldout_ratio'], '.2f', '×')} | {_unit(r['accuracy'], '.1f', '%', 100)} | "
            f"{_f(r['heldout_loss'], '.5f')} | {_unit(r['loss_gap'], '+.1f', '%', 100)} | {r['status']} |")


def to_markdown_table(table: list[dict]) -> str:
    head = ("| model | patch | tokens | params | Gflops | steps | training compute (Gflops) | FD | "
            "held-out ratio | accuracy | held-out loss | train/held-out gap | status |\n|" + "---|" * 13 + "\n")
    body = "".join(
        f"| {r['model']} | {r['patch']} | {r['tokens']} | {_f(r['params'], ',')} | {_f(r['gflops'], '.3g')} | "
        f"{_f(r['steps'], 'd')} | {_f(r['train_compute'], '.3g')} | {_f(r['fd'], '.3f')} | {quality_cells(r)}\n"
        for r in table)
    return head + body


# ------------------------------------------------------------------ verdicts
def _scored(runs: list[Run], key: str = "fd") -> list[Run]:
    """Evaluated, not failed, first seed only (repeats serve the spread): the cells verdicts compare."""
    return [r for r in runs if r.last is not None and r.status != "failed" and not r.seed
            and r.value(key) is not None]


def seed_spread(runs: list[Run], key: str) -> float | None:
    """The largest |log(m_seed0 / m_seed1)| of ``key`` at the last evaluation over the repeated
    cells (both finished); None when the study repeats none."""
    first = {r.name: r for r in runs if not r.seed}
    diffs = []
    for r in runs:
        base = first.get(r.name.rsplit("-seed", 1)[0]) if r.seed else None
        if base is None or r.status != "done" or base.status != "done":
            continue
        a, b = base.value(key), r.value(key)
        if a and b and a > 0 and b > 0:
            diffs.append(abs(math.log(a / b)))
    return max(diffs) if diffs else None


def compare(better: float, worse: float, spread: float | None) -> str:
    """'win' if ``better`` (lower is better) beats ``worse`` by more than the seed spread,
    'loss' if it trails by more, else 'tie'; without a spread, 'win' iff better < worse."""
    if spread is None:
        return "win" if better < worse else "loss"
    margin = math.log(worse / better) if better > 0 and worse > 0 else (worse - better)
    return "win" if margin > spread else "loss" if margin < -spread else "tie"


def _rule(spread: float | None) -> str:
    return ("" if spread is None else
            f" (seed spread {100 * (math.exp(spread) - 1):.1f} %: a margin within it is a tie)")


def verdict_gflops(runs: list[Run], key: str = "fd", spread: float | None = None) -> dict:
    """Finding 1: the metric falls as Gflops grow; rho(Gflops, metric) <= -0.9 and stronger than with
    params. Only finished cells count: the final value of a half-trained cell is not comparable."""
    name = METRIC_NAMES.get(key, key)
    rs = [r for r in _scored(runs, key) if r.status == "done"]
    if len(rs) < 3:
        return {"finding": 1, "verdict": "not enough cells", "metric": key, "text": "fewer than 3 finished cells"}
    vals = [r.value(key) for r in rs]
    rho_g = spearman([r.gflops for r in rs], vals)
    rho_p = spearman([float(r.params) for r in rs], vals)
    ok = rho_g <= -0.9 and rho_g < rho_p
    # the two ways to add Gflops, separately: a bigger model, a smaller patch; [wins, total, ties]
    knobs = {"size": [0, 0], "patch": [0, 0]}
    ties = {"size": 0, "patch": 0}
    for a, b in _ordered_pairs(rs):
        which = "size" if a.patch == b.patch else "patch"
        res = compare(a.value(key), b.value(key), spread)
        knobs[which][0] += res == "win"
        knobs[which][1] += 1
        ties[which] += res == "tie"
    tie_s = (lambda w: f" ({ties[w]} within the seed spread)" if spread is not None else "")
    return {"finding": 1, "verdict": "reproduced" if ok else "not reproduced", "rho_gflops": rho_g,
            "rho_params": rho_p, "n": len(rs), "knobs": knobs, "ties": ties, "metric": key, "spread": spread,
            "text": f"[{name}] Spearman rho(Gflops, final value) = {rho_g:.2f}, rho(params) = {rho_p:.2f} "
                    f"over {len(rs)} finished cells (paper: strong with Gflops, weak with params; target rho <= -0.9). "
                    f"A bigger model at the same patch won {knobs['size'][0]} of {knobs['size'][1]} pairs"
                    f"{tie_s('size')}; a smaller patch at the same size {knobs['patch'][0]} of "
                    f"{knobs['patch'][1]}{tie_s('patch')}{_rule(spread)}"}


def _ordered_pairs(rs: list[Run]):
    """(bigger, smaller) pairs that differ in one knob: the same patch and a bigger size, or
    the same size and a smaller patch."""
    for a in rs:
        for b in rs:
            same_patch = a.patch == b.patch and SIZE_ORDER.index(a.size) > SIZE_ORDER.index(b.size)
            same_size = a.size == b.size and a.patch < b.patch
            if same_patch or same_size:
                yield a, b


def _v(x: float) -> str:
    """FD-sized values with 3 decimals (as before), loss-sized ones with 4 significant digits."""
    return f"{x:.3f}" if abs(x) >= 0.1 else f"{x:.4g}"


def _tally(results: list[str]) -> tuple[int, int, int]:
    return results.count("win"), results.count("tie"), results.count("loss")


def _holds(wins: int, ties: int, losses: int) -> bool:
    """A finding of the form 'X is ahead' holds when no comparison goes the other way beyond the
    seed spread and the wins beyond it are at least half of all comparisons."""
    return losses == 0 and wins * 2 >= wins + ties + losses > 0


def verdict_every_step(runs: list[Run], key: str = "fd", spread: float | None = None) -> dict:
    """Finding 2: at every evaluated step, the bigger / smaller-patch model has the lower value."""
    name = METRIC_NAMES.get(key, key)
    rs = _scored(runs, key)
    results, misses = [], []
    for a, b in _ordered_pairs(rs):
        fb = dict(b.curve(key))
        for step, fa in a.curve(key):
            if step in fb:
                res = compare(fa, fb[step], spread)
                results.append(res)
                if res != "win":
                    misses.append(f"{a.label} vs {b.label} at step {step}: {_v(fa)} vs {_v(fb[step])} ({res})")
    if not results:
        return {"finding": 2, "verdict": "not enough cells", "metric": key, "text": "no comparable pairs"}
    wins, ties, losses = _tally(results)
    return {"finding": 2, "verdict": "reproduced" if _holds(wins, ties, losses) else "not reproduced", "held": wins,
            "ties": ties, "losses": losses, "total": len(results), "misses": misses, "metric": key, "spread": spread,
            "text": f"[{name}] the bigger or smaller-patch model was ahead in {wins} of {len(results)} (pair, step) "
                    f"comparisons" + (f", {ties} within the seed spread, {losses} behind" if spread is not None else "")
                    + (f"; e.g. not at {misses[0]}" if misses else "") + _rule(spread)}


def at_equal_compute(a, b, key: str) -> tuple[float, float, float] | None:
    """(compute, value of a, value of b) at the most training compute both runs reached, each
    interpolated in log compute; None where their evaluated compute ranges do not overlap."""
    pts_a = [(a.compute(s), f) for s, f in a.curve(key)]
    pts_b = [(b.compute(s), f) for s, f in b.curve(key)]
    lo, hi = max(pts_a[0][0], pts_b[0][0]), min(pts_a[-1][0], pts_b[-1][0])
    if lo > hi:
        return None
    return hi, interp_log(pts_a, hi), interp_log(pts_b, hi)


def verdict_compute(runs: list[Run], key: str = "fd", spread: float | None = None) -> dict:
    """Finding 3: at equal training compute the largest model has a lower value than smaller ones
    (compared where their compute ranges overlap, interpolating in log compute)."""
    name = METRIC_NAMES.get(key, key)
    rs = _scored(runs, key)
    if not rs:
        return {"finding": 3, "verdict": "not enough cells", "metric": key, "text": "no evaluated cells"}
    top = max(SIZE_ORDER.index(r.size) for r in rs)
    big = [r for r in rs if SIZE_ORDER.index(r.size) == top]
    results, lines = [], []
    for a in big:
        for b in rs:
            if SIZE_ORDER.index(b.size) >= top:
                continue
            both = at_equal_compute(a, b, key)  # the most compute both reached: the most trained comparison
            if both is None:
                continue
            c, fa, fb = both
            results.append(compare(fa, fb, spread))
            lines.append(f"{a.label} {_v(fa)} vs {b.label} {_v(fb)} at {c:.3g} Gflops")
    if not results:
        return {"finding": 3, "verdict": "not enough overlap", "metric": key,
                "text": "the largest model's evaluated compute range does not overlap the smaller models'"}
    wins, ties, losses = _tally(results)
    return {"finding": 3, "verdict": "reproduced" if _holds(wins, ties, losses) else "not reproduced", "held": wins,
            "ties": ties, "losses": losses, "total": len(results), "pairs": lines, "metric": key, "spread": spread,
            "text": f"[{name}] at equal training compute the largest size was ahead in {wins} of {len(results)} "
                    f"overlapping comparisons" + (f" ({ties} within the seed spread, {losses} behind)"
                                                  if spread is not None else "")
                    + f" ({'; '.join(lines[:4])}{'; …' if len(lines) > 4 else ''}){_rule(spread)}"}


def verdict_blocks(runs: list[Run], key: str = "fd") -> dict:
    """Finding 5: adaLN-Zero lowest final FD, in-context highest (paper ≈ 19 / 23 / 26 / 35)."""
    rs = {r.block: r.value(key) for r in _scored(runs, key)}
    if set(rs) != set(BLOCKS):
        return {"finding": 5, "verdict": "not enough cells", "text": f"evaluated blocks: {sorted(rs)}"}
    order = sorted(rs, key=rs.get)
    ok = order[0] == "adaln-zero" and order[-1] == "in-context"
    nums = " / ".join(f"{b} {rs[b]:.3f}" for b in BLOCKS)
    return {"finding": 5, "verdict": "reproduced" if ok else "not reproduced", "fd": rs, "order": order,
            "metric": key, "text": f"final {METRIC_NAMES.get(key, key)} {nums}; best to worst: {' < '.join(order)} "
                    "(paper FID-50K: adaLN-Zero 19 < adaLN 23 < cross-attention 26 < in-context 35)"}


def read_sampling(out: Path) -> list[dict]:
    """Finding 4's measurements: sampling/<cell>_ddpm<K>.eval.<data>.json."""
    recs = []
    for p in sorted((Path(out) / "sampling").glob("*.eval.*.json")):
        cell, _, steps = p.name.split(".")[0].rpartition("_ddpm")
        try:
            recs.append({"cell": cell, "steps": int(steps), **json.loads(p.read_text())})
        except ValueError:
            continue
    return recs


def verdict_sampling(recs: list[dict], runs: list[Run], key: str = "fd") -> dict:
    """Finding 4: the smallest model with the most sampling steps stays behind the largest
    model with the fewest (at least 10x fewer)."""
    by_cell = {r.name: r for r in runs}
    cells = sorted({r["cell"] for r in recs if r["cell"] in by_cell}, key=lambda c: by_cell[c].gflops)
    if len(cells) < 2:
        return {"finding": 4, "verdict": "not run", "text": "run `dits study sampling-compute` after the scaling study"}
    small = [r for r in recs if r["cell"] == cells[0]]
    large = [r for r in recs if r["cell"] == cells[-1]]
    s = max(small, key=lambda r: r["steps"])
    lg = min(large, key=lambda r: r["steps"])
    ok = s[key] > lg[key]
    return {"finding": 4, "verdict": ("reproduced" if ok else "not reproduced") if s["steps"] >= 10 * lg["steps"]
            else "inconclusive (less than 10x the steps)",
            "metric": key,
            "text": f"[{METRIC_NAMES.get(key, key)}] {by_cell[cells[0]].label} with {s['steps']} DDPM steps: "
                    f"{s[key]:.3f}; {by_cell[cells[-1]].label} with {lg['steps']} steps: {lg[key]:.3f}"}


# ------------------------------------------------------------------ figures
def _fig():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> str:
    """Write a study figure into its study directory, naming at its foot the machine(s) the study's
    manifest says its cells ran on (times and compute read differently on another machine)."""
    from matplotlib.ticker import NullFormatter

    from dits.study.runner import machines

    for ax in fig.axes:  # minor labels on a short log x axis overprint each other
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    ran_on = machines(path.parent)
    if ran_on:
        fig.text(0.995, 0.003, "measured on " + "; ".join(ran_on), ha="right", va="bottom", fontsize=6, color="0.35")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path.name


def _style(r: Run) -> dict:
    return {"color": COLORS.get(r.size, "k"), "linestyle": PATCH_STYLE.get(r.patch, "-"), "marker": "o",
            "markersize": 3, "label": r.label}


def _ylabel(key: str, data: str) -> str:
    return {"fd": f"FD ({data} MLP features)", "fd_heldout": f"FD to the held-out split ({data} MLP features)",
            "heldout_mse": "held-out loss (L_simple, fixed draws)"}.get(key, key)


def plot_fd_vs_steps(runs: list[Run], path: Path, title: str, key: str = "fd") -> str:
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in _scored(runs, key):
        st = _style(r) if title.startswith("Fig. 6") else {"marker": "o", "markersize": 3, "label": r.block}
        ax.plot(*zip(*r.curve(key)), **st)
    data = runs[0].data if runs else "digits"
    ax.set(xlabel="training step", ylabel=_ylabel(key, data), yscale="log", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def plot_fd_vs_gflops(runs: list[Run], path: Path, v: dict, key: str = "fd") -> str:
    plt = _fig()
    rs = [r for r in _scored(runs, key) if r.status == "done"]  # the cells rho is computed over
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, name, rho in ((axes[0], "gflops", "Gflops (forward, one image)", v.get("rho_gflops")),
                               (axes[1], "params", "parameters (count)", v.get("rho_params"))):
        for r in rs:
            ax.scatter(getattr(r, axis), r.value(key), color=COLORS.get(r.size, "k"),
                       marker={8: "^", 4: "v", 2: "s", 1: "o"}.get(r.patch, "o"))
            ax.annotate(r.label, (getattr(r, axis), r.value(key)), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        rho_s = "n/a" if rho is None or math.isnan(rho) else f"{rho:.2f}"
        ax.set(xscale="log", yscale="log", xlabel=name, ylabel=f"final {METRIC_NAMES.get(key, key)}",
               title=f"vs {name}: Spearman ρ = {rho_s}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Fig. 8 style: final {METRIC_NAMES.get(key, key)} of the finished cells against Gflops and "
                 "against parameters (paper: FID follows Gflops)", fontsize=10)
    return _save(plt, fig, path)


def plot_fd_vs_compute(runs: list[Run], path: Path, key: str = "fd") -> str:
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in _scored(runs, key):
        ax.plot([r.compute(s) for s, _ in r.curve(key)], [f for _, f in r.curve(key)], **_style(r))
    data = runs[0].data if runs else "digits"
    ax.set(xscale="log", yscale="log", xlabel="training compute, Gflop (Gflops × 3 × batch × steps)",
           ylabel=_ylabel(key, data), title=f"Fig. 9 style: {METRIC_NAMES.get(key, key)} vs training compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def plot_sampling(recs: list[dict], runs: list[Run], path: Path, key: str = "fd") -> str | None:
    by_cell = {r.name: r for r in runs}
    recs = [r for r in recs if r["cell"] in by_cell]
    if not recs:
        return None
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6, 4))
    for cell in sorted({r["cell"] for r in recs}, key=lambda c: by_cell[c].gflops):
        pts = sorted((r["steps"], r[key]) for r in recs if r["cell"] == cell)
        g = by_cell[cell].gflops
        ax.plot([2 * g * s for s, _ in pts], [f for _, f in pts], marker="o", label=f"{by_cell[cell].label} (DDPM steps "
                f"{', '.join(str(s) for s, _ in pts)})", color=COLORS.get(by_cell[cell].size, "k"))
    ax.set(xscale="log", yscale="log", xlabel="sampling compute per image, Gflop (2 × Gflops × steps, with guidance)",
           ylabel=METRIC_NAMES.get(key, key), title="Fig. 10 style: sampling compute vs model compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_sample_grids(runs: list[Run], path: Path, by: str) -> str | None:
    """The last sample grid of every cell, side by side: rows sizes, columns patches (or blocks)."""
    rs = [r for r in runs if r.samples is not None and not r.seed]
    if not rs:
        return None
    plt = _fig()
    row_keys = sorted({r.size for r in rs}, key=SIZE_ORDER.index) if by == "patch" else [None]
    col_keys = sorted({r.patch for r in rs}, reverse=True) if by == "patch" else [b for b in BLOCKS
                                                                                 if any(r.block == b for r in rs)]
    fig, axes = plt.subplots(len(row_keys), len(col_keys), figsize=(2.6 * len(col_keys), 2.6 * len(row_keys)),
                             squeeze=False)
    for i, rk in enumerate(row_keys):
        for j, ck in enumerate(col_keys):
            ax = axes[i][j]
            ax.axis("off")
            match = [r for r in rs if (r.size, r.patch) == (rk, ck)] if by == "patch" else \
                [r for r in rs if r.block == ck]
            if match:
                ax.imshow(plt.imread(match[0].samples), cmap="gray")
                ax.set_title(f"{match[0].label} (step {match[0].samples.stem.split('_')[-1].lstrip('0')})", fontsize=8)
    fig.suptitle("samples (one row per class), as the paper shows them across sizes and patches"
                 if by == "patch" else "samples of the four block designs", fontsize=9)
    return _save(plt, fig, path)


# ------------------------------------------------------------------ the report
def write_report(out: str | Path, kind: str, budget: str, data: str | None = None) -> dict:
    """Read the study's run dirs and write study.csv, study.md and the figures; returns
    {"rows", "verdicts", "files", "spread"}. Verdicts come first on the data set's ranking metric,
    then (scaling) findings 1-3 again on the held-out loss where the runs recorded it."""
    out = Path(out)
    data = data or study_data(out)
    if kind == "backbones":  # DiT vs U-Net: its own table and verdicts (study/backbones.py)
        from dits.study.backbones import write_report as backbones_report
        return backbones_report(out, budget, data)
    key, loss_key = DATA_SETS[data]["metric"], DATA_SETS[data]["loss"]
    runs = read_study(out, kind, budget, data)
    table = rows(runs)
    write_text_atomic(out / "study.csv", to_csv(table))
    figs, verdicts = [], []
    spread = {k: seed_spread(runs, k) for k in (key, loss_key)}
    if kind == "blocks":
        verdicts.append(verdict_blocks(runs, key))
        figs.append(plot_fd_vs_steps(runs, out / "fig5_blocks.png", "Fig. 5 style: the four block designs", key))
        figs.append(plot_sample_grids(runs, out / "samples_blocks.png", by="block"))
    else:
        v1 = verdict_gflops(runs, key, spread[key])
        recs = read_sampling(out)
        verdicts += [v1, verdict_every_step(runs, key, spread[key]), verdict_compute(runs, key, spread[key]),
                     verdict_sampling(recs, runs, key)]
        figs += [plot_fd_vs_steps(runs, out / "fig6_fd_vs_steps.png", "Fig. 6 style: quality over training", key),
                 plot_fd_vs_gflops(runs, out / "fig8_fd_vs_gflops.png", v1, key),
                 plot_fd_vs_compute(runs, out / "fig9_fd_vs_compute.png", key),
                 plot_sampling(recs, runs, out / "fig10_sampling.png", key),
                 plot_sample_grids(runs, out / "samples_by_size_patch.png", by="patch")]
        if any(r.value(loss_key) is not None for r in runs):
            l1 = verdict_gflops(runs, loss_key, spread[loss_key])
            verdicts += [l1, verdict_every_step(runs, loss_key, spread[loss_key]),
                         verdict_compute(runs, loss_key, spread[loss_key])]
            figs += [plot_fd_vs_gflops(runs, out / "fig8_loss_vs_gflops.png", l1, loss_key),
                     plot_fd_vs_steps(runs, out / "fig6_loss_vs_steps.png", "Fig. 6 style: held-out loss over training",
                                      loss_key)]
    figs = [f for f in figs if f]
    write_text_atomic(out / "study.md", markdown(kind, budget, table, verdicts, figs, read_sampling(out)
                                                 if kind != "blocks" else [], data, spread, key))
    return {"rows": table, "verdicts": verdicts, "files": ["study.csv", "study.md", *figs], "spread": spread}


def markdown(kind, budget, table, verdicts, figs, sampling, data="digits", spread=None, key="fd") -> str:
    spread = spread or {}
    lines = [f"# dits study {kind} ({budget} budget, data {data})", "",
             f"The {data} metric at each run's last evaluation: FD in the {data} MLP classifier's features (lower is "
             "better), held-out ratio = FD(samples, held-out reference) / FD(as many real images, the same reference) "
             "(1× = as close as real data), class accuracy of the MLP classifier; held-out loss = L_simple on the "
             "held-out split at fixed noise draws, gap = held-out / train - 1 at the same draws. Gflops: forward, "
             f"one image (`dits.flops`); training compute = Gflops × 3 × batch {BATCH_SIZE} × steps. Verdicts rank by "
             f"{METRIC_NAMES.get(key, key)}" + ", then findings 1-3 again by the held-out loss." if data != "digits" else
             "Digits metric at each run's last evaluation: FD in the digits MLP's features (lower is better), "
             "held-out ratio = FD(samples, held-out half) / FD(real half, held-out half) (1× = as close as "
             "real digits), class accuracy of the MLP classifier. Gflops: forward, one image (`dits.flops`); "
             f"training compute = Gflops × 3 × batch {BATCH_SIZE} × steps.", ""]
    for k, s in spread.items():
        if s is not None:
            lines.append(f"Seed-to-seed spread of {METRIC_NAMES.get(k, k)} (largest over the repeated cells): "
                         f"{100 * (math.exp(s) - 1):.1f} %; a comparison is a win only beyond it.")
    lines += ["", to_markdown_table(table), "## Findings", ""]
    for v in verdicts:
        lines.append(f"- **Finding {v['finding']}: {v['verdict']}.** {v['text']}")
    if sampling:
        lines += ["", f"Finding 4 measurements (DDPM, {data} metric):", "", "| cell | DDPM steps | FD | held-out ratio |",
                  "|---|---|---|---|"]
        lines += [f"| {r['cell']} | {r['steps']} | {r['fd']:.3f} | {_f(heldout_ratio(r), '.2f')}× |" for r in sampling]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    return "\n".join(lines) + "\n"
