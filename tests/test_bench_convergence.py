"""`dits bench convergence`: the pure computation on closed forms, the variant checks, and the
command end to end on two tiny real `dits train` runs."""
import csv
import io
import os

import pytest

from dits.bench import convergence as cv
from dits.cli import main
from dits.errors import UserError
from dits.study import runner


# ------------------------------------------------------------------ pure computation
def test_first_reach_interpolates_linearly():
    line = [(0, 1.0), (100, 0.0)]
    assert cv.first_reach(line, 0.5) == pytest.approx(50.0)           # crosses halfway: 0.5 of the steps
    assert cv.first_reach(line, 0.5) / 100 == pytest.approx(0.5)
    assert cv.first_reach([(25, 0.8), (50, 0.6), (75, 0.4), (100, 0.2)], 0.5) == pytest.approx(62.5)
    assert cv.first_reach(line, -0.1) is None                          # never reached
    assert cv.first_reach([(10, 0.3), (20, 0.1)], 0.5) == 10.0         # already there at the first evaluation
    assert cv.first_reach([(0, 0.9), (10, 0.4), (20, 0.7), (30, 0.2)], 0.5) == pytest.approx(8.0)  # the first crossing
    # accuracy: higher is better
    assert cv.first_reach([(0, 0.5), (100, 1.0)], 0.9, higher_better=True) == pytest.approx(80.0)
    assert cv.first_reach([(0, 0.5), (100, 0.8)], 0.9, higher_better=True) is None


def test_median_and_spread():
    assert cv.median([3.0, 1.0, 2.0]) == 2.0
    assert cv.median([1.0, 2.0]) == 1.5
    assert cv.median([1.0, None]) is None              # one of two seeds never reached: the median did not
    assert cv.median([1.0, None, 2.0]) == 2.0          # two of three did
    assert cv.median([]) is None
    assert cv.spread([1.0, 3.0, 2.0]) == 2.0
    assert cv.spread([1.0, None]) is None and cv.spread([1.0]) is None


def test_training_seconds_skips_evaluation_time():
    # 10 steps/s, except the interval after the evaluation at step 100 (it also timed sampling)
    log = [(50, 10.0), (100, 10.0), (150, 1.0), (200, 10.0)]
    secs = cv.training_seconds(log, after_eval={100})
    assert secs == [(0, 0.0), (50, 5.0), (100, 10.0), (150, 15.0), (200, 20.0)]
    assert cv.training_seconds(log)[-1] == (200, 65.0)  # without evaluations, every interval as logged
    assert cv.interp(secs, 125) == pytest.approx(12.5) and cv.interp(secs, 250) is None


def _run(variant, seed, curve, objective="diffusion", step_s=0.1):
    pts = [{"step": s, "seconds": s * step_s, "accuracy": 0.9, "fd_heldout_ratio": v, "heldout_mse": v, "fd": v}
           for s, v in curve]
    return cv.RunCurve(variant, seed, "done", pts, objective=objective)


def test_summarise_steps_and_seconds_to_the_baseline():
    base = [(25, 0.8), (50, 0.6), (75, 0.4), (100, 0.2)]                   # final 0.2 at 100 steps, 10 s
    fast = [(25, 0.6), (50, 0.2), (75, 0.1), (100, 0.05)]                  # 0.2 at step 50
    runs = [_run("baseline", 0, base), _run("baseline", 1, base),
            _run("fast", 0, fast, step_s=0.15), _run("fast", 1, [(25, 0.6), (50, 0.4), (75, 0.2), (100, 0.1)], step_s=0.15),
            _run("slow", 0, [(50, 0.9), (100, 0.5)]),
            _run("flow", 0, fast, objective="flow")]
    rows = {r["variant"]: r for r in cv.summarise(runs)}
    b = rows["baseline"]
    assert b["fd_heldout_ratio"] == pytest.approx(0.2) and b["fd_heldout_ratio_spread"] == 0.0
    assert b["fd_heldout_ratio_step_frac"] == pytest.approx(1.0)
    f = rows["fast"]
    assert f["fd_heldout_ratio_step_frac"] == pytest.approx((0.5 + 0.75) / 2)     # seeds at 50 and 75 steps
    assert f["fd_heldout_ratio_step_frac_spread"] == pytest.approx(0.25)
    assert f["fd_heldout_ratio_seconds_frac"] == pytest.approx((0.5 + 0.75) / 2 * 1.5)  # 1.5x the step time
    assert f["fd_heldout_ratio_spread"] == pytest.approx(0.05)
    assert rows["slow"]["fd_heldout_ratio_step_frac"] is None and rows["slow"]["fd_heldout_ratio_step_reached"] == 0
    # flow: the FD ratio races the baseline, its own held-out loss does not
    assert rows["flow"]["fd_heldout_ratio_step_frac"] == pytest.approx(0.5)
    assert rows["flow"]["heldout_mse_step_frac"] is None
    table = cv.markdown_table(list(rows.values()))
    assert "| fast | 2/2 |" in table and "0.62 (Δ0.25)" in table
    assert "not reached (0/1)" in table and "n/a (own loss)" in table


