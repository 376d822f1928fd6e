"""The study's report, computed only from the run directories' own files.

Each run dir gives ``config.yaml`` (architecture and steps), ``eval.jsonl`` (the digits
metric at every evaluation step), ``samples_NNNNNNN.png`` and ``checkpoints/``; the study
dir gives ``logs/<cell>.failed`` for cells whose process failed and ``sampling/*.json``
(finding 4). Out come ``study.csv``, ``study.md``, the figures, and a verdict per finding.
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
from dits.study.grid import BATCH_SIZE, BLOCKS, IMAGE_SIZE, SIZES, Named, build_grid
from dits.study.runner import run_dir
from dits.study.stats import interp_log, spearman

COLUMNS = ("model", "patch", "tokens", "params", "gflops", "steps", "train_compute", "fd",
           "heldout_ratio", "accuracy", "status")
SIZE_ORDER = list(SIZES)
COLORS = {"S": "tab:blue", "B": "tab:orange", "L": "tab:green", "XL": "tab:red"}
PATCH_STYLE = {4: ":", 2: "--", 1: "-"}
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

    @property
    def last(self) -> dict | None:
        return self.evals[-1] if self.evals else None

    def compute(self, step: int) -> float:
        return self.gflops * 3 * BATCH_SIZE * step

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


def _model_numbers(cfg: dict) -> tuple[float, int]:
    import torch

    from dits.flops import count_gflops, count_params
    from dits.models import create_model

    with torch.device("meta"):
        m = create_model("DiT", depth=cfg["depth"], hidden_size=cfg["hidden_size"], num_heads=cfg["num_heads"],
                         patch_size=cfg["patch_size"], input_size=IMAGE_SIZE, in_channels=1, num_classes=10,
                         block=cfg.get("block", "adaln-zero"), learn_sigma=cfg.get("learn_sigma", True))
    return count_gflops(m), count_params(m)


def read_run(out: Path, cell) -> Run:
    d = run_dir(out, cell)
    run = Run(cell.name, cell.size, cell.patch, cell.block, cell.steps)
    failed = Path(out) / "logs" / f"{cell.name}.failed"
    if failed.is_file():
        run.status, run.error = "failed", failed.read_text().strip()
    cfg_path = d / "config.yaml"
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        run.patch, run.block = int(cfg["patch_size"]), cfg.get("block", run.block)
        run.planned_steps = int(cfg.get("steps", run.planned_steps))
        run.gflops, run.params = _model_numbers(cfg)
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


def read_study(out: str | Path, kind: str, budget: str) -> list[Run]:
    return [read_run(Path(out), c) for c in build_grid(kind, budget)]


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
                    "status": r.status if not r.error else f"failed ({r.error})"})
    return out


def to_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in table:
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def _f(v, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def to_markdown_table(table: list[dict]) -> str:
    head = ("| model | patch | tokens | params | Gflops | steps | training compute (Gflops) | FD | "
            "held-out ratio | accuracy | status |\n|" + "---|" * 11 + "\n")
    body = "".join(
        f"| {r['model']} | {r['patch']} | {r['tokens']} | {_f(r['params'], ',')} | {_f(r['gflops'], '.3g')} | "
        f"{_f(r['steps'], 'd')} | {_f(r['train_compute'], '.3g')} | {_f(r['fd'], '.3f')} | "
        f"{_f(r['heldout_ratio'], '.2f')}{'×' if r['heldout_ratio'] is not None else ''} | "
        f"{_f(None if r['accuracy'] is None else 100 * r['accuracy'], '.1f')}{'%' if r['accuracy'] is not None else ''}"
        f" | {r['status']} |\n" for r in table)
    return head + body


# ------------------------------------------------------------------ verdicts
def _scored(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.last is not None and r.status != "failed"]


def verdict_gflops(runs: list[Run]) -> dict:
    """Finding 1: FD falls as Gflops grow; rho(Gflops, FD) <= -0.9 and stronger than with params.
    Only finished cells count: the final FD of a half-trained cell is not comparable."""
    rs = [r for r in _scored(runs) if r.status == "done"]
    if len(rs) < 3:
        return {"finding": 1, "verdict": "not enough cells", "text": "fewer than 3 finished cells"}
    fd = [r.last["fd"] for r in rs]
    rho_g = spearman([r.gflops for r in rs], fd)
    rho_p = spearman([float(r.params) for r in rs], fd)
    ok = rho_g <= -0.9 and rho_g < rho_p
    # the two ways to add Gflops, separately: a bigger model, a smaller patch
    knobs = {"size": [0, 0], "patch": [0, 0]}
    for a, b in _ordered_pairs(rs):
        k = knobs["size" if a.patch == b.patch else "patch"]
        k[0] += a.last["fd"] < b.last["fd"]
        k[1] += 1
    return {"finding": 1, "verdict": "reproduced" if ok else "not reproduced", "rho_gflops": rho_g,
            "rho_params": rho_p, "n": len(rs), "knobs": knobs,
            "text": f"Spearman rho(Gflops, final FD) = {rho_g:.2f}, rho(params, final FD) = {rho_p:.2f} "
                    f"over {len(rs)} finished cells (paper: strong with Gflops, weak with params; target rho <= -0.9). "
                    f"A bigger model at the same patch had the lower final FD in {knobs['size'][0]} of "
                    f"{knobs['size'][1]} pairs; a smaller patch at the same size in {knobs['patch'][0]} of "
                    f"{knobs['patch'][1]}"}


def _ordered_pairs(rs: list[Run]):
    """(bigger, smaller) pairs that differ in one knob: the same patch and a bigger size, or
    the same size and a smaller patch."""
    for a in rs:
        for b in rs:
            same_patch = a.patch == b.patch and SIZE_ORDER.index(a.size) > SIZE_ORDER.index(b.size)
            same_size = a.size == b.size and a.patch < b.patch
            if same_patch or same_size:
                yield a, b


def verdict_every_step(runs: list[Run]) -> dict:
    """Finding 2: at every evaluated step, the bigger / smaller-patch model has the lower FD."""
    rs = _scored(runs)
    held, total, misses = 0, 0, []
    for a, b in _ordered_pairs(rs):
        fb = dict(b.curve())
        for step, fa in a.curve():
            if step in fb:
                total += 1
                if fa < fb[step]:
                    held += 1
                else:
                    misses.append(f"{a.label} vs {b.label} at step {step}: {fa:.3f} vs {fb[step]:.3f}")
    if total == 0:
        return {"finding": 2, "verdict": "not enough cells", "text": "no comparable pairs"}
    return {"finding": 2, "verdict": "reproduced" if held == total else "not reproduced", "held": held,
            "total": total, "misses": misses,
            "text": f"the bigger or smaller-patch model was ahead in {held} of {total} (pair, step) comparisons"
                    + (f"; e.g. not at {misses[0]}" if misses else "")}


def verdict_compute(runs: list[Run]) -> dict:
    """Finding 3: at equal training compute the largest model has a lower FD than smaller ones
    (compared where their compute ranges overlap, interpolating FD in log compute)."""
    rs = _scored(runs)
    if not rs:
        return {"finding": 3, "verdict": "not enough cells", "text": "no evaluated cells"}
    top = max(SIZE_ORDER.index(r.size) for r in rs)
    big = [r for r in rs if SIZE_ORDER.index(r.size) == top]
    held, total, lines = 0, 0, []
    for a in big:
        for b in rs:
            if SIZE_ORDER.index(b.size) >= top:
                continue
            pts_a = [(a.compute(s), f) for s, f in a.curve()]
            pts_b = [(b.compute(s), f) for s, f in b.curve()]
            lo, hi = max(pts_a[0][0], pts_b[0][0]), min(pts_a[-1][0], pts_b[-1][0])
            if lo > hi:
                continue
            c = hi  # the most compute both reached: the most trained comparison
            fa, fb = interp_log(pts_a, c), interp_log(pts_b, c)
            total += 1
            held += fa < fb
            lines.append(f"{a.label} {fa:.3f} vs {b.label} {fb:.3f} at {c:.3g} Gflops")
    if total == 0:
        return {"finding": 3, "verdict": "not enough overlap",
                "text": "the largest model's evaluated compute range does not overlap the smaller models'"}
    return {"finding": 3, "verdict": "reproduced" if held == total else "not reproduced", "held": held,
            "total": total, "pairs": lines,
            "text": f"at equal training compute the largest size had the lower FD in {held} of {total} "
                    f"overlapping comparisons ({'; '.join(lines[:4])}{'; …' if len(lines) > 4 else ''})"}


def verdict_blocks(runs: list[Run]) -> dict:
    """Finding 5: adaLN-Zero lowest final FD, in-context highest (paper ≈ 19 / 23 / 26 / 35)."""
    rs = {r.block: r.last["fd"] for r in _scored(runs)}
    if set(rs) != set(BLOCKS):
        return {"finding": 5, "verdict": "not enough cells", "text": f"evaluated blocks: {sorted(rs)}"}
    order = sorted(rs, key=rs.get)
    ok = order[0] == "adaln-zero" and order[-1] == "in-context"
    nums = " / ".join(f"{b} {rs[b]:.3f}" for b in BLOCKS)
    return {"finding": 5, "verdict": "reproduced" if ok else "not reproduced", "fd": rs, "order": order,
            "text": f"final FD {nums}; best to worst: {' < '.join(order)} "
                    "(paper FID-50K: adaLN-Zero 19 < adaLN 23 < cross-attention 26 < in-context 35)"}


def read_sampling(out: Path) -> list[dict]:
    """Finding 4's measurements: sampling/<cell>_ddpm<K>.eval.digits.json."""
    recs = []
    for p in sorted((Path(out) / "sampling").glob("*.eval.digits.json")):
        cell, _, steps = p.name.split(".")[0].rpartition("_ddpm")
        try:
            recs.append({"cell": cell, "steps": int(steps), **json.loads(p.read_text())})
        except ValueError:
            continue
    return recs


