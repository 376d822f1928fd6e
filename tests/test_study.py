"""`dits study`: the grid, resume/skip, the report from stored metrics, commands, bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dits.cli import main
from dits.errors import UserError
from dits.study import grid, report, runner
from dits.study.stats import interp_log, ranks, spearman

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


# ------------------------------------------------------------------ the grid
def test_sizes_keep_the_papers_ratios_and_heads_divide_widths():
    names = list(grid.PAPER_SIZES)
    for a in names:
        for b in names:
            pa, pb, sa, sb = grid.PAPER_SIZES[a], grid.PAPER_SIZES[b], grid.SIZES[a], grid.SIZES[b]
            for i in range(3):  # depth, width, heads: every ratio between two sizes is the paper's
                assert sa[i] * pb[i] == sb[i] * pa[i], (a, b, i)
    for depth, width, heads in grid.SIZES.values():
        assert depth >= 1 and width % heads == 0


def closed_form_macs(depth, d, p, size=8, c=1, freq=256):
    """adaLN-Zero DiT forward MACs of one image, counted by hand from SPEC section 2."""
    t = (size // p) ** 2
    per_block = (t * d * 3 * d + t * d * d            # qkv, attention projection
                 + 2 * t * d * 4 * d                  # MLP
                 + 2 * t * t * d                      # q k^T and attn @ v
                 + d * 6 * d                          # adaLN modulation (one vector per image)
                 + 2 * t * d * 4)                     # two LayerNorms (no affine), 4 per element
    embed = t * p * p * c * d + freq * d + d * d      # patch conv, timestep MLP
    final = d * 2 * d + t * d * 4 + t * d * p * p * 2 * c
    return depth * per_block + embed + final


@pytest.mark.parametrize("budget", ["quick", "full"])
def test_cells_tokens_and_gflops(budget):
    cells = grid.build_grid("scaling", budget, "digits")
    for cell in cells:
        depth, width, _ = grid.SIZES[cell.size]
        assert cell.tokens == (8 // cell.patch) ** 2
        assert cell.gflops * 1e9 == pytest.approx(closed_form_macs(depth, width, cell.patch), rel=1e-9)
        assert cell.train_compute() == pytest.approx(cell.gflops * 3 * 64 * cell.steps)
    tokens = sorted({c.tokens for c in cells})
    assert all(b == 4 * a for a, b in zip(tokens, tokens[1:]))  # 4x apart, as the paper's patches
    by = {(c.size, c.patch): c.gflops for c in cells}
    for (size, p), g in by.items():
        # SPEC: halving the patch at least quadruples Gflops. At this scale the per-image part
        # (timestep MLP, adaLN modulation) is a visible share, so it holds for the rest.
        depth, d, _ = grid.SIZES[size]
        fixed = (256 * d + d * d + depth * 6 * d * d + 2 * d * d) / 1e9
        if (size, p // 2) in by:
            assert by[(size, p // 2)] - fixed >= 4 * (g - fixed)
    if budget == "quick":
        assert len(cells) >= 6 and math.log2(max(by.values()) / min(by.values())) >= 3
    else:
        assert len(cells) == 12


def test_blocks_grid_is_the_four_designs_on_one_size():
    cells = grid.build_grid("blocks", "quick", "digits")
    assert sorted(c.block for c in cells) == sorted(grid.BLOCKS)
    assert len({(c.size, c.patch, c.steps) for c in cells}) == 1


# ------------------------------------------------------------------ statistics
def test_spearman_and_log_interpolation_closed_forms():
    assert ranks([1, 2, 2, 3]) == [1, 2.5, 2.5, 4]
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(1 - 6 * 4 / (5 * 24))
    assert spearman([1, 10, 100], [3, 2, 1]) == pytest.approx(-1)
    assert math.isnan(spearman([1, 2], [2, 1]))
    assert interp_log([(1, 0.0), (100, 2.0)], 10) == pytest.approx(1.0)
    assert interp_log([(1, 0.0), (100, 2.0)], 1000) is None


# ------------------------------------------------------------------ synthetic run dirs
def fake_run(out, cell, fds, planned=None, finished=True, block=None):
    """A run dir as the trainer leaves it, with made-up metrics: fds = {step: FD}."""
    d = runner.run_dir(out, cell)
    (d / "checkpoints").mkdir(parents=True, exist_ok=True)
    depth, width, heads = grid.SIZES[cell.size]
    steps = planned or cell.steps
    cfg = {"model": "DiT", "depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": cell.patch,
           "block": block or cell.block, "steps": steps, "learn_sigma": True}
    (d / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    (d / "eval.jsonl").write_text("".join(
        json.dumps({"step": s, "fd": f, "fd_heldout": 2 * f, "fd_heldout_floor": 0.5, "accuracy": 0.9}) + "\n"
        for s, f in fds.items()))
    last = max(fds)
    (d / "checkpoints" / f"{last:07d}.pt").write_bytes(b"")
    if finished:
        (d / "summary.json").write_text("{}")
    return d


def test_cell_state_and_resume_command(tmp_path):
    cell = grid.build_grid("scaling", "quick", "digits")[0]
    assert runner.cell_state(tmp_path, cell) == "new"
    assert "--resume" not in runner.command_for(tmp_path, cell)
    fake_run(tmp_path, cell, {250: 1.0}, finished=False)
    assert runner.cell_state(tmp_path, cell) == "partial"
    argv = runner.command_for(tmp_path, cell)
    assert argv[argv.index("--resume") + 1] == str(runner.run_dir(tmp_path, cell))
    fake_run(tmp_path, cell, {cell.steps: 0.5})
    assert runner.cell_state(tmp_path, cell) == "done"


FAKE_DITS = '''import json, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
steps = int(args[args.index("--steps") + 1])
patch = int(args[args.index("--patch-size") + 1])
calls = Path(sys.argv[0]).with_name("calls.txt")
with open(calls, "a") as f:
    f.write(out.name + (" resume" if "--resume" in args else "") + "\\n")
if out.name == "B-p4":
    print("dits train: error: made-up failure", file=sys.stderr)
    sys.exit(2)
(out / "checkpoints").mkdir(parents=True, exist_ok=True)
(out / "config.yaml").write_text(json.dumps({"depth": int(args[args.index("--depth") + 1]),
    "hidden_size": int(args[args.index("--hidden-size") + 1]), "num_heads": int(args[args.index("--num-heads") + 1]),
    "patch_size": patch, "block": "adaln-zero", "steps": steps}))
(out / "eval.jsonl").write_text(json.dumps({"step": steps, "fd": 1.0 / patch, "fd_heldout": 1.0,
    "fd_heldout_floor": 0.5, "accuracy": 0.5}) + "\\n")
(out / "checkpoints" / f"{steps:07d}.pt").write_bytes(b"")
(out / "summary.json").write_text("{}")
'''


def test_runner_skips_done_cells_resumes_partial_ones_and_survives_a_failure(tmp_path):
    fake = tmp_path / "bin" / "fake_python.py"
    fake.parent.mkdir()
    fake.write_text(FAKE_DITS)
    py = tmp_path / "bin" / "python"
    # the runner calls `PYTHON -m dits train ...`: a tiny wrapper drops the `-m dits`
    py.write_text(f"#!/bin/sh\nshift 2\nexec {sys.executable} {fake} \"$@\"\n")
    py.chmod(0o755)
    out = tmp_path / "study"
    cells = {c.name: c for c in grid.build_grid("scaling", "quick", "digits")}
    runner.prepare_out(out, "scaling", "quick", list(cells.values()))
    fake_run(out, cells["S-p4"], {250: 3.0, 1500: 2.0})                    # finished: skipped
    fake_run(out, cells["S-p2"], {250: 3.0}, finished=False)               # partial: resumed
    logs = []
    res = runner.run_cells("scaling", "quick", out, jobs=2, python=str(py), log=logs.append, data="digits")
    calls = (tmp_path / "bin" / "calls.txt").read_text().split("\n")
    assert "S-p4" not in " ".join(calls) and "S-p2 resume" in calls
    # several jobs: the longest cells start first (the largest does not run on alone at the end)
    started = [ln[1:ln.index("]")] for ln in logs if "] started:" in ln or "] resuming:" in ln]
    est = {n: runner.estimated_seconds(c) for n, c in cells.items()}
    assert len(started) == 5 and started == sorted(started, key=lambda n: -est[n]) and started[0] == "L-p2"
    assert res["B-p4"].startswith("failed") and "made-up failure" in res["B-p4"]
    assert sum(v == "done" for v in res.values()) == 5
    assert any("FAILED" in ln and "goes on" in ln for ln in logs) and any("ETA" in ln for ln in logs)
    rep = report.write_report(out, "scaling", "quick")
    table = {r["model"]: r for r in rep["rows"]}
    assert table["B/4"]["status"].startswith("failed") and table["B/4"]["fd"] is None
    assert table["L/2"]["fd"] == 0.5 and table["L/2"]["heldout_ratio"] == 2.0
    csv_lines = (out / "study.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(cells) and csv_lines[0].startswith("model,patch,tokens,params,gflops")
    # rerunning retries only the failed cell
    (tmp_path / "bin" / "calls.txt").unlink()
    runner.run_cells("scaling", "quick", out, jobs=1, python=str(py), log=logs.append, data="digits")
    assert (tmp_path / "bin" / "calls.txt").read_text().split() == ["B-p4"]
    # a failed cell finished by other means (another runner, a copied run dir): the next
    # run skips it, and the report says done, not the stale failure
    fake_run(out, cells["B-p4"], {250: 3.0, 1500: 0.25})
    (tmp_path / "bin" / "calls.txt").unlink()
    runner.run_cells("scaling", "quick", out, jobs=1, python=str(py), log=logs.append, data="digits")
    assert not (tmp_path / "bin" / "calls.txt").exists()
    table = {r["model"]: r for r in report.write_report(out, "scaling", "quick")["rows"]}
    assert table["B/4"]["status"] == "done" and table["B/4"]["fd"] == 0.25
    (out / "logs" / "B-p4.failed").write_text("exit code 2: an older attempt\n")  # --report-only sees it
    table = {r["model"]: r for r in report.write_report(out, "scaling", "quick")["rows"]}
    assert table["B/4"]["status"] == "done"


def synthetic_scaling(out, budget="quick", fd_of=lambda c, s: 1 / (c.gflops * s * c.params ** 0.5)):
    cells = grid.build_grid("scaling", budget, "digits")
    runner.prepare_out(out, "scaling", budget, cells)
    for c in cells:
        fake_run(out, c, {s: fd_of(c, s) for s in range(c.eval_every, c.steps + 1, c.eval_every)})
    return cells


def test_report_verdicts_from_made_up_metrics(tmp_path):
    # FD = 1 / (compute * sqrt(params)): findings 1-3 hold by construction
    synthetic_scaling(tmp_path)
    rep = report.write_report(tmp_path, "scaling", "quick")
    v = {x["finding"]: x for x in rep["verdicts"]}
    # by Gflops, L/4 (5.47 M) comes before B/2 (5.74 M) but has the lower FD: one swapped
    # pair of six, sum of squared rank differences 2
    assert v[1]["verdict"] == "reproduced" and v[1]["rho_gflops"] == pytest.approx(-(1 - 6 * 2 / (6 * 35)))
    assert v[2]["verdict"] == "reproduced" and v[2]["held"] == v[2]["total"] > 0
    assert v[3]["verdict"] == "reproduced"
    assert v[4]["verdict"] == "not run"
    for f in rep["files"]:
        assert (tmp_path / f).stat().st_size > 0
    md = (tmp_path / "study.md").read_text()
    assert "Finding 1: reproduced" in md and "| L/2 | 2 | 16 |" in md


def test_report_says_when_a_finding_does_not_hold(tmp_path):
    # FD grows with Gflops: the opposite of the paper
    synthetic_scaling(tmp_path, fd_of=lambda c, s: c.gflops * 1e3)
    v = {x["finding"]: x for x in report.write_report(tmp_path, "scaling", "quick")["verdicts"]}
    assert v[1]["verdict"] == "not reproduced" and v[1]["rho_gflops"] == pytest.approx(1)
    assert v[1]["knobs"] == {"size": [0, 6], "patch": [0, 3]}  # 3 size pairs x 2 patches; 3 sizes x (4 vs 2)
    assert v[2]["verdict"] == "not reproduced" and v[2]["held"] == 0
    assert v[3]["verdict"] == "not reproduced"


def test_equal_compute_comparison_interpolates_in_log_compute():
    small = report.Run("S-p2", "S", 2, "adaln-zero", 4, gflops=1.0, params=1,
                       evals=[{"step": s, "fd": f} for s, f in ((1, 8.0), (4, 4.0))])
    big = report.Run("L-p2", "L", 2, "adaln-zero", 4, gflops=2.0, params=2,
                     evals=[{"step": s, "fd": f} for s, f in ((1, 6.0), (4, 2.0))])
    # overlap: compute 2*192..4*192; at 4*192 the small one is at step 4 (FD 4) and the big
    # one at step 2, halfway in log between steps 1 and 4 -> FD 4.0
    v = report.verdict_compute([small, big])
    assert v["total"] == 1 and v["held"] == 0 and "L/2 4.000 vs S/2 4.000" in v["pairs"][0]


def test_blocks_and_sampling_verdicts(tmp_path):
    cells = grid.build_grid("blocks", "quick", "digits")
    runner.prepare_out(tmp_path, "blocks", "quick", cells)
    paper = {"adaln-zero": 19, "adaln": 23, "cross-attn": 26, "in-context": 35}
    for c in cells:
        fake_run(tmp_path, c, {c.steps: paper[c.block] / 100})
    rep = report.write_report(tmp_path, "blocks", "quick")
    v = rep["verdicts"][0]
    assert v["verdict"] == "reproduced" and v["order"] == list(paper)
    assert sorted(r["model"] for r in rep["rows"]) == sorted(f"B/2 {b}" for b in paper)
    runs = report.read_study(tmp_path, "blocks", "quick")
    small, large = min(runs, key=lambda r: r.gflops), max(runs, key=lambda r: r.gflops)  # finding 4 pins both ways
    sampling = lambda fd_s, fd_l, steps=(250, 25): report.verdict_sampling(  # noqa: E731
        [{"cell": small.name, "steps": steps[0], "fd": fd_s},
         {"cell": large.name, "steps": steps[1], "fd": fd_l}], runs)["verdict"]
    assert small.gflops < large.gflops and sampling(0.9, 0.5) == "reproduced"  # 10x the steps, still behind
    assert sampling(0.4, 0.5) == "not reproduced" and sampling(0.9, 0.5, (100, 25)).startswith("inconclusive")


# ------------------------------------------------------------------ commands and bad input
def test_printed_command_runs_as_given(tmp_path, monkeypatch, capsys):
    tiny = {"scaling": {"sizes": ("S",), "patches": (4,), "steps": 4}, "blocks": {"size": "S", "patch": 4, "steps": 4},
            "eval_every": 4, "eval_samples": 20, "sampling": {"smallest": (2,), "largest": (2,)}}
    monkeypatch.setitem(grid.BUDGETS["digits"], "tiny", tiny)
    assert main(["study", "scaling", "--data", "digits", "--budget", "tiny", "--out", str(tmp_path / "s"), "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dits train ")
    bindir = Path(sys.executable).parent
    if not (bindir / "dits").exists():
        pytest.skip("no `dits` console script beside this python")
    env = {**ENV, "PATH": f"{bindir}{os.pathsep}{ENV.get('PATH', '')}"}
    r = subprocess.run(lines[0], shell=True, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cell = grid.build_grid("scaling", "tiny", "digits")[0]
    assert runner.cell_state(tmp_path / "s", cell) == "done"
    assert main(["study", "scaling", "--data", "digits", "--budget", "tiny", "--out", str(tmp_path / "s"), "--report-only"]) == 0
    assert "| S/4 | 4 | 4 |" in (tmp_path / "s" / "study.md").read_text()
    # the run used the study's pinned recipe, whatever the digits preset says today
    import yaml
    cfg = yaml.safe_load((runner.run_dir(tmp_path / "s", cell) / "config.yaml").read_text())
    assert (cfg["lr"], cfg["warmup_steps"], cfg["grad_clip"], cfg["ema_decay"], cfg["batch_size"]) == (
        2e-3, 100, 1.0, 0.999, 64)
    assert (cfg["objective"], cfg["t_sampling"], cfg["sampler"], cfg["sample_steps"]) == ("diffusion", "uniform", "dpm++", 20)


@pytest.mark.parametrize("argv, needle", [
    (["study", "nope"], "unknown study 'nope'"),
    (["study", "scaling", "--budget", "huge"], "unknown budget 'huge'"),
    (["study", "scaling", "--jobs", "100000"], "more than this machine's"),
    (["study", "blocks", "--out", "{other}"], "holds a scaling study"),
    (["study", "sampling-compute", "--out", "{empty}"], "run `dits study scaling"),
    (["study", "scaling", "--report-only", "--out", "{empty}"], "no runs under"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    other = tmp_path / "other"
    runner.prepare_out(other, "scaling", "quick", [])
    argv = [a.format(other=other, empty=tmp_path / "empty") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "other" / "runs").exists()


def test_unmanaged_runs_in_out_are_refused(tmp_path):
    (tmp_path / "runs" / "x").mkdir(parents=True)
    with pytest.raises(UserError, match="no study manifest"):
        runner.prepare_out(tmp_path, "scaling", "quick", [])


def test_sampling_compute_plans_the_smallest_and_largest_models(tmp_path, capsys):
    cells = synthetic_scaling(tmp_path)
    assert main(["study", "sampling-compute", "--out", str(tmp_path), "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    want = [(cells[0].name, k) for k in grid.BUDGETS["digits"]["quick"]["sampling"]["smallest"]] + \
           [(cells[-1].name, k) for k in grid.BUDGETS["digits"]["quick"]["sampling"]["largest"]]
    assert len(lines) == len(want)
    for line, (name, k) in zip(lines, want):
        assert line.startswith("dits sample ") and " && dits evaluate " in line
        assert f"runs/{name} " in line and f"--steps {k} " in line and "--sampler ddpm" in line


def test_runner_resumes_a_real_partial_cell(tmp_path, monkeypatch):
    def budget(steps):
        return {"scaling": {"sizes": ("S",), "patches": (4,), "steps": steps},
                "blocks": {"size": "S", "patch": 4, "steps": steps},
                "eval_every": 2, "eval_samples": 0, "sampling": {"smallest": (2,), "largest": (2,)}}
    monkeypatch.setitem(grid.BUDGETS["digits"], "tiny", budget(2))
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    out, logs = tmp_path / "s", []
    assert runner.run_cells("scaling", "tiny", out, log=logs.append, data="digits") == {"S-p4": "done"}
    # the same study asked for more steps: the cell is now unfinished and resumes
    monkeypatch.setitem(grid.BUDGETS["digits"], "tiny", budget(4))
    assert runner.run_cells("scaling", "tiny", out, log=logs.append, data="digits") == {"S-p4": "done"}
    assert any("[S-p4] resuming" in ln for ln in logs)
    d = runner.run_dir(out, "S-p4")
    assert sorted(p.name for p in (d / "checkpoints").glob("*.pt")) == ["0000002.pt", "0000004.pt"]
    assert [json.loads(ln)["step"] for ln in (d / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert report.read_study(out, "scaling", "tiny")[0].status == "done"


def test_a_cell_stopped_before_its_first_checkpoint_starts_over(tmp_path):
    """Interrupted before any checkpoint: the run dir holds a config and a log but nothing to
    resume, so the cell's command restarts it with --overwrite (dits train refuses otherwise)."""
    from dits.study.grid import build_grid
    from dits.study.runner import command_for, run_dir

    cell = build_grid("scaling", "quick", "digits")[0]
    assert "--overwrite" not in command_for(tmp_path, cell) and "--resume" not in command_for(tmp_path, cell)
    d = run_dir(tmp_path, cell)
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("steps: 1500\n")
    argv = command_for(tmp_path, cell)
    assert "--overwrite" in argv and "--resume" not in argv