def test_custom_variants_and_flag_checks():
    assert cv.parse_custom(["lr1e-3=--lr 1e-3 --warmup-steps 10"]) == {"lr1e-3": ["--lr", "1e-3", "--warmup-steps", "10"]}
    for bad, msg in (("nameonly", "NAME="), ("Bad Name=--lr 1", "NAME="), ("min-snr=--lr 1", "built in")):
        with pytest.raises(UserError, match=msg):
            cv.parse_custom([bad])
    with pytest.raises(UserError, match="variant x: flag --no-such-flag unknown to this dits train"):
        cv.check_flags("x", ["--no-such-flag", "1"])
    with pytest.raises(UserError, match="variant x: --steps is set by dits bench convergence"):
        cv.check_flags("x", ["--steps", "5"])
    with pytest.raises(UserError, match="variant x: --loss-weighting min-snr: gamma"):
        cv.resolve("x", "digits", ["--loss-weighting", "min-snr:0"])
    ok, why = cv.available()
    assert {"baseline", "min-snr", "flow", "flow-logit-normal"} <= set(ok)
    assert set(ok) | set(why) == set(cv.VARIANTS)


@pytest.mark.parametrize("argv, msg", [
    (["--variants", "min-snr,nosuch"], "unknown variant 'nosuch'; choose from: baseline, diffusion, min-snr"),
    (["--variants", "min-snr", "--variant", "x=--no-such-flag 1"], "variant x: flag --no-such-flag unknown"),
])
def test_bad_variants_exit_2_and_create_nothing(tmp_path, capsys, argv, msg):
    out = tmp_path / "conv"
    assert main(["bench", "convergence", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# ------------------------------------------------------------------ end to end
TINY = "--depth 1 --hidden-size 16 --num-heads 2 --log-every 2 --sample-steps 2 --samples-per-class 1"


def test_convergence_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "POLL_S", 0.2)
    out = tmp_path / "conv"
    jobs = str(min(2, os.cpu_count() or 1))
    argv = ["bench", "convergence", "--variants", "min-snr", "--seeds", "1", "--steps", "4", "--eval-every", "2",
            "--eval-samples", "20", "--train-args", TINY, "--jobs", jobs, "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count(" done in ") == 2                              # one progress line per finished run
    assert "| baseline | 1/1 | 4 |" in printed and "| min-snr | 1/1 | 4 |" in printed
    for name in ("baseline-seed0", "min-snr-seed0"):
        assert (out / "runs" / name / "checkpoints" / "0000004.pt").is_file()
    cfg = (out / "runs" / "min-snr-seed0" / "config.yaml").read_text()
    assert "loss_weighting: min-snr:5" in cfg and "depth: 1" in cfg
    rows = list(csv.DictReader(io.StringIO((out / "convergence.csv").read_text())))
    assert tuple(rows[0]) == cv.COLUMNS
    assert [(r["variant"], r["seed"], r["step"]) for r in rows] == [
        ("baseline", "0", "2"), ("baseline", "0", "4"), ("min-snr", "0", "2"), ("min-snr", "0", "4")]
    assert all(float(r["seconds"]) > 0 and 0 <= float(r["accuracy"]) <= 1 and float(r["fd_heldout_ratio"]) > 0
               and float(r["heldout_mse"]) > 0 for r in rows)
    md = (out / "convergence.md").read_text()
    assert "steps to base FD" in md and "`--objective diffusion --loss-weighting min-snr:5`" in md and "torch" in md
    for png in ("convergence_steps.png", "convergence_seconds.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # the same command again trains nothing
    assert main(argv) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 2
