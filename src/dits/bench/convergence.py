"""``dits bench convergence``: time to quality of the training options, against the preset.

Each (variant, seed) is an ordinary ``dits train`` run of a built-in data set's preset with the
variant's extra flags (``VARIANTS``, or ``--variant NAME='FLAGS'``), all at the same steps and
evaluated every ``--eval-every`` steps (the data set's metric and the held-out denoising loss,
``eval.jsonl``). The runs live in ``OUT/runs/<variant>-seed<k>/`` and are trained by the study's
runner (:func:`dits.study.runner.train_cells`): finished runs are skipped, partial ones resumed,
``--jobs`` at a time. From the run dirs alone come

* ``OUT/convergence.csv``: one row per evaluation (variant, seed, step, seconds, the metrics);
* ``OUT/convergence.md``: per variant the final metrics (median over seeds, spread max − min) and
  the steps and seconds at which it first reaches the baseline's final held-out FD ratio and
  held-out loss, as a fraction of the baseline's (linear interpolation between evaluations);
* ``OUT/convergence_steps.png`` / ``OUT/convergence_seconds.png``: the metrics against training
  steps and against training seconds.

"Seconds" is training wall time: the sum over ``metrics.jsonl`` log intervals of steps / ``steps_per_s``,
where an interval that followed an evaluation (its time includes sampling and the checkpoint) counts
at the run's median rate instead. The held-out loss is the loss of the run's own objective at its own
t-density, so it is compared only between runs that share both with the baseline.
"""
from __future__ import annotations

import contextlib
import io
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from dits.errors import UserError

# name -> (extra `dits train` flags, what it is). Flags of options not built yet make the variant
# unavailable (skipped from the default list, refused when named); see docs/convergence.md.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "baseline": ([], "the preset as it is"),
    # the digits preset trains flow + logit-normal t since issue 21; the variants measured against
    # the diffusion preset before it name the objective, so they mean the same on either preset
    "diffusion": (["--objective", "diffusion"], "the paper's Gaussian diffusion (the digits preset before issue 21)"),
    "min-snr": (["--objective", "diffusion", "--loss-weighting", "min-snr:5"],
                "diffusion with Min-SNR-γ loss weighting, γ = 5 (arXiv 2303.09556)"),
    "flow": (["--objective", "flow", "--t-sampling", "uniform"], "rectified flow, uniform t (SiT)"),
    "flow-logit-normal": (["--objective", "flow", "--t-sampling", "logit-normal"],
                          "rectified flow, logit-normal t (SD3, arXiv 2403.03206)"),
    "swiglu": (["--mlp", "swiglu"], "SwiGLU MLP"),
    "rmsnorm": (["--norm", "rmsnorm"], "RMSNorm"),
    "rope": (["--pos", "rope"], "rotary position embedding"),
    "beta2": (["--adam-beta2", "0.95"], "AdamW β₂ 0.95"),
    "mask50": (["--objective", "diffusion", "--mask-ratio", "0.5"],
               "diffusion, MaskDiT: 50 % of the tokens dropped (arXiv 2306.09305)"),
    "lightning": (["--objective", "flow", "--t-sampling", "logit-normal", "--mlp", "swiglu", "--norm", "rmsnorm",
                   "--pos", "rope", "--adam-beta2", "0.95"],
                  "LightningDiT's recipe without its velocity-direction loss (arXiv 2501.01423)"),
}
BASELINE = "baseline"
# set by the bench for every run: a variant may not change them
CONTROLLED = ("--preset", "--data", "--steps", "--seed", "--out", "--resume", "--overwrite", "--ckpt-every",
              "--sample-every", "--eval-samples", "--keep-last", "--no-progress", "--help")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.+-]*\Z")
COLUMNS = ("variant", "seed", "step", "seconds", "accuracy", "fd_heldout_ratio", "heldout_mse", "fd")
# (eval key, label, higher is better)
METRICS = (("accuracy", "class accuracy, %", True), ("fd_heldout_ratio", "held-out FD / real-data level", False),
           ("heldout_mse", "held-out loss (L_simple)", False))