def verdict_sampling(recs: list[dict], runs: list[Run]) -> dict:
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
    ok = s["fd"] > lg["fd"]
    return {"finding": 4, "verdict": ("reproduced" if ok else "not reproduced") if s["steps"] >= 10 * lg["steps"]
            else "inconclusive (less than 10x the steps)",
            "text": f"{by_cell[cells[0]].label} with {s['steps']} DDPM steps: FD {s['fd']:.3f}; "
                    f"{by_cell[cells[-1]].label} with {lg['steps']} steps: FD {lg['fd']:.3f}"}


# ------------------------------------------------------------------ figures
def _fig():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> str:
    from matplotlib.ticker import NullFormatter

    for ax in fig.axes:  # minor labels on a short log x axis overprint each other
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path.name


def _style(r: Run) -> dict:
    return {"color": COLORS.get(r.size, "k"), "linestyle": PATCH_STYLE.get(r.patch, "-"), "marker": "o",
            "markersize": 3, "label": r.label}


def plot_fd_vs_steps(runs: list[Run], path: Path, title: str) -> str:
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in _scored(runs):
        st = _style(r) if title.startswith("Fig. 6") else {"marker": "o", "markersize": 3, "label": r.block}
        ax.plot(*zip(*r.curve()), **st)
    ax.set(xlabel="training step", ylabel="FD (digits MLP features)", yscale="log", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def plot_fd_vs_gflops(runs: list[Run], path: Path, v: dict) -> str:
    plt = _fig()
    rs = [r for r in _scored(runs) if r.status == "done"]  # the cells rho is computed over
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name, rho in ((axes[0], "gflops", "Gflops (forward, one image)", v.get("rho_gflops")),
                               (axes[1], "params", "parameters", v.get("rho_params"))):
        for r in rs:
            ax.scatter(getattr(r, key), r.last["fd"], color=COLORS.get(r.size, "k"),
                       marker={4: "v", 2: "s", 1: "o"}.get(r.patch, "o"))
            ax.annotate(r.label, (getattr(r, key), r.last["fd"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        rho_s = "n/a" if rho is None or math.isnan(rho) else f"{rho:.2f}"
        ax.set(xscale="log", yscale="log", xlabel=name, ylabel="final FD", title=f"FD vs {name}: Spearman ρ = {rho_s}")
        ax.grid(alpha=0.3)
    fig.suptitle("Fig. 8 style: final FD of the finished cells against Gflops and against parameters "
                 "(paper: FID follows Gflops)", fontsize=10)
    return _save(plt, fig, path)


def plot_fd_vs_compute(runs: list[Run], path: Path) -> str:
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in _scored(runs):
        ax.plot([r.compute(s) for s, _ in r.curve()], [f for _, f in r.curve()], **_style(r))
    ax.set(xscale="log", yscale="log", xlabel="training compute (Gflops × 3 × batch × steps)", ylabel="FD",
           title="Fig. 9 style: FD vs training compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def plot_sampling(recs: list[dict], runs: list[Run], path: Path) -> str | None:
    by_cell = {r.name: r for r in runs}
    recs = [r for r in recs if r["cell"] in by_cell]
    if not recs:
        return None
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6, 4))
    for cell in sorted({r["cell"] for r in recs}, key=lambda c: by_cell[c].gflops):
        pts = sorted((r["steps"], r["fd"]) for r in recs if r["cell"] == cell)
        g = by_cell[cell].gflops
        ax.plot([2 * g * s for s, _ in pts], [f for _, f in pts], marker="o", label=f"{by_cell[cell].label} (DDPM steps "
                f"{', '.join(str(s) for s, _ in pts)})", color=COLORS.get(by_cell[cell].size, "k"))
    ax.set(xscale="log", yscale="log", xlabel="sampling Gflops per image (2 × Gflops × steps, with guidance)",
           ylabel="FD", title="Fig. 10 style: sampling compute vs model compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_sample_grids(runs: list[Run], path: Path, by: str) -> str | None:
    """The last sample grid of every cell, side by side: rows sizes, columns patches (or blocks)."""
    rs = [r for r in runs if r.samples is not None]
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
def write_report(out: str | Path, kind: str, budget: str) -> dict:
    """Read the study's run dirs and write study.csv, study.md and the figures; returns
    {"rows", "verdicts", "files"}."""
    out = Path(out)
    runs = read_study(out, kind, budget)
    table = rows(runs)
    write_text_atomic(out / "study.csv", to_csv(table))
    figs, verdicts = [], []
    if kind == "blocks":
        verdicts.append(verdict_blocks(runs))
        figs.append(plot_fd_vs_steps(runs, out / "fig5_blocks.png", "Fig. 5 style: FD of the four block designs"))
        figs.append(plot_sample_grids(runs, out / "samples_blocks.png", by="block"))
    else:
        v1 = verdict_gflops(runs)
        recs = read_sampling(out)
        verdicts += [v1, verdict_every_step(runs), verdict_compute(runs), verdict_sampling(recs, runs)]
        figs += [plot_fd_vs_steps(runs, out / "fig6_fd_vs_steps.png", "Fig. 6 style: FD over training"),
                 plot_fd_vs_gflops(runs, out / "fig8_fd_vs_gflops.png", v1),
                 plot_fd_vs_compute(runs, out / "fig9_fd_vs_compute.png"),
                 plot_sampling(recs, runs, out / "fig10_sampling.png"),
                 plot_sample_grids(runs, out / "samples_by_size_patch.png", by="patch")]
    figs = [f for f in figs if f]
    write_text_atomic(out / "study.md", markdown(kind, budget, table, verdicts, figs, read_sampling(out)
                                                 if kind != "blocks" else []))
    return {"rows": table, "verdicts": verdicts, "files": ["study.csv", "study.md", *figs]}


def markdown(kind, budget, table, verdicts, figs, sampling) -> str:
    lines = [f"# dits study {kind} ({budget} budget)", "",
             "Digits metric at each run's last evaluation: FD in the digits MLP's features (lower is better), "
             "held-out ratio = FD(samples, held-out half) / FD(real half, held-out half) (1× = as close as "
             "real digits), class accuracy of the MLP classifier. Gflops: forward, one image (`dits.flops`); "
             f"training compute = Gflops × 3 × batch {BATCH_SIZE} × steps.", "", to_markdown_table(table), "## Findings", ""]
    for v in verdicts:
        lines.append(f"- **Finding {v['finding']}: {v['verdict']}.** {v['text']}")
    if sampling:
        lines += ["", "Finding 4 measurements (DDPM, digits metric):", "", "| cell | DDPM steps | FD | held-out ratio |",
                  "|---|---|---|---|"]
        lines += [f"| {r['cell']} | {r['steps']} | {r['fd']:.3f} | {_f(heldout_ratio(r), '.2f')}× |" for r in sampling]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    return "\n".join(lines) + "\n"
