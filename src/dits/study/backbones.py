"""``dits study backbones``: DiTs against U-Nets at matched Gflops, the paper's title claim.

The paper (Fig. 2 right, Table 2) sets DiT-XL/2 (118.6 Gflops, FID 2.27) against U-Nets: LDM-4
(103.6 Gflops, 3.60), ADM (1120, 4.59), ADM-U (742, 3.94): a transformer uses forward compute
better than a U-Net. This study reruns that comparison at laptop scale: the same Gaussian
diffusion, sampler, recipe, data, steps and seeds for both families, only the denoiser differs.

The grid is a list of **pairs**: a DiT of the study's scaled-down sizes (:mod:`dits.study.grid`)
and the U-Net of the family (c, 2c) x 2 residual blocks per level (ADM-style, diffusers'
``UNet2DModel``: :mod:`dits.models.unet`) whose Gflops are within 25 % of it, both counted by the
one flop counter (:mod:`dits.flop_counter`, FlopCounterMode). The U-Net's width c is its only
knob, as the DiT's size is the DiT's. Each budget trains one cell of each family a second time
(seed 1); the larger seed-to-seed difference sets the bar a margin must clear
(:func:`dits.study.report.compare`).

The report (``study.csv`` with ``run``, ``family`` and ``gflops`` per cell, ``study.md``, figures of the
metric against Gflops and against training compute with both families, the cells' sample grids
side by side) is computed from the run directories' own files, and gives the verdict on the
claim in one line whichever way it comes out.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dits.errors import UserError
from dits.study.grid import BATCH_SIZE, DATA_SETS, DEFAULT_DATA, IN_CHANNELS, NUM_CLASSES, RECIPE, SIZES, Cell

KIND = "backbones"
TOLERANCE = 1.25                 # a pair's Gflops may differ by this factor at most
UNET_LAYERS = 2                  # residual blocks per level of every U-Net of the study
FAMILIES = ("dit", "unet")
FAMILY_LABEL = {"dit": "DiT", "unet": "U-Net"}
FAMILY_COLOR = {"dit": "tab:blue", "unet": "tab:red"}
# Both families run the same eager kernels: a compile plan is a speed choice that would favour
# whichever family it suits, and its probe costs minutes per cell on two cores.
EXTRA_ARGS = ("--compile", "off")

# (DiT size, patch) -> U-Net base width c, per data set and budget. The patches are the data set's
# own: 16 tokens is patch 4 on the 16x16 glyphs and patch 2 on the 8x8 digits.
PAIRS = {
    "glyphs": {"quick": ((("S", 4), 4), (("B", 4), 8), (("L", 4), 16)),
               "full": ((("S", 4), 4), (("B", 4), 8), (("L", 4), 16), (("L", 2), 32), (("XL", 2), 36))},
    "digits": {"quick": ((("S", 2), 8), (("B", 2), 16), (("L", 2), 32)),
               "full": ((("S", 2), 8), (("B", 2), 16), (("L", 2), 32), (("L", 1), 64), (("XL", 1), 72))},
}
BUDGETS = {
    # repeat: the pair index trained again with seed 1 (the middle pair: the smallest U-Net's two
    # seeds differ by 57 % in held-out FD, more than any other cell's). quick evaluates twice, not
    # three times, and the runner starts the longest cells first: 24 min -> within 20 on 2 cores
    "quick": {"steps": 1500, "eval_every": 750, "eval_samples": 500, "repeat": 1},
    "full": {"steps": 3000, "eval_every": 500, "eval_samples": 500, "repeat": 1},
}


def unet_name(c: int) -> str:
    return f"unet-{c}-{2 * c}-x{UNET_LAYERS}"


def dit_name(size: str, patch: int) -> str:
    return f"dit-{size}-p{patch}"


@dataclass
class BackboneCell:
    """One `dits train` run of the backbones study (a DiT or a U-Net)."""
    name: str
    family: str                  # dit | unet
    steps: int
    eval_every: int
    eval_samples: int
    pair: int                    # index of the Gflops level it belongs to
    seed: int = 0
    data: str = DEFAULT_DATA
    size: str = ""               # DiT
    patch: int = 0
    channels: tuple = ()         # U-Net
    layers: int = UNET_LAYERS
    gflops: float = 0.0          # forward Gflops of one image (dits.flop_counter, FlopCounterMode)
    params: int = 0
    block: str = "adaln-zero"

    @property
    def label(self) -> str:
        base = f"DiT-{self.size}/{self.patch}" if self.family == "dit" else \
            f"U-Net {','.join(map(str, self.channels))} x{self.layers}"
        return base if not self.seed else f"{base} (seed {self.seed})"

    @property
    def tokens(self) -> int:
        side = DATA_SETS[self.data]["image_size"]
        return (side // self.patch) ** 2 if self.family == "dit" else side * side

    @property
    def shape_note(self) -> str:
        """What the runner's start line says about the cell's shape."""
        if self.family == "dit":
            return f"{self.tokens} tokens"
        side = DATA_SETS[self.data]["image_size"]
        return f"{len(self.channels)} levels from {side}x{side}"

    def train_compute(self, steps: int | None = None) -> float:
        """Training Gflops: forward Gflops x 3 (forward + backward) x batch x steps."""
        return self.gflops * 3 * BATCH_SIZE * (self.steps if steps is None else steps)

    def model_config(self):
        from dits.models import config_for
        from dits.models.unet import UNetConfig

        side = DATA_SETS[self.data]["image_size"]
        if self.family == "dit":
            depth, width, heads = SIZES[self.size]
            return config_for("DiT", depth=depth, hidden_size=width, num_heads=heads, patch_size=self.patch,
                              input_size=side, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
        return UNetConfig(input_size=side, in_channels=IN_CHANNELS, channels=self.channels, layers=self.layers,
                          num_classes=NUM_CLASSES)

    def train_args(self, run_dir: str) -> list[str]:
        if self.family == "dit":  # the scaling study's own command line for this size and patch
            args = Cell(self.name, self.size, self.patch, "adaln-zero", self.steps, self.eval_every, self.eval_samples,
                        seed=self.seed, data=self.data).train_args(run_dir)
            return args[:-1] + list(EXTRA_ARGS) + args[-1:]
        return ["train", "--preset", self.data, "--data", self.data, "--backbone", "unet",
                "--unet-channels", ",".join(map(str, self.channels)), "--unet-layers", str(self.layers),
                "--steps", str(self.steps), "--ckpt-every", str(self.eval_every), "--sample-every", str(self.eval_every),
                "--eval-samples", str(self.eval_samples), *[str(a) for kv in RECIPE.items() for a in kv],
                "--seed", str(self.seed), "--out", run_dir, *EXTRA_ARGS, "--no-progress"]


def measure(cell: BackboneCell) -> BackboneCell:
    from dits.flop_counter import count_gflops, count_params

    cfg = cell.model_config()
    cell.gflops, cell.params = count_gflops(cfg), count_params(cfg)
    return cell


def build_grid(budget: str = "quick", data: str = DEFAULT_DATA) -> list[BackboneCell]:
    """The study's cells, smallest training compute first (the seed repeats after their cells)."""
    from dits.study.grid import check_data

    check_data(data)
    if budget not in BUDGETS:
        raise UserError(f"unknown budget {budget!r}; choose one of: {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    common = dict(steps=b["steps"], eval_every=b["eval_every"], eval_samples=b["eval_samples"], data=data)
    cells = []
    for i, ((size, patch), c) in enumerate(PAIRS[data][budget]):
        cells.append(BackboneCell(dit_name(size, patch), "dit", pair=i, size=size, patch=patch, **common))
        cells.append(BackboneCell(unet_name(c), "unet", pair=i, channels=(c, 2 * c), **common))
    for cell in [c for c in cells if c.pair == b["repeat"]]:
        cells.append(BackboneCell(f"{cell.name}-seed1", cell.family, pair=cell.pair, seed=1, size=cell.size,
                                  patch=cell.patch, channels=cell.channels, **common))
    return sorted((measure(c) for c in cells), key=lambda c: (c.seed, c.train_compute(), c.family))


def pairs(cells: list[BackboneCell]) -> list[tuple[BackboneCell, BackboneCell]]:
    """(DiT, U-Net) of each Gflops level, seed 0."""
    first = [c for c in cells if not c.seed]
    return [(next(c for c in first if c.pair == i and c.family == "dit"),
             next(c for c in first if c.pair == i and c.family == "unet"))
            for i in sorted({c.pair for c in first})]


def gflops_ratio(a: float, b: float) -> float:
    """max / min of two Gflops: 1.0 for equal, 1.25 at the tolerance."""
    return max(a, b) / min(a, b)


def check_pairs(cells: list[BackboneCell], tolerance: float = TOLERANCE) -> None:
    for d, u in pairs(cells):
        r = gflops_ratio(d.gflops, u.gflops)
        if r > tolerance:
            raise UserError(f"{d.label} ({d.gflops * 1e3:.3g} Mflops) and {u.label} ({u.gflops * 1e3:.3g} Mflops) differ "
                            f"by {100 * (r - 1):.0f} % in Gflops, more than the study's {100 * (tolerance - 1):.0f} %")


# ------------------------------------------------------------------ reading the runs
@dataclass
class BackboneRun:
    """What one cell's run dir says."""
    name: str
    family: str
    label: str
    pair: int
    seed: int
    planned_steps: int
    status: str = "missing"      # done | partial | failed | missing
    error: str = ""
    gflops: float = float("nan")
    params: int = 0
    evals: list = field(default_factory=list)
    samples: Path | None = None

    @property
    def last(self) -> dict | None:
        return self.evals[-1] if self.evals else None

    def value(self, key: str):
        return (self.last or {}).get(key)

    def compute(self, step: int) -> float:
        return self.gflops * 3 * BATCH_SIZE * step

    def curve(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.evals if r.get(key) is not None]


def _config_numbers(cfg: dict, data: str) -> tuple[float, int]:
    """Gflops and parameters of the model a run's config.yaml describes, by the study's one counter."""
    from dits.flop_counter import count_gflops, count_params
    from dits.models import config_for
    from dits.models.unet import DEFAULT_CHANNELS, DEFAULT_LAYERS, UNetConfig

    side = DATA_SETS[data]["image_size"]
    learn_sigma = cfg.get("learn_sigma")
    learn_sigma = cfg.get("objective", "diffusion") == "diffusion" if learn_sigma is None else bool(learn_sigma)
    if cfg.get("backbone", "dit") == "unet":
        mc = UNetConfig(input_size=side, in_channels=IN_CHANNELS, channels=cfg.get("unet_channels") or DEFAULT_CHANNELS,
                        layers=cfg.get("unet_layers") or DEFAULT_LAYERS, num_classes=NUM_CLASSES, learn_sigma=learn_sigma)
    else:
        mc = config_for("DiT", depth=cfg["depth"], hidden_size=cfg["hidden_size"], num_heads=cfg["num_heads"],
                        patch_size=cfg["patch_size"], input_size=side, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES,
                        block=cfg.get("block", "adaln-zero"), learn_sigma=learn_sigma)
    return count_gflops(mc), count_params(mc)


def read_run(out: Path, cell: BackboneCell, data: str) -> BackboneRun:
    from dits.checkpoint import latest_checkpoint
    from dits.study.report import _read_evals
    from dits.study.runner import run_dir

    d = run_dir(out, cell)
    run = BackboneRun(cell.name, cell.family, cell.label, cell.pair, cell.seed, cell.steps)
    failed = Path(out) / "logs" / f"{cell.name}.failed"
    if failed.is_file():
        run.status, run.error = "failed", failed.read_text().strip()
    cfg_path = d / "config.yaml"
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        run.planned_steps = int(cfg.get("steps", run.planned_steps))
        run.gflops, run.params = _config_numbers(cfg, data)
        run.evals = _read_evals(d / "eval.jsonl")
        pngs = sorted(d.glob("samples_*.png"))
        run.samples = pngs[-1] if pngs else None
        ckpt = latest_checkpoint(d)
        if ckpt is not None and int(ckpt.stem) >= run.planned_steps and (d / "summary.json").is_file():
            run.status, run.error = "done", ""
        elif run.status != "failed":
            run.status = "partial" if ckpt is not None else "missing"
    return run


# ------------------------------------------------------------------ the table
COLUMNS = ("run", "family", "model", "pair", "seed", "params", "gflops", "steps", "train_compute", "fd", "fd_heldout",
           "heldout_ratio", "accuracy", "heldout_loss", "train_loss", "loss_gap", "status")


def rows(runs: list[BackboneRun]) -> list[dict]:
    from dits.study.report import heldout_ratio

    out = []
    for r in runs:
        last = r.last or {}
        step = last.get("step")
        out.append({"run": r.name, "family": r.family, "model": r.label, "pair": r.pair, "seed": r.seed,
                    "params": r.params or None, "gflops": None if math.isnan(r.gflops) else r.gflops, "steps": step,
                    "train_compute": r.compute(step) if step else None, "fd": last.get("fd"),
                    "fd_heldout": last.get("fd_heldout"), "heldout_ratio": heldout_ratio(last) if last else None,
                    "accuracy": last.get("accuracy"), "heldout_loss": last.get("heldout_mse"),
                    "train_loss": last.get("train_mse"), "loss_gap": last.get("loss_gap"),
                    "status": r.status if not r.error else f"failed ({r.error})"})
    return out


def to_csv(table: list[dict]) -> str:
    from dits.study.report import to_csv as write_csv

    return write_csv(table, COLUMNS)


def to_markdown_table(table: list[dict]) -> str:
    from dits.study.report import _f, quality_cells

    head = ("| run | family | model | params | Mflops | steps | training compute (Gflops) | held-out FD | "
            "held-out ratio | accuracy | held-out loss | gap | status |\n|" + "---|" * 13 + "\n")
    body = "".join(
        f"| {r['run']} | {r['family']} | {r['model']} | {_f(r['params'], ',')} | "
        f"{_f(None if r['gflops'] is None else 1e3 * r['gflops'], '.3g')} | {_f(r['steps'], 'd')} | "
        f"{_f(r['train_compute'], '.3g')} | {_f(r['fd_heldout'] if r['fd_heldout'] is not None else r['fd'], '.3f')} | "
        f"{quality_cells(r)}\n" for r in table)
    return head + body


# ------------------------------------------------------------------ verdicts
def _seed0_done(runs: list[BackboneRun], key: str) -> list[BackboneRun]:
    return [r for r in runs if not r.seed and r.status == "done" and r.value(key) is not None]


def _side(wins: int, ties: int, losses: int) -> str:
    """Who is ahead by the house rule (study.report._holds): 'dit', 'unet' or 'neither'."""
    from dits.study.report import _holds

    return "dit" if _holds(wins, ties, losses) else "unet" if _holds(losses, ties, wins) else "neither"


def _decide(results: list[str]) -> dict:
    """wins / ties / losses (DiT's view), the side ahead and the verdict on the paper's claim."""
    from dits.study.report import _tally

    w, t, lo = _tally(results)
    side = _side(w, t, lo)
    return {"wins": w, "ties": t, "losses": lo, "side": side,
            "verdict": {"dit": "reproduced", "unet": "reversed", "neither": "not reproduced"}[side]}


def verdict_matched_gflops(runs: list[BackboneRun], key: str, spread: float | None) -> dict:
    """The claim at matched Gflops: per pair, the DiT's final value against the U-Net's
    (lower is better); a margin within the seed spread is a tie."""
    from dits.study.report import METRIC_NAMES, _rule, _v, compare

    name = METRIC_NAMES.get(key, key)
    done = _seed0_done(runs, key)
    results, lines = [], []
    for i in sorted({r.pair for r in done}):
        d = next((r for r in done if r.pair == i and r.family == "dit"), None)
        u = next((r for r in done if r.pair == i and r.family == "unet"), None)
        if d is None or u is None:
            continue
        res = compare(d.value(key), u.value(key), spread)
        results.append(res)
        lines.append(f"{d.label} {_v(d.value(key))} vs {u.label} {_v(u.value(key))} "
                     f"({1e3 * d.gflops:.3g} vs {1e3 * u.gflops:.3g} Mflops): "
                     f"{ {'win': 'DiT ahead', 'loss': 'U-Net ahead', 'tie': 'tie'}[res]}")
    if not results:
        return {"finding": "A", "verdict": "not enough cells", "metric": key, "text": f"[{name}] no finished pair"}
    dec = _decide(results)
    w, t, lo = dec["wins"], dec["ties"], dec["losses"]
    return {"finding": "A", **dec, "metric": key, "spread": spread, "pairs": lines,
            "text": f"[{name}] at matched Gflops the DiT was ahead in {w} of {len(results)} pairs, the U-Net in {lo}, "
                    f"{t} within the seed spread ({'; '.join(lines)}){_rule(spread)}"}


def verdict_compute(runs: list[BackboneRun], key: str, spread: float | None) -> dict:
    """At equal training compute: every DiT against every U-Net whose evaluated compute range
    overlaps its own, at the most compute both reached (interpolated in log compute)."""
    from dits.study.report import METRIC_NAMES, _rule, _v, at_equal_compute, compare

    name = METRIC_NAMES.get(key, key)
    rs = [r for r in runs if not r.seed and r.status != "failed" and r.curve(key)]
    results, lines = [], []
    for d in [r for r in rs if r.family == "dit"]:
        for u in [r for r in rs if r.family == "unet"]:
            both = at_equal_compute(d, u, key)
            if both is None:
                continue
            hi, a, b = both
            results.append(compare(a, b, spread))
            lines.append(f"{d.label} {_v(a)} vs {u.label} {_v(b)} at {hi:.3g} Gflops")
    if not results:
        return {"finding": "B", "verdict": "not enough overlap", "metric": key,
                "text": f"[{name}] no DiT and U-Net share a range of training compute"}
    dec = _decide(results)
    w, t, lo = dec["wins"], dec["ties"], dec["losses"]
    return {"finding": "B", **dec, "metric": key, "spread": spread, "pairs": lines,
            "text": f"[{name}] at equal training compute the DiT was ahead in {w} of {len(results)} overlapping (DiT, "
                    f"U-Net) comparisons, the U-Net in {lo}, {t} within the seed spread ({'; '.join(lines[:6])}"
                    f"{'; …' if len(lines) > 6 else ''}){_rule(spread)}"}


def verdict_scaling(runs: list[BackboneRun], key: str) -> dict:
    """Within each family: does the metric fall as Gflops grow (Spearman rho over its finished cells)?"""
    from dits.study.report import METRIC_NAMES
    from dits.study.stats import spearman

    name = METRIC_NAMES.get(key, key)
    rho = {}
    for fam in FAMILIES:
        rs = [r for r in _seed0_done(runs, key) if r.family == fam]
        rho[fam] = spearman([r.gflops for r in rs], [r.value(key) for r in rs]) if len(rs) >= 3 else float("nan")
    parts = [f"{FAMILY_LABEL[f]} rho(Gflops, final value) = {'n/a' if math.isnan(v) else f'{v:.2f}'}"
             for f, v in rho.items()]
    ok = all(not math.isnan(v) and v <= -0.9 for v in rho.values())
    return {"finding": "C", "verdict": "both scale" if ok else "not both", "rho": rho, "metric": key,
            "text": f"[{name}] " + "; ".join(parts) + " (each family improves with its Gflops if rho <= -0.9)"}


def claim_line(v: dict, spread: float | None) -> str:
    """The verdict on the paper's claim, in one plain sentence."""
    from dits.study.report import METRIC_NAMES

    name = METRIC_NAMES.get(v.get("metric"), v.get("metric"))
    s = "no seed spread measured" if spread is None else f"seed spread {100 * (math.exp(spread) - 1):.1f} %"
    if v["verdict"] == "reproduced":
        head = "The paper's claim holds here: at matched Gflops the DiT beats the U-Net"
    elif v["verdict"] == "reversed":
        head = "The paper's claim does not hold here, it is reversed: at matched Gflops the U-Net beats the DiT"
    elif v["verdict"] == "not reproduced":
        head = "The paper's claim is not reproduced here: at matched Gflops neither family is ahead by the rule"
    else:
        return f"No verdict on the paper's claim yet ({v['text']})."
    return (f"{head} (on {name}: DiT ahead in {v['wins']}, U-Net ahead in {v['losses']}, ties {v['ties']} of "
            f"{v['wins'] + v['ties'] + v['losses']} pairs; {s}).")


# ------------------------------------------------------------------ figures
def _fig():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_vs_gflops(runs: list[BackboneRun], path: Path, keys: list[str], data: str) -> str:
    from dits.study.report import METRIC_NAMES, _save, _ylabel

    plt = _fig()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for fam in FAMILIES:
            rs = sorted([r for r in runs if r.family == fam and r.status == "done" and r.value(key) is not None],
                        key=lambda r: r.gflops)
            first = [r for r in rs if not r.seed]
            if first:
                ax.plot([1e3 * r.gflops for r in first], [r.value(key) for r in first], marker="o",
                        color=FAMILY_COLOR[fam], label=FAMILY_LABEL[fam])
                for r in first:
                    ax.annotate(r.label, (1e3 * r.gflops, r.value(key)), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
            rep = [r for r in rs if r.seed]
            if rep:
                ax.scatter([1e3 * r.gflops for r in rep], [r.value(key) for r in rep], facecolors="none",
                           edgecolors=FAMILY_COLOR[fam], label=f"{FAMILY_LABEL[fam]} seed 1")
        ax.set(xscale="log", yscale="log", xlabel="Mflops (forward, one image; FlopCounterMode)",
               ylabel=f"final {_ylabel(key, data)}", title=f"{METRIC_NAMES.get(key, key)} vs Gflops")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Fig. 2 (right) style: DiT and U-Net at matched forward compute (lower is better)", fontsize=10)
    return _save(plt, fig, path)


def plot_vs_compute(runs: list[BackboneRun], path: Path, keys: list[str], data: str) -> str:
    from dits.study.report import METRIC_NAMES, _save, _ylabel

    plt = _fig()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    styles = ["-", "--", ":", "-.", (0, (1, 1)), (0, (5, 1))]
    for ax, key in zip(axes[0], keys):
        for r in [r for r in runs if not r.seed and r.curve(key)]:
            c = r.curve(key)
            ax.plot([r.compute(s) for s, _ in c], [v for _, v in c], marker="o", markersize=3,
                    color=FAMILY_COLOR[r.family], linestyle=styles[r.pair % len(styles)], label=r.label)
        ax.set(xscale="log", yscale="log", xlabel="training compute, Gflop (Gflops × 3 × batch × steps)",
               ylabel=_ylabel(key, data), title=f"{METRIC_NAMES.get(key, key)} vs training compute")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Fig. 9 style: both families over training (blue DiT, red U-Net; line style = Gflops level)",
                 fontsize=10)
    return _save(plt, fig, path)


def plot_samples(runs: list[BackboneRun], path: Path) -> str | None:
    """Every cell's last sample grid: one row per family, one column per Gflops level."""
    from dits.study.report import _save

    rs = [r for r in runs if r.samples is not None and not r.seed]
    if not rs:
        return None
    plt = _fig()
    levels = sorted({r.pair for r in rs})
    fig, axes = plt.subplots(2, len(levels), figsize=(2.8 * len(levels), 5.8), squeeze=False)
    for i, fam in enumerate(FAMILIES):
        for j, lv in enumerate(levels):
            ax = axes[i][j]
            ax.axis("off")
            match = [r for r in rs if r.family == fam and r.pair == lv]
            if match:
                r = match[0]
                ax.imshow(plt.imread(r.samples), cmap="gray")
                ax.set_title(f"{r.label}\n{1e3 * r.gflops:.3g} Mflops, step {r.samples.stem.split('_')[-1].lstrip('0')}",
                             fontsize=8)
    fig.suptitle("samples (one row per class) of every cell: DiT above, U-Net below, matched Gflops per column",
                 fontsize=9)
    return _save(plt, fig, path)


# ------------------------------------------------------------------ the report
def write_report(out: str | Path, budget: str, data: str | None = None) -> dict:
    """Read the study's run dirs; write study.csv, study.md and the figures. Returns {"rows",
    "verdicts", "files", "spread", "claim"} (``verdicts`` as the other study kinds', for the CLI)."""
    from dits.fileio import write_text_atomic
    from dits.study.report import seed_spread, study_data

    out = Path(out)
    data = data or study_data(out)
    key, loss_key = DATA_SETS[data]["metric"], DATA_SETS[data]["loss"]
    cells = build_grid(budget, data)
    runs = [read_run(out, c, data) for c in cells]
    table = rows(runs)
    write_text_atomic(out / "study.csv", to_csv(table))
    spread = {k: seed_spread(runs, k) for k in (key, loss_key)}
    verdicts = [verdict_matched_gflops(runs, key, spread[key]), verdict_compute(runs, key, spread[key]),
                verdict_scaling(runs, key)]
    if any(r.value(loss_key) is not None for r in runs):
        verdicts += [verdict_matched_gflops(runs, loss_key, spread[loss_key]),
                     verdict_compute(runs, loss_key, spread[loss_key]), verdict_scaling(runs, loss_key)]
    keys = [key] + ([loss_key] if any(r.value(loss_key) is not None for r in runs) else [])
    figs = [plot_vs_gflops(runs, out / "backbones_vs_gflops.png", keys, data),
            plot_vs_compute(runs, out / "backbones_vs_compute.png", keys, data),
            plot_samples(runs, out / "backbones_samples.png")]
    figs = [f for f in figs if f]
    claim = claim_line(verdicts[0], spread[key])
    write_text_atomic(out / "study.md", markdown(budget, data, cells, table, verdicts, figs, spread, key, claim))
    summary = {"claim": claim, "verdicts": verdicts, "spread": spread}
    write_text_atomic(out / "verdict.json", json.dumps(summary, indent=2, default=str) + "\n")
    return {"rows": table, "verdicts": verdicts, "files": ["study.csv", "study.md", "verdict.json", *figs],
            "spread": spread, "claim": claim}


def markdown(budget, data, cells, table, verdicts, figs, spread, key, claim) -> str:
    from dits.study.report import METRIC_NAMES

    lines = [f"# dits study backbones ({budget} budget, data {data})", "", f"**{claim}**", "",
             "DiTs against U-Nets (diffusers' UNet2DModel, ADM-style: docs/backbones.md) through the same Gaussian "
             "diffusion, sampler, recipe, steps and seeds. Gflops: forward, one image, both families counted by "
             f"FlopCounterMode (dits.flop_counter); training compute = Gflops × 3 × batch {BATCH_SIZE} × steps. "
             f"Verdicts rank by {METRIC_NAMES.get(key, key)} (lower is better), then again by the held-out loss; "
             "a comparison is a win only beyond the seed-to-seed spread.", ""]
    for k, s in spread.items():
        if s is not None:
            lines.append(f"Seed-to-seed spread of {METRIC_NAMES.get(k, k)} (largest over the repeated cells): "
                         f"{100 * (math.exp(s) - 1):.1f} %.")
    lines += ["", "## The pairs", "", "| level | DiT | Mflops | U-Net | Mflops | ratio |", "|---|---|---|---|---|---|"]
    for d, u in pairs(cells):
        lines.append(f"| {d.pair} | {d.label} | {1e3 * d.gflops:.3g} | {u.label} | {1e3 * u.gflops:.3g} | "
                     f"{gflops_ratio(d.gflops, u.gflops):.2f} |")
    lines += ["", "## Cells", "", to_markdown_table(table), "## Verdicts", ""]
    for v in verdicts:
        lines.append(f"- **{v['finding']}: {v['verdict']}.** {v['text']}")
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    return "\n".join(lines) + "\n"