TARGETS = ("fd_heldout_ratio", "heldout_mse")   # the baseline's final values the variants race to
DEFAULT_EVAL_SAMPLES = 500
EVALS_PER_RUN = 8


# ------------------------------------------------------------------ pure computation
def interp(points: list[tuple[float, float]], x: float) -> float | None:
    """y at ``x`` by linear interpolation between sorted (x, y) points; None outside their range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y1 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return pts[-1][1]


def first_reach(curve: list[tuple[float, float]], target: float, higher_better: bool = False) -> float | None:
    """The x at which the curve first reaches ``target`` (at or below it; above with ``higher_better``),
    interpolated linearly between the last evaluation short of it and the first one at it; the first
    evaluation's x when that one already is; None if it never does."""
    prev = None
    for x, y in sorted(curve):
        if y is None or (isinstance(y, float) and math.isnan(y)):
            continue
        if (y >= target) if higher_better else (y <= target):
            if prev is None or prev[1] == y:
                return float(x)
            x0, y0 = prev
            return x0 + (target - y0) / (y - y0) * (x - x0)
        prev = (x, y)
    return None


def training_seconds(log: list[tuple[int, float]], after_eval: set[int] = frozenset()) -> list[tuple[int, float]]:
    """Cumulative training seconds at each logged step, from (step, steps_per_s) log lines: the
    interval up to a line took (step − previous step) / steps_per_s; an interval that starts at a
    step in ``after_eval`` (it also timed an evaluation and a checkpoint) counts at the median rate
    of the other intervals."""
    log = sorted(log)
    starts = [0] + [s for s, _ in log[:-1]]
    clean = [r for (_, r), s0 in zip(log, starts) if r and r > 0 and s0 not in after_eval]
    med = median(clean or [r for _, r in log if r and r > 0])
    out, prev, total = [(0, 0.0)], 0, 0.0
    for step, rate in sorted(log):
        if step <= prev:
            continue
        r = med if (prev in after_eval or not rate or rate <= 0) else rate
        total += (step - prev) / r if r else 0.0
        out.append((step, total))
        prev = step
    return out


def median(values: list[float | None]) -> float | None:
    """The median, a missing value (None) counting as worse than any (+inf); None if it lands on one."""
    if not values:
        return None
    v = sorted(math.inf if x is None else x for x in values)
    n = len(v)
    m = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return None if math.isinf(m) else m


def spread(values: list[float | None]) -> float | None:
    """max − min over the seeds; None unless every seed has a value (and there are two)."""
    if len(values) < 2 or any(x is None for x in values):
        return None
    return max(values) - min(values)


# ------------------------------------------------------------------ variants and cells
def parse_custom(specs: list[str]) -> dict[str, list[str]]:
    """``NAME='--flag v --flag2 v'`` (repeatable) -> {NAME: flags}."""
    out = {}
    for spec in specs or []:
        name, eq, flags = spec.partition("=")
        name = name.strip()
        if not eq or not NAME_RE.match(name):
            raise UserError(f"--variant {spec!r}: write NAME='--flag VALUE ...' (NAME: lower-case letters, digits, "
                            "- _ . +)")
        if name in VARIANTS or name in out:
            raise UserError(f"--variant {name}: the name is {'built in' if name in VARIANTS else 'given twice'}; "
                            "pick another")
        try:
            out[name] = shlex.split(flags)
        except ValueError as e:
            raise UserError(f"--variant {name}: cannot split its flags ({e})") from None
    return out


def _train_parser():
    from dits.cli import build_parser
    return build_parser().subcommands["train"]


def _who(name: str) -> str:
    return name if name.startswith("--") else f"variant {name}"


def check_flags(name: str, flags: list[str], parser=None) -> None:
    """Refuse flags this `dits train` does not know (exactly, no abbreviations) or the bench sets."""
    parser = parser or _train_parser()
    for tok in flags:
        if not tok.startswith("--"):
            continue
        opt = tok.split("=", 1)[0]
        if opt in CONTROLLED:
            raise UserError(f"{_who(name)}: {opt} is set by dits bench convergence for every run; drop it")
        if opt not in parser._option_string_actions:
            raise UserError(f"{_who(name)}: flag {opt} unknown to this dits train")


