"""The study testbed (issue 18): the built-in data registry, the glyphs data set, its metric,
the held-out denoising loss and the seed-spread rule of the study's verdicts."""
import math

import numpy as np
import pytest
import torch

from dits.data import builtin
from dits.data import glyphs
from dits.errors import UserError


@pytest.mark.parametrize("name,side,n_train,n_held", [("digits", 8, 1438, 359), ("glyphs", 16, 60_000, 10_000)])
def test_builtin_shapes_ranges_and_labels(name, side, n_train, n_held):
    for split, n in (("train", n_train), ("heldout", n_held)):
        x, y = builtin(name, split)
        assert x.dtype == torch.float32 and tuple(x.shape) == (n, 1, side, side)
        assert y.dtype == torch.int64 and tuple(y.shape) == (n,)
        assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
        assert set(y.tolist()) == set(range(10))


def _rows(x: torch.Tensor) -> set:
    return {bytes(r) for r in ((x.flatten(1) + 1) * 127.5).round().to(torch.uint8).numpy()}


@pytest.mark.parametrize("name", ["digits", "glyphs"])
def test_splits_are_disjoint(name):
    train, held = _rows(builtin(name, "train")[0]), _rows(builtin(name, "heldout")[0])
    assert not train & held


def test_glyphs_has_50k_distinct_training_images_balanced_classes():
    x, y = builtin("glyphs", "train")
    assert len(_rows(x)) >= 50_000
    assert np.bincount(y.numpy()).tolist() == [6000] * 10


def test_glyphs_are_deterministic_from_the_seed():
    a, la = glyphs._chunk(50, seed=7)
    b, lb = glyphs._chunk(50, seed=7)
    c, _ = glyphs._chunk(50, seed=8)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    # the cached split is the generated one: its first chunk, regenerated from its seed
    images, labels = glyphs.glyph_arrays("train")
    first, first_labels = glyphs._chunk(glyphs.CHUNK, 1_000_003 * (glyphs.SPLITS["train"][1] + 1))
    assert np.array_equal(images[:glyphs.CHUNK], first) and np.array_equal(labels[:glyphs.CHUNK], first_labels)


def test_glyphs_images_have_ink_and_vary():
    images, labels = glyphs.glyph_arrays("heldout")
    ink = images.reshape(len(images), -1).mean(1)
    assert ink.min() > 3 and ink.max() < 160     # never blank, never a full square
    # within one class the images differ (poses, fonts, strokes): the mean pairwise L2 is large
    a = images[labels == 0][:200].reshape(200, -1).astype(float)
    assert np.mean(np.linalg.norm(a[:100] - a[100:], axis=1)) > 1000


def test_unknown_name_and_split_are_one_line_errors():
    with pytest.raises(UserError, match="digits, glyphs"):
        builtin("cifar", "train")
    with pytest.raises(UserError, match="train, heldout"):
        builtin("glyphs", "test")


# ------------------------------------------------------------------ the glyphs metric
def test_glyphs_metric_real_images_sit_at_the_floor_and_blur_far_above():
    from dits.evaluate.glyphs import glyphs_metric, load_classifier

    assert load_classifier().heldout_accuracy > 0.97
    images, labels = glyphs.glyph_arrays("train")
    fresh, fresh_labels = images[-1000:], labels[-1000:]      # never fitted on, never the reference
    m = glyphs_metric(fresh, fresh_labels)
    assert m["accuracy"] > 0.97
    assert 0.5 < m["fd_heldout"] / m["fd_heldout_floor"] < 1.5
    blurred = torch.nn.functional.avg_pool2d(torch.from_numpy(fresh.astype(np.float32))[:, None], 3, 1, 1)
    mb = glyphs_metric(blurred[:, 0].round().to(torch.uint8).numpy(), fresh_labels)
    assert mb["fd_heldout"] / mb["fd_heldout_floor"] > 3 * m["fd_heldout"] / m["fd_heldout_floor"]
    # swapped labels: accuracy collapses, FD (label-free) does not move
    ms = glyphs_metric(fresh, (fresh_labels + 1) % 10)
    assert ms["accuracy"] < 0.05 and ms["fd_heldout"] == pytest.approx(m["fd_heldout"])


def test_glyphs_metric_bad_input():
    from dits.evaluate.glyphs import glyphs_metric

    with pytest.raises(UserError, match="16×16"):
        glyphs_metric(np.zeros((10, 8, 8), np.uint8))
    with pytest.raises(UserError, match="0..255"):
        glyphs_metric(np.zeros((10, 16, 16), np.float32))