def test_a_failure_reports_this_attempts_error_not_an_older_one(tmp_path):
    """A cell's log collects every attempt; the reason given for a failure is from the attempt
    that just failed (an earlier sitting's error line must not be reported again)."""
    log = tmp_path / "cell.log"
    log.write_text("dits train: error: --out holds a run (an earlier attempt)\n")
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write("step 100 ...\ndits train: stopped by SIGINT after step 2126; checkpoint written\n")
    assert "SIGINT" in runner.last_error_line(log, start)
    assert "earlier attempt" in runner.last_error_line(log)   # from the start: the old error
    assert runner.last_error_line(tmp_path / "missing.log") == "no log"


def test_a_closed_pipe_is_not_an_error(monkeypatch):
    """`dits study ... --print-commands | head -1`: the reader leaving early is exit 0, no message."""
    import dits.cli.study as cli_study

    def gone(args):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(cli_study, "run", gone)
    code = main(["study", "scaling", "--budget", "quick", "--print-commands"])
    assert code == 0


def test_the_manifest_names_every_machine_the_cells_ran_on(tmp_path, monkeypatch):
    """A study resumed on another machine keeps the first machine and adds the second: its figures
    say both (times and compute read differently on another CPU)."""
    import torch

    assert runner.this_machine().endswith(f", torch {torch.__version__}")
    monkeypatch.setattr(runner, "this_machine", lambda: "CPU A, torch 1")
    runner.prepare_out(tmp_path, "scaling", "quick", [])
    runner.prepare_out(tmp_path, "scaling", "quick", [])
    assert runner.machines(tmp_path) == ["CPU A, torch 1"]
    monkeypatch.setattr(runner, "this_machine", lambda: "CPU B, torch 2")
    runner.prepare_out(tmp_path, "scaling", "quick", [])
    assert runner.machines(tmp_path) == ["CPU A, torch 1", "CPU B, torch 2"]


