"""The study grids: which `dits train` runs make up a study, and what each one costs.

The paper's four sizes (depth / width / heads: S 12/384/6, B 12/768/12, L 24/1024/16,
XL 28/1152/16) are scaled down by the same factors for all four -- depth / 4, width / 8,
heads unchanged -- so the S : B : L : XL ratios of depth, width and heads are the paper's
exactly (head width 8, 8, 8, 9 instead of 64, 64, 64, 72). A study runs on a built-in data set
(``DATA_SETS``): on the 16x16 ``glyphs`` testbed (the default) patches 8 / 4 / 2, on the 8x8 digits
patches 4 / 2 / 1, give 4 / 16 / 64 tokens: 4x apart, as the paper's patches 8 / 4 / 2 on 32x32 latents.

Every cell trains with the same recipe (the data set's preset's sampler, with the
optimisation settings below pinned, so that a later change to the demo preset cannot change a
study half-way; no per-model tuning, the paper's way); only the architecture and, per budget,
the length of training change.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

from dits.errors import UserError

PAPER_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DEPTH_DIV, WIDTH_DIV = 4, 8
SIZES = {name: (d // DEPTH_DIV, w // WIDTH_DIV, h) for name, (d, w, h) in PAPER_SIZES.items()}
# Per built-in data set: image side and the patches giving 4 / 16 / 64 tokens; `metric` is the
# eval.jsonl key the verdicts rank by (docs/scaling.md says why), `loss` the low-noise second one.
DATA_SETS = {"digits": {"image_size": 8, "patches": (4, 2, 1), "metric": "fd", "loss": "heldout_mse"},
             "glyphs": {"image_size": 16, "patches": (8, 4, 2), "metric": "fd_heldout", "loss": "heldout_mse"}}
DEFAULT_DATA = "glyphs"
IN_CHANNELS, NUM_CLASSES = 1, 10
BLOCKS = ("adaln-zero", "adaln", "cross-attn", "in-context")
KINDS = ("scaling", "blocks", "sampling-compute", "backbones")  # backbones: DiT vs U-Net (study/backbones.py)
BATCH_SIZE = 64                  # the digits preset's batch; training compute uses it
# The optimisation recipe of every cell, passed explicitly (the digits preset's values when
# the study was written): the paper's Gaussian diffusion (the digits preset trains flow since
# issue 21; a study reproduces DiT), AdamW lr 2e-3, 100 warm-up steps then constant, grad clip 1,
# EMA 0.999 with warm-up.
RECIPE = {"--objective": "diffusion", "--batch-size": BATCH_SIZE, "--lr": 2e-3, "--warmup-steps": 100,
          "--lr-schedule": "constant", "--grad-clip": 1.0, "--ema-decay": 0.999, "--ema-warmup": "true"}

# What each budget trains, per data set. quick: a reduced grid for one sitting on a 2-core CPU;
# full: the whole grid. `eval_every` is also the checkpoint interval, so a resumed cell never
# loses an evaluation. `repeat`: cells trained again with seed 1, for the seed-to-seed spread
# that a comparison's margin must exceed to count (study/report.py).
DIGITS_BUDGETS = {
    "quick": {"scaling": {"sizes": ("S", "B", "L"), "patches": (4, 2), "steps": 1500},
              "blocks": {"size": "B", "patch": 2, "steps": 1500},
              "eval_every": 250, "eval_samples": 500,
              # finding 4: DDPM steps for the smallest and the largest model
              "sampling": {"smallest": (25, 250), "largest": (25,)}},
    "full": {"scaling": {"sizes": ("S", "B", "L", "XL"), "patches": (4, 2, 1), "steps": 4000},
             "blocks": {"size": "XL", "patch": 2, "steps": 4000},
             "eval_every": 500, "eval_samples": 1000,
             "sampling": {"smallest": (25, 100, 250), "largest": (25, 100, 250)}},
}
GLYPHS_BUDGETS = {
    "quick": {"scaling": {"sizes": ("S", "B", "L"), "patches": (8, 4), "steps": 1500},
              "blocks": {"size": "B", "patch": 4, "steps": 1500},
              "eval_every": 500, "eval_samples": 500, "repeat": ("B-p8", "S-p4"),
              "sampling": {"smallest": (25, 250), "largest": (25,)}},
    "full": {"scaling": {"sizes": ("S", "B", "L", "XL"), "patches": (8, 4, 2), "steps": 3000},
             "blocks": {"size": "XL", "patch": 4, "steps": 3000},
             "eval_every": 500, "eval_samples": 500, "repeat": ("S-p4", "B-p4"),
             "sampling": {"smallest": (25, 100, 250), "largest": (25, 100, 250)}},
}
BUDGETS = {"digits": DIGITS_BUDGETS, "glyphs": GLYPHS_BUDGETS}


class Named:
    """The label and token count of anything with ``size``, ``patch``, ``block``, ``data``, ``seed``."""
    size: str
    patch: int
    block: str
    data: str
    seed: int

    @property
    def label(self) -> str:
        base = f"{self.size}/{self.patch}"
        base = base if self.block == "adaln-zero" else f"{base} {self.block}"
        return base if not self.seed else f"{base} (seed {self.seed})"

    @property
    def tokens(self) -> int:
        return (DATA_SETS[self.data]["image_size"] // self.patch) ** 2


@dataclass
class Cell(Named):
    """One `dits train` run of a study."""
    name: str                    # directory name, e.g. "S-p4" or "XL-p2-in-context"
    size: str
    patch: int
    block: str
    steps: int
    eval_every: int
    eval_samples: int
    seed: int = 0
    data: str = DEFAULT_DATA
    gflops: float = 0.0          # forward Gflops of one image (dits.flops)
    params: int = 0
    extra: dict = field(default_factory=dict)

    def train_compute(self, steps: int | None = None) -> float:
        """Training Gflops: forward Gflops x 3 (forward + backward) x batch x steps."""
        return self.gflops * 3 * BATCH_SIZE * (self.steps if steps is None else steps)

    def train_args(self, run_dir: str) -> list[str]:
        depth, width, heads = SIZES[self.size]
        return ["train", "--preset", self.data, "--data", self.data, "--model", "DiT", "--depth", str(depth),
                "--hidden-size", str(width), "--num-heads", str(heads), "--patch-size", str(self.patch),
                "--block", self.block, "--steps", str(self.steps), "--ckpt-every", str(self.eval_every),
                "--sample-every", str(self.eval_every), "--eval-samples", str(self.eval_samples),
                *[str(a) for kv in RECIPE.items() for a in kv],
                "--seed", str(self.seed), "--out", run_dir, "--no-progress"]


def check_data(data: str) -> str:
    if data not in DATA_SETS:
        raise UserError(f"unknown study data {data!r}; choose one of: {', '.join(DATA_SETS)} (built-in sets)")
    return data


def check_budget(budget: str, data: str = DEFAULT_DATA) -> dict:
    budgets = BUDGETS[check_data(data)]
    if budget not in budgets:
        raise UserError(f"unknown budget {budget!r}; choose one of: {', '.join(budgets)}")
    return budgets[budget]


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UserError(f"unknown study {kind!r}; choose one of: {', '.join(KINDS)}")
    return kind


def measure(cell: Cell) -> Cell:
    """Fill in Gflops and parameters from the model itself (built on the meta device)."""
    import torch

    from dits.flops import count_gflops, count_params
    from dits.models import create_model

    depth, width, heads = SIZES[cell.size]
    with torch.device("meta"):
        model = create_model("DiT", depth=depth, hidden_size=width, num_heads=heads, patch_size=cell.patch,
                             input_size=DATA_SETS[cell.data]["image_size"], in_channels=IN_CHANNELS, num_classes=NUM_CLASSES,
                             block=cell.block)
    cell.gflops, cell.params = count_gflops(model), count_params(model)
    return cell


def build_grid(kind: str, budget: str = "quick", data: str = DEFAULT_DATA) -> list[Cell]:
    """The cells of a study, smallest training compute first (seed repeats after their cell)."""
    b = check_budget(budget, data)
    check_kind(kind)
    if kind == "backbones":  # its own grid of DiT / U-Net pairs
        from dits.study.backbones import build_grid as backbones_grid
        return backbones_grid(budget, data)
    common = dict(eval_every=b["eval_every"], eval_samples=b["eval_samples"], data=data)
    if kind == "blocks":
        s = b["blocks"]
        cells = [Cell(f"{s['size']}-p{s['patch']}-{blk}", s["size"], s["patch"], blk, s["steps"], **common)
                 for blk in BLOCKS]
    else:  # scaling (sampling-compute samples from the scaling cells)
        s = b["scaling"]
        cells = [Cell(f"{size}-p{p}", size, p, "adaln-zero", s["steps"], **common)
                 for size in s["sizes"] for p in s["patches"]]
        cells += [Cell(f"{c.name}-seed1", c.size, c.patch, c.block, c.steps, seed=1, **common)
                  for c in list(cells) if c.name in b.get("repeat", ())]
    return sorted((measure(c) for c in cells), key=lambda c: (c.train_compute(), c.seed, c.name))


def train_command(cell: Cell, run_dir: str, python: str | None = None) -> list[str]:
    """argv of the ordinary `dits train` run for ``cell`` (resumes it if it has a checkpoint)."""
    return [python or sys.executable, "-m", "dits", *cell.train_args(run_dir)]


def shell_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