# ------------------------------------------------------------------ the held-out loss
class _Oracle(torch.nn.Module):
    """For data x0 = 0, x_t = sqrt(1 - abar_t) eps: this model returns eps exactly (or 0)."""

    def __init__(self, abar, zero=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.abar, self.zero = torch.as_tensor(abar, dtype=torch.float64), zero

    def forward(self, x, t, y=None):
        if self.zero:
            return torch.zeros_like(x) + self.w
        return (x.double() / torch.sqrt(1 - self.abar[t.long()]).view(-1, 1, 1, 1)).float()


def test_heldout_loss_closed_forms():
    from dits.evaluate.heldout_loss import denoising_loss
    from dits.objectives import create_objective

    obj = create_objective("diffusion", learn_sigma=False)
    abar = obj.diffusion.alphas_cumprod
    x0 = torch.zeros(1000, 1, 4, 4)
    exact = denoising_loss(_Oracle(abar), obj, x0, None)
    assert exact["mse"] == pytest.approx(0.0, abs=1e-10) and exact["bpd"] is None
    zero = denoising_loss(_Oracle(abar, zero=True), obj, x0, None)
    # E[eps^2] = 1 over 16,000 standard normal draws: 1 +- 3 * sqrt(2 / 16000)
    assert abs(zero["mse"] - 1.0) < 3 * math.sqrt(2 / 16_000)
    # fixed draws: the same number twice, and another seed gives another number
    assert denoising_loss(_Oracle(abar, zero=True), obj, x0, None)["mse"] == zero["mse"]
    assert denoising_loss(_Oracle(abar, zero=True), obj, x0, None, seed=5)["mse"] != zero["mse"]


def test_heldout_bpd_of_a_model_that_knows_nothing_is_large_and_of_the_oracle_small():
    """With learned variances: a model that predicts eps exactly and the posterior variance (v = 1
    picks beta_t, the upper end of the range) bounds the bits/dim far below one predicting 0."""
    from dits.evaluate.heldout_loss import denoising_loss
    from dits.objectives import create_objective

    obj = create_objective("diffusion", learn_sigma=True)
    abar = obj.diffusion.alphas_cumprod

    class Learned(_Oracle):
        def forward(self, x, t, y=None):
            eps = super().forward(x, t, y)
            return torch.cat([eps, torch.ones_like(eps)], dim=1)

    x0 = torch.zeros(500, 1, 4, 4)
    good = denoising_loss(Learned(abar), obj, x0, None)
    bad = denoising_loss(Learned(abar, zero=True), obj, x0, None)
    assert good["bpd"] is not None and 0 <= good["bpd"] < bad["bpd"] / 10


# ------------------------------------------------------------------ the seed-spread rule
def test_compare_counts_a_win_only_beyond_the_spread():
    from dits.study.report import compare

    spread = math.log(1.10)                       # seeds 10 % apart
    assert compare(1.0, 1.05, spread) == "tie"    # 5 % better: within the noise
    assert compare(1.0, 1.20, spread) == "win"
    assert compare(1.20, 1.0, spread) == "loss"
    assert compare(1.05, 1.0, spread) == "tie"
    assert compare(1.0, 1.05, None) == "win"      # no repeats: the plain comparison


def test_seed_spread_and_verdicts_on_synthetic_runs():
    from dits.study.report import Run, seed_spread, verdict_every_step, verdict_gflops

    def run(name, size, patch, gflops, vals, seed=0):
        params = {"S": 3, "B": 1, "L": 2, "XL": 4}[size]     # params do not order the cells: Gflops do
        return Run(name, size, patch, "adaln-zero", 2, status="done", gflops=gflops, params=params,
                   evals=[{"step": s, "m": v} for s, v in zip((1, 2), vals)], data="glyphs", seed=seed)

    runs = [run("S-p8", "S", 8, 1.0, (4.0, 2.0)), run("S-p8-seed1", "S", 8, 1.0, (4.0, 2.2), seed=1),
            run("B-p8", "B", 8, 4.0, (3.9, 1.0)), run("L-p8", "L", 8, 16.0, (3.0, 0.5))]
    spread = seed_spread(runs, "m")
    assert spread == pytest.approx(math.log(2.2 / 2.0))
    v2 = verdict_every_step(runs, "m", spread)
    # pairs (B,S), (L,S), (L,B) at steps 1, 2: B vs S at step 1 (3.9 vs 4.0) is a tie, the rest wins
    assert (v2["held"], v2["ties"], v2["losses"], v2["total"]) == (5, 1, 0, 6)
    assert v2["verdict"] == "reproduced"
    v1 = verdict_gflops(runs, "m", spread)
    assert v1["rho_gflops"] == pytest.approx(-1.0) and v1["n"] == 3       # the repeat is not a cell
    assert v1["verdict"] == "reproduced"
    worse = runs + [run("XL-p8", "XL", 8, 64.0, (3.5, 0.8))]              # XL behind L beyond the spread
    v2b = verdict_every_step(worse, "m", spread)
    assert v2b["losses"] > 0 and v2b["verdict"] == "not reproduced"


# ------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("argv,needle", [
    (["train", "--data", "cifar"], "built-in names: digits, glyphs"),
    (["train", "--data", "glyphs", "--patch-size", "3"], "not divisible by patch size 3"),
    (["study", "scaling", "--data", "cifar", "--print-commands"], "glyphs"),
])
def test_bad_input_one_line_exit_2_nothing_created(tmp_path, capsys, argv, needle):
    from dits.cli import main

    out = tmp_path / "run"
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_study_defaults_to_the_testbed(capsys, tmp_path):
    from dits.cli import main

    assert main(["study", "scaling", "--out", str(tmp_path / "s"), "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8 and all("--data glyphs" in ln for ln in lines)  # 6 cells + 2 seed repeats
    assert sum("--patch-size 8" in ln for ln in lines) >= 3 and not any("--patch-size 2" in ln for ln in lines)