STOPPABLE_TRAIN = r'''
import os, signal, sys, time
d = sys.argv[1]
def stop(signum, frame):
    time.sleep(0.5)  # the checkpoint a real run writes on SIGTERM
    open(os.path.join(d, "checkpointed"), "w").close()
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(d, "started"), "w").close()
time.sleep(120)
'''

RUN_STUDY = r'''
import sys
from dits.study import grid, runner
out, py = sys.argv[1], sys.argv[2]
cells = grid.build_grid("scaling", "quick", "digits")[:1]
runner.prepare_out(out, "scaling", "quick", cells)
runner.train_cells(cells, out, jobs=1, python=py)
'''


def test_a_killed_runner_stops_its_cells_at_a_checkpoint(tmp_path):
    """`kill RUNNER` (SIGTERM to the runner alone, as a scheduler or `kill` sends it) reaches the
    running cells, which checkpoint; the runner waits for them and exits 143, leaving no cell
    training on behind it."""
    import signal
    import time

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "train.py").write_text(STOPPABLE_TRAIN)
    py = tmp_path / "bin" / "python"
    py.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'bin' / 'train.py'} {tmp_path}\n")
    py.chmod(0o755)
    (tmp_path / "study.py").write_text(RUN_STUDY)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "study.py"), str(tmp_path / "s"), str(py)],
                            env={**os.environ, "PYTHONPATH": ENV["PYTHONPATH"]},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "started").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert (tmp_path / "started").exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert (tmp_path / "checkpointed").exists()  # the cell was told, and waited for
    assert "rerun the same command to resume" in output


def test_a_second_runner_on_the_same_study_is_refused(tmp_path):
    """Two runners on one --out would resume the same runs twice over: the second is refused in one
    line while the first (its pid in OUT/runner.pid) lives; a stale pid file is taken over."""
    out = tmp_path / "s"
    runner.prepare_out(out, "scaling", "quick", [])
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / runner.LOCK).write_text(f"{first.pid}\n")
        manifest = (out / runner.MANIFEST).read_bytes()
        with pytest.raises(UserError, match=f"another runner \\(pid {first.pid}\\)"):
            runner.train_cells([], out)
        with pytest.raises(UserError, match="another runner"):  # before the manifest is rewritten
            runner.prepare_out(out, "scaling", "quick", [])
        assert (out / runner.MANIFEST).read_bytes() == manifest
    finally:
        first.kill()
        first.wait()
    assert runner.train_cells([], out) == {}   # that pid is gone now: taken over, and released
    assert not (out / runner.LOCK).exists()
