"""Logging sinks (issue 23 #1, #5): `dits train --log tensorboard|wandb|none`.

What each backend wrote is read back with its own tools: TensorBoard's event reader; for W&B
(offline) the run directory, its media files and its record file. Tiny runs on the built-in
digits (a 1-block, width-32 DiT, a few steps) keep each test to seconds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dits.checkpoint import latest_checkpoint, load_checkpoint
from dits.cli import main
from dits.config import TrainConfig, log_backends, resolve_config
from dits.errors import UserError
from dits.train.sinks import Sinks, eval_scalars, open_sinks, train_scalars

# a 1-block, width-32 DiT on the built-in digits: each run takes about a second
TINY = dict(objective="diffusion", model="DiT", depth=1, hidden_size=32, num_heads=2, patch_size=2, batch_size=16, lr=1e-3,
            warmup_steps=3, grad_clip=1.0, ema_decay=0.9, ema_warmup=True, log_every=5, ckpt_every=10,
            sampler="ddim", sample_steps=2, samples_per_class=1, eval_samples=0, seed=3)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}

FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "log_every": 2, "ckpt_every": 2}.items()]


def train_cli(out, *extra, steps=4):
    return main(["train", "--out", str(out), "--steps", str(steps), "--no-progress", *FLAGS, *extra])


def resume_cli(out, steps, *extra):
    return main(["train", "--resume", str(out), "--steps", str(steps), "--no-progress", *extra])


def read_tb(run_dir):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing under the user's home
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


# --------------------------------------------------------------------------- names and config
def test_scalar_names_are_stable():
    rec = {"step": 10, "loss": 0.5, "mse": 0.4, "vb": 0.1, "grad_norm": None, "lr": 1e-3, "steps_per_s": 20.0}
    assert train_scalars(rec) == {"train/loss": 0.5, "train/mse": 0.4, "train/vb": 0.1, "train/lr": 1e-3,
                                  "train/steps_per_s": 20.0}  # a null (non-finite) value is left out
    m = {"n": 100, "accuracy": 0.9, "svc_accuracy": 0.95, "fd": 2.0, "fd_heldout": 3.0, "fd_heldout_floor": 1.5,
         "predicted_counts": [10] * 10, "heldout_mse": 0.3, "loss_gap": 0.02, "fd_floor": None}
    got = eval_scalars(m)
    assert got["eval/acc"] == 0.9 and got["eval/svc_acc"] == 0.95 and got["eval/fd"] == 2.0
    assert got["eval/fd_heldout_ratio"] == 2.0 and got["eval/heldout_loss"] == 0.3 and got["eval/loss_gap"] == 0.02
    assert "eval/n" not in got and "eval/predicted_counts" not in got and "eval/fd_floor" not in got


def test_log_flag_spellings_and_bad_names():
    assert TrainConfig().log == "none" and log_backends("none") == () and log_backends(None) == ()
    for spelling in ("wandb,tensorboard", " TensorBoard , wandb ", ["wandb", "tensorboard"]):
        assert resolve_config("digits", {"log": spelling}).log == "tensorboard,wandb"
    for bad, needle in (("tensorbord", "'tensorbord' is not a logging backend"),
                        ("none,wandb", "--log none cannot be combined with wandb")):
        with pytest.raises(UserError, match=needle):
            resolve_config("digits", {"log": bad})


def test_other_ranks_get_no_sinks(tmp_path):
    sinks = open_sinks("tensorboard,wandb", tmp_path, {}, 0, main=False)
    assert isinstance(sinks, Sinks) and sinks.sinks == [] and not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- TensorBoard
def test_tensorboard_scalars_grid_config_and_resume(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert train_cli(run, "--log", "tensorboard", "--eval-samples", "20", "--sample-every", "4") == 0
    acc = read_tb(run)
    tags = acc.Tags()
    for name in ("train/loss", "train/mse", "train/vb", "train/grad_norm", "train/lr", "train/steps_per_s",
                 "eval/acc", "eval/fd", "eval/fd_heldout_ratio", "eval/heldout_loss", "eval/loss_gap"):
        assert name in tags["scalars"], name
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    ev = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert acc.Scalars("eval/acc")[0].value == pytest.approx(ev["accuracy"])
    assert acc.Scalars("eval/fd_heldout_ratio")[0].value == pytest.approx(ev["fd_heldout"] / ev["fd_heldout_floor"])
    assert acc.Scalars("eval/heldout_loss")[0].value == pytest.approx(ev["heldout_mse"])
    grid = acc.Images("samples")
    assert [g.step for g in grid] == [4]
    from PIL import Image
    with Image.open(run / "samples_0000004.png") as im:
        assert (grid[0].width, grid[0].height) == im.size
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "log: tensorboard" in text and "hidden_size: 32" in text

    # a crash after step 4's checkpoint was written, but before it was kept: resume from step 2
    # (the stale step-4 events are dropped and written again), then continue to step 6
    (run / "checkpoints" / "0000004.pt").unlink()
    assert resume_cli(run, 6) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    acc = read_tb(run)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # same dir, a second file
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert [g.step for g in acc.Images("samples")] == [4, 6]
    assert [e.step for e in acc.Scalars("eval/acc")] == [4, 6]


def test_without_log_the_run_is_unchanged(tmp_path):
    """--log adds sinks and changes nothing else: the weights and metrics.jsonl's losses are the
    same as without it, and a run without --log has no backend files."""
    pytest.importorskip("tensorboard")
    assert train_cli(tmp_path / "plain") == 0
    assert train_cli(tmp_path / "tb", "--log", "tensorboard") == 0
    a = load_checkpoint(latest_checkpoint(tmp_path / "plain"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "tb"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k]), k

    def losses(run):
        return [{k: v for k, v in json.loads(x).items() if k != "steps_per_s"}
                for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses(tmp_path / "plain") == losses(tmp_path / "tb")
    names = {p.name for p in (tmp_path / "plain").iterdir()}
    assert not names & {"tensorboard", "wandb", "wandb_run.json"}
    assert "log: none" in (tmp_path / "plain" / "config.yaml").read_text()


def test_log_may_be_added_on_resume_and_overwrite_clears_it(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert train_cli(run) == 0
    assert resume_cli(run, 6, "--log", "tensorboard") == 0
    assert "log 'none' -> 'tensorboard'" in capsys.readouterr().out
    assert [e.step for e in read_tb(run).Scalars("train/loss")] == [6]  # from the resumed step on
    assert resume_cli(run, 8) == 0  # the run's own --log, kept without typing it again
    assert [e.step for e in read_tb(run).Scalars("train/loss")] == [6, 8]
    assert train_cli(run, "--overwrite") == 0
    assert not (run / "tensorboard").exists()


# --------------------------------------------------------------------------- W&B (offline)
def wandb_runs(run_dir):
    # W&B names a run's folder offline-run-<%Y%m%d_%H%M%S>-<id>, and adds "-1" when a resume lands in the same
    # second as the run before it (a fast machine): the id is read from the record file, not the folder's name.
    # Name order is start order (a fixed-width stamp; "-<id>" sorts before "-<id>-1")
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_wandb_offline_run_and_resume(tmp_path, offline_wandb):
    run = tmp_path / "run"
    assert train_cli(run, "--log", "wandb", "--sample-every", "4") == 0
    meta = json.loads((run / "wandb_run.json").read_text())
    assert meta["project"] == "dits" and meta["id"]
    dirs = wandb_runs(run)
    assert len(dirs) == 1 and (dirs[0] / f"run-{meta['id']}.wandb").is_file()
    record = (dirs[0] / f"run-{meta['id']}.wandb").read_bytes()
    for name in (b"train/loss", b"train/grad_norm", b"train/steps_per_s", b"hidden_size"):
        assert name in record, name
    assert list((dirs[0] / "files" / "media" / "images").glob("samples_4_*.png"))

    assert resume_cli(run, 6) == 0  # no --log typed: the run's own, and the same W&B run
    assert json.loads((run / "wandb_run.json").read_text()) == meta
    dirs = wandb_runs(run)
    assert len(dirs) == 2 and all((d / f"run-{meta['id']}.wandb").is_file() for d in dirs)
    assert b"train/loss" in (dirs[1] / f"run-{meta['id']}.wandb").read_bytes()
    assert list((dirs[1] / "files" / "media" / "images").glob("samples_6_*.png"))


def test_only_rank_0_logs_under_torchrun(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wb"), "WANDB_CACHE_DIR": str(tmp_path / "wb"),
           "WANDB_DATA_DIR": str(tmp_path / "wb")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                          # `--`: torchrun's own parser would read --log as an abbreviation of its --log-dir
                          "-m", "dits", "--", "train", "--out", str(tmp_path / "run"), "--steps", "2", "--no-progress",
                          *FLAGS, "--log", "tensorboard,wandb"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(wandb_runs(tmp_path / "run")) == 1


# --------------------------------------------------------------------------- bad input
def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv,needle", [
    (["--log", "tensorbord"], "'tensorbord' is not a logging backend"),
    (["--log", "none", "--log", "wandb"], "--log none cannot be combined"),
    (["--log", "tensorboard"], "pip install 'dits[tb]'"),
    (["--log", "wandb,tensorboard"], "needs the tensorboard and wandb packages: pip install 'dits[tb,wandb]'"),
])
def test_bad_log_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if neither package were installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert train_cli(tmp_path / "run", *argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_missing_package_on_resume_changes_nothing(tmp_path, monkeypatch, capsys):
    """Typed on resume, or the run's own --log (resumed where the package is missing)."""
    pytest.importorskip("tensorboard")
    plain, logged = tmp_path / "plain", tmp_path / "logged"
    assert train_cli(plain) == 0
    assert train_cli(logged, "--log", "tensorboard") == 0
    assert load_checkpoint(latest_checkpoint(logged))["train_config"]["log"] == "tensorboard"
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    for run, extra in ((plain, ["--log", "tensorboard"]), (logged, [])):
        before = snapshot(run)
        assert resume_cli(run, 6, *extra) == 2
        err = capsys.readouterr().err
        assert "--log tensorboard needs the tensorboard package" in err and "dits[tb]" in err
        assert len(err.strip().splitlines()) == 1, err
        assert snapshot(run) == before