def resolve(name: str, data: str, flags: list[str], parser=None):
    """The TrainConfig `dits train --preset DATA FLAGS` would train (bad values: one line, the variant named)."""
    from dits.config import TrainConfig, resolve_config

    parser = parser or _train_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args, extra = parser.parse_known_args(["--preset", data, "--data", data, *flags])
    except SystemExit:
        msg = next((ln.split("error:", 1)[1].strip() for ln in err.getvalue().splitlines() if "error:" in ln),
                   "bad flags")
        raise UserError(f"{_who(name)}: {msg}") from None
    if extra:
        raise UserError(f"{_who(name)}: {' '.join(extra)} not understood by dits train")
    overrides = {k: getattr(args, k) for k in TrainConfig.fields()}
    if overrides.get("log") is not None:
        overrides["log"] = ",".join(overrides["log"])
    try:
        return resolve_config(data, overrides)
    except ValueError as e:
        raise UserError(f"{_who(name)}: {e}") from None


def _gflops(cfg) -> tuple[float, int]:
    """Forward Gflops and parameters of the run's model (for the runner's estimate and the table)."""
    try:
        import torch

        from dits.flops import count_gflops, count_params
        from dits.train.loop import build_model

        with torch.device("meta"):
            m = build_model(cfg, 1, cfg.image_size, 10)
        return count_gflops(m), count_params(m)
    except Exception:  # an option the counter does not know yet: only the estimate suffers
        return 0.0, 0


@dataclass
class Cell:
    """One (variant, seed) run, in the shape :func:`dits.study.runner.train_cells` runs."""
    variant: str
    seed: int
    flags: list[str]
    steps: int
    eval_every: int
    eval_samples: int
    data: str
    common: list[str] = field(default_factory=list)   # --train-args: for every run
    gflops: float = 0.0
    params: int = 0
    tokens: int = 0

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}"

    @property
    def shape_note(self) -> str:
        return " ".join(self.common + self.flags) or "the preset"

    def train_args(self, run_dir: str) -> list[str]:
        return ["train", "--preset", self.data, "--data", self.data, "--steps", str(self.steps),
                "--ckpt-every", str(self.eval_every), "--sample-every", str(self.eval_every),
                "--eval-samples", str(self.eval_samples), "--keep-last", "1", "--seed", str(self.seed),
                *self.common, *self.flags, "--out", run_dir, "--no-progress"]


def available(parser=None) -> tuple[list[str], dict[str, str]]:
    """The table's variants this `dits train` can run, and {name: why not} for the others."""
    parser = parser or _train_parser()
    ok, why = [], {}
    for name, (flags, _) in VARIANTS.items():
        try:
            check_flags(name, flags, parser)
            ok.append(name)
        except UserError as e:
            why[name] = str(e)
    return ok, why


def build_cells(data: str, variants: list[str] | None, custom: dict[str, list[str]], seeds: int, steps: int | None,
         eval_every: int | None, eval_samples: int, common: list[str]) -> tuple[list[Cell], dict, list[str]]:
    """Check everything and build the cells (nothing written): (cells, {variant: flags}, notes)."""
    from dits.data.builtin import is_builtin

    if not is_builtin(data):
        raise UserError(f"--data {data!r}: dits bench convergence runs a built-in data set (digits, glyphs)")
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if eval_samples < 1:
        raise UserError(f"--eval-samples must be at least 1, got {eval_samples}")
    parser = _train_parser()
    notes = []
    if variants is None:
        names, why = available(parser)
        notes += [f"skipped {why_not}" for why_not in why.values()]
    else:
        names = [v.strip() for v in variants if v.strip()]
        unknown = [v for v in names if v not in VARIANTS and v not in custom]
        if unknown:
            raise UserError(f"unknown variant {unknown[0]!r}; choose from: {', '.join(VARIANTS)} "
                            "(or define one with --variant NAME='FLAGS')")
    names = [BASELINE] + [n for n in dict.fromkeys([*names, *custom]) if n != BASELINE]
    table = {n: (custom[n] if n in custom else list(VARIANTS[n][0])) for n in names}
    check_flags("--train-args", common, parser)
    base_cfg = resolve("--train-args", data, common, parser)
    steps = base_cfg.steps if steps is None else steps
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    eval_every = max(1, steps // EVALS_PER_RUN) if eval_every is None else eval_every
    if not 1 <= eval_every <= steps:
        raise UserError(f"--eval-every must be in 1..{steps} (--steps), got {eval_every}")
    cells = []
    for n in names:
        check_flags(n, table[n], parser)
        cfg = resolve(n, data, [*common, *table[n], "--steps", str(steps)], parser)
        g, p = _gflops(cfg)
        tokens = (cfg.image_size // cfg.patch_size) ** 2 if cfg.patch_size else 0
        cells += [Cell(n, s, table[n], steps, eval_every, eval_samples, data, list(common), g, p, tokens)
                  for s in range(seeds)]
    return cells, table, notes


def budget(cells: list[Cell]) -> str:
    """What must match for an --out to be continued (the study manifest's 'budget')."""
    c = cells[0]
    extra = f", train args {' '.join(c.common)}" if c.common else ""
    return f"{c.steps} steps, eval every {c.eval_every} x {c.eval_samples} samples{extra}"


# ------------------------------------------------------------------ reading the run dirs
@dataclass
class RunCurve:
    variant: str
    seed: int
    status: str                         # done | partial | failed | missing
    points: list[dict]                  # one per evaluation: step, seconds and the metrics
    objective: str = "diffusion"
    t_sampling: str = "uniform"
    planned_steps: int = 0

    def curve(self, key: str, x: str = "step") -> list[tuple[float, float]]:
        return [(p[x], p[key]) for p in self.points if p.get(key) is not None and p.get(x) is not None]

    @property
    def final(self) -> dict:
        return self.points[-1] if self.points else {}


def read_curve(out: Path, cell: Cell) -> RunCurve:
    import yaml

    from dits.study.report import _read_evals, heldout_ratio
    from dits.study.runner import cell_state, run_dir

    d = run_dir(out, cell)
    state = cell_state(out, cell)
    status = {"new": "missing"}.get(state, state)
    if status != "done" and (Path(out) / "logs" / f"{cell.name}.failed").is_file():
        status = "failed"
    cfg = {}
    if (d / "config.yaml").is_file():
        cfg = yaml.safe_load((d / "config.yaml").read_text()) or {}
    evals = _read_evals(d / "eval.jsonl")
    log = [(int(r["step"]), r.get("steps_per_s")) for r in _read_evals(d / "metrics.jsonl")]
    secs = training_seconds(log, {int(r["step"]) for r in evals})
    points = [{"step": int(r["step"]), "seconds": interp(secs, int(r["step"])), "accuracy": r.get("accuracy"),
               "fd_heldout_ratio": heldout_ratio(r), "heldout_mse": r.get("heldout_mse"), "fd": r.get("fd")}
              for r in evals]
    return RunCurve(cell.variant, cell.seed, status, points, cfg.get("objective", "diffusion"),
                    str(cfg.get("t_sampling", "uniform")), int(cfg.get("steps", cell.steps)))


def comparable(run: RunCurve, base: RunCurve, key: str) -> bool:
    """The held-out loss is the run's own objective's at its own t-density: comparable only when both match."""
    return key != "heldout_mse" or (run.objective, run.t_sampling) == (base.objective, base.t_sampling)


# ------------------------------------------------------------------ the summary
def summarise(runs: list[RunCurve]) -> list[dict]:
    """One row per variant (baseline first): final metrics (median, spread over seeds) and, per target
    metric, the steps and seconds to the baseline's final value as fractions of the baseline's."""
    by = {}
    for r in runs:
        by.setdefault(r.variant, []).append(r)
    base = [r for r in by.get(BASELINE, []) if r.points]
    targets = {k: median([r.final.get(k) for r in base]) for k in TARGETS} if base else {}
    base_steps = median([r.final.get("step") for r in base]) if base else None
    base_secs = median([r.final.get("seconds") for r in base]) if base else None
    rows = []
    for variant, rs in by.items():
        done = [r for r in rs if r.points]
        row = {"variant": variant, "seeds": len(rs), "evaluated": len(done),
               "status": ", ".join(sorted({r.status for r in rs})),
               "step": median([r.final.get("step") for r in done]) if done else None,
               "seconds": median([r.final.get("seconds") for r in done]) if done else None}
        for key, _, _ in METRICS:
            vals = [r.final.get(key) for r in done]
            row[key] = median(vals) if vals else None
            row[f"{key}_spread"] = spread(vals)
        for key in TARGETS:
            target = targets.get(key)
            ok = target is not None and done and all(comparable(r, base[0], key) for r in done)
            row[f"{key}_target"] = target
            row[f"{key}_comparable"] = not base or all(comparable(r, base[0], key) for r in done)
            for x, total in (("step", base_steps), ("seconds", base_secs)):
                fr = [None if not ok or not total else
                      (lambda v: None if v is None else v / total)(first_reach(r.curve(key, x), target))
                      for r in done]
                row[f"{key}_{x}_frac"] = median(fr) if ok else None
                row[f"{key}_{x}_frac_spread"] = spread(fr) if ok else None
                row[f"{key}_{x}_reached"] = sum(f is not None for f in fr) if ok else 0
        rows.append(row)
    return rows


def to_csv(runs: list[RunCurve]) -> str:
    from dits.study.report import to_csv as table_csv

    return table_csv([{"variant": r.variant, "seed": r.seed, **p} for r in runs for p in r.points], COLUMNS)


def _num(v, fmt: str, unit: str = "") -> str:
    return "–" if v is None else format(v, fmt) + unit


def _with_spread(row: dict, key: str, fmt: str, unit: str = "", scale: float = 1.0) -> str:
    v, s = row.get(key), row.get(f"{key}_spread")
    if v is None:
        return "–"
    return _num(v * scale, fmt, unit) + ("" if s is None else f" (Δ{format(s * scale, fmt)})")


def _frac(row: dict, key: str, x: str) -> str:
    if row.get(f"{key}_target") is None:
        return "–"
    if not row.get(f"{key}_comparable", True):
        return "n/a (own loss)"
    v, n, seeds = row.get(f"{key}_{x}_frac"), row.get(f"{key}_{x}_reached", 0), row.get("evaluated", 0)
    if v is None:
        return f"not reached ({n}/{seeds})"
    s = row.get(f"{key}_{x}_frac_spread")
    return f"{v:.2f}" + ("" if s is None else f" (Δ{s:.2f})") + ("" if n == seeds else f" ({n}/{seeds})")


def markdown_table(rows: list[dict]) -> str:
    head = ("| variant | seeds | steps | train s | accuracy | held-out FD | held-out loss | "
            "steps to base FD | seconds to base FD | steps to base loss | seconds to base loss |\n|"
            + "---|" * 11 + "\n")
    body = "".join(
        f"| {r['variant']} | {r['evaluated']}/{r['seeds']} | {_num(r['step'], '.0f')} | {_num(r['seconds'], '.0f')} | "
        f"{_with_spread(r, 'accuracy', '.1f', '%', 100)} | {_with_spread(r, 'fd_heldout_ratio', '.2f', '×')} | "
        f"{_with_spread(r, 'heldout_mse', '.4f')} | {_frac(r, 'fd_heldout_ratio', 'step')} | "
        f"{_frac(r, 'fd_heldout_ratio', 'seconds')} | {_frac(r, 'heldout_mse', 'step')} | "
        f"{_frac(r, 'heldout_mse', 'seconds')} |\n" for r in rows)
    return head + body


def per_seed_table(runs: list[RunCurve]) -> str:
    head = "| run | status | steps | train s | accuracy | held-out FD | held-out loss |\n|" + "---|" * 7 + "\n"
    body = "".join(
        f"| {r.variant} seed {r.seed} | {r.status} | {_num(r.final.get('step'), 'd')} | "
        f"{_num(r.final.get('seconds'), '.0f')} | "
        f"{_num(None if r.final.get('accuracy') is None else 100 * r.final['accuracy'], '.1f', '%')} | "
        f"{_num(r.final.get('fd_heldout_ratio'), '.2f', '×')} | {_num(r.final.get('heldout_mse'), '.4f')} |\n"
        for r in runs)
    return head + body


def machine() -> str:
    import torch

    from dits.plan import cpu_name
    return f"{cpu_name()}, torch {torch.__version__}"


def markdown(data: str, cells: list[Cell], table: dict, rows: list[dict], runs: list[RunCurve], figs: list[str],
             notes: list[str]) -> str:
    c = cells[0]
    flags = "".join(f"| {n} | `{' '.join(f) or '(none)'}` | {VARIANTS.get(n, ([], 'custom (--variant)'))[1]} |\n"
                    for n, f in table.items())
    base = next((r for r in rows if r["variant"] == BASELINE), {})
    tgt = (f"baseline's final held-out FD {_num(base.get('fd_heldout_ratio'), '.2f', '×')}, held-out loss "
           f"{_num(base.get('heldout_mse'), '.4f')}, after {_num(base.get('step'), '.0f')} steps and "
           f"{_num(base.get('seconds'), '.0f')} training seconds (medians over seeds)")
    return (f"# Time to quality on {data}: {', '.join(table)}\n\n"
            f"{c.steps} steps per run, {len({x.seed for x in cells})} seed(s) each, evaluated every {c.eval_every} "
            f"steps on {c.eval_samples} samples"
            + (f"; every run also got `{' '.join(c.common)}`" if c.common else "") + f". Machine: {machine()}.\n\n"
            "| variant | extra `dits train` flags | what |\n|---|---|---|\n" + flags + "\n"
            "## Final metrics and time to the baseline's final quality\n\n"
            f"Medians over seeds (Δ: max − min over seeds). Target: the {tgt}. \"steps/seconds to base\": "
            "when the run first reaches the target (linear interpolation between evaluations), as a fraction of "
            "the baseline's steps / seconds; ≤ 0.50 is the issue's goal; (k/n): seeds that reached it. "
            "\"n/a (own loss)\": another objective or t-density, whose held-out loss measures something else. "
            "Train s: training wall seconds (evaluations excluded).\n\n"
            + markdown_table(rows) + "\n## Per run\n\n" + per_seed_table(runs) + "\n"
            + "".join(f"![{f}]({f})\n\n" for f in figs)
            + "".join(f"- {n}\n" for n in notes))


# ------------------------------------------------------------------ figures
COLORS = ("black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
          "tab:olive", "tab:cyan", "tab:gray")


def _band(runs: list[RunCurve], key: str, x: str) -> tuple[list, list, list, list]:
    """At each step all of the variant's runs evaluated: median x, median y, min y, max y."""
    steps = sorted(set.intersection(*[{p["step"] for p in r.points if p.get(key) is not None} for r in runs]))
    xs, ys, lo, hi = [], [], [], []
    for s in steps:
        pts = [next(p for p in r.points if p["step"] == s) for r in runs]
        xv = median([p.get(x) for p in pts])
        if xv is None:
            continue
        v = [p[key] * (100 if key == "accuracy" else 1) for p in pts]
        xs.append(xv)
        ys.append(median(v))
        lo.append(min(v))
        hi.append(max(v))
    return xs, ys, lo, hi


def plot(runs: list[RunCurve], rows: list[dict], path: Path, x: str, title: str) -> str:
    from dits.study.report import _fig, _save

    plt = _fig()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.2 * len(METRICS), 4.2), squeeze=False)
    variants = list(dict.fromkeys(r.variant for r in runs))
    base = [r for r in runs if r.variant == BASELINE and r.points]
    targets = {r["variant"]: r for r in rows}.get(BASELINE, {})
    for ax, (key, label, higher) in zip(axes[0], METRICS):
        hidden = []
        for i, v in enumerate(variants):
            rs = [r for r in runs if r.variant == v and r.curve(key, x)]
            if rs and base and not all(comparable(r, base[0], key) for r in rs):
                hidden.append(v)
            if not rs or v in hidden:
                continue
            xs, ys, lo, hi = _band(rs, key, x)
            color = COLORS[i % len(COLORS)]
            ax.plot(xs, ys, marker="o", markersize=3, color=color, label=f"{v} ({len(rs)} seed{'s' * (len(rs) > 1)})")
            if len(rs) > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
        if targets.get(key) is not None and key in TARGETS:
            ax.axhline(targets[key], color="0.5", linestyle="--", linewidth=0.8, label="baseline's final")
        ax.set(xlabel="training steps" if x == "step" else "training wall time, s (evaluations excluded)",
               ylabel=label + (" (higher is better)" if higher else " (lower is better)"))
        lo, hi = ax.get_ylim()
        if key != "accuracy" and lo > 0 and hi / lo > 3:  # ratios and losses over a wide range: log, plain labels
            from matplotlib.ticker import FuncFormatter
            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FuncFormatter(lambda v, _: f"{v:.3g}"))
        if hidden:
            ax.set_title(f"not shown: {', '.join(hidden)} (another objective or t-density)", fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


# ------------------------------------------------------------------ the command
def write_report(out: Path, data: str, cells: list[Cell], table: dict, notes: list[str]) -> tuple[str, list[dict]]:
    from dits.fileio import write_text_atomic

    runs = [read_curve(out, c) for c in cells]
    rows = summarise(runs)
    write_text_atomic(out / "convergence.csv", to_csv(runs))
    figs = []
    c = cells[0]
    where = f"{machine()}; median over seeds, band: min–max"
    if any(r.points for r in runs):
        figs.append(plot(runs, rows, out / "convergence_steps.png", "step",
                         f"{data}: quality vs training steps ({c.eval_samples} samples per evaluation) — {where}"))
        figs.append(plot(runs, rows, out / "convergence_seconds.png", "seconds",
                         f"{data}: quality vs training wall time — {where}"))
    write_text_atomic(out / "convergence.md", markdown(data, cells, table, rows, runs, figs, notes))
    return markdown_table(rows), rows


def run_from_args(args) -> int:
    from dits.study.runner import check_jobs, prepare_out, train_cells

    check_jobs(args.jobs)
    variants = None if args.variants is None else args.variants.split(",")
    custom = parse_custom(args.variant)
    common = shlex.split(args.train_args or "")
    cells, table, notes = build_cells(args.data, variants, custom, args.seeds, args.steps, args.eval_every,
                               args.eval_samples, common)
    out = Path(args.out or f"convergence-{args.data}")
    prepare_out(out, "convergence", budget(cells), cells, args.data)
    for n in notes:
        print(f"dits bench convergence: {n}", flush=True)
    if not args.report_only:
        c = cells[0]
        results = train_cells(cells, out, args.jobs, log=lambda s: print(s, flush=True),
                              title=f"dits bench convergence on {args.data} ({len(table)} variants x "
                                    f"{len({x.seed for x in cells})} seed(s), {c.steps} steps, eval every "
                                    f"{c.eval_every})")
        failed = [n for n, r in results.items() if r != "done"]
        if failed:
            notes = notes + [f"failed: {', '.join(failed)} (logs in {out / 'logs'})"]
    text, _ = write_report(out, args.data, cells, table, notes)
    print(text, end="", flush=True)
    print(f"wrote {out / 'convergence.md'}, {out / 'convergence.csv'}, convergence_steps.png, "
          "convergence_seconds.png", flush=True)
    return 0
