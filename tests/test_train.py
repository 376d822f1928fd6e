"""The trainer: exact resume after a kill, DDP = one process on the global batch, outputs."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dits.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dits.cli import main
from dits.config import resolve_config
from dits.train import StepRandomness, train

TINY = dict(objective="diffusion", model="DiT", depth=1, hidden_size=32, num_heads=2, patch_size=2, batch_size=16, lr=1e-3,
            warmup_steps=3, grad_clip=1.0, ema_decay=0.9, ema_warmup=True, log_every=5, ckpt_every=10,
            sampler="ddim", sample_steps=2, samples_per_class=1, eval_samples=0, seed=3)
# PYTHONFAULTHANDLER: a crash in a child process (a torchrun rank) prints its Python stack to the stderr the tests show
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def crash_text(stderr: str, chars: int = 3000) -> str:
    """The end of a failed run's stderr without faulthandler's one-line list of extension modules,
    which alone can fill the tail and hide the stack printed above it."""
    kept = [line for line in stderr.splitlines() if not re.search(r"Extension modules:|\(total: \d+\)$", line)]
    return "\n".join(kept)[-chars:]


def tiny_cfg(out, **kw):
    return resolve_config("digits", {**TINY, "out": str(out), **kw})


def weights(run_dir):
    ck = load_checkpoint(latest_checkpoint(run_dir))
    return ck["step"], ck["model"], ck["ema"]


def dits_cli(*argv, **env):
    """Run `python -m dits ...` in a fresh process (one thread: same float reductions every run)."""
    return subprocess.run([sys.executable, "-m", "dits", *argv], env={**ENV, **env}, capture_output=True, text=True)


FLAGS = ["--steps", "30", "--no-progress"] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """30 steps without interruption, in a fresh process."""
    out = tmp_path_factory.mktemp("straight")
    run = dits_cli("train", "--out", str(out), "--overwrite", *FLAGS)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def assert_same_final_weights(run_a, run_b):
    s1, m1, e1 = weights(run_a)
    s2, m2, e2 = weights(run_b)
    assert s1 == s2 == 30
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k
        assert torch.equal(e1[k], e2[k]), k


def test_resume_after_kill_continues_the_exact_trajectory(tmp_path, straight):
    flags = FLAGS
    # the same run, killed with SIGKILL right after step 17 (last checkpoint: step 10) ...
    killed = dits_cli("train", "--out", str(tmp_path / "killed"), *flags, DITS_FAULT_AT_STEP="17")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "killed").name == "0000010.pt"
    assert not list((tmp_path / "killed" / "checkpoints").glob("*.tmp"))
    # ... and resumed: bit-identical weights and EMA at the end
    resumed = dits_cli("train", "--resume", str(tmp_path / "killed"), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_final_weights(straight, tmp_path / "killed")
    log = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, straight):
    """A preemption (SIGTERM, as SLURM and Kubernetes send) right after step 17: the run
    finishes the step it is in, checkpoints there, says how to resume, exits 143."""
    stopped = dits_cli("train", "--out", str(tmp_path), *FLAGS, DITS_FAULT_AT_STEP="17", DITS_FAULT_SIGNAL="SIGTERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert latest_checkpoint(tmp_path).name == "0000018.pt"  # not the periodic 10: nothing lost
    line = [ln for ln in stopped.stdout.splitlines() if "stopped by SIGTERM" in ln]
    assert line and line[0].endswith(f"continue with: dits train --resume {tmp_path}")
    assert not (tmp_path / "summary.json").exists()  # the run is not done
    resumed = dits_cli("train", "--resume", str(tmp_path), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_final_weights(straight, tmp_path)


def test_run_directory_contents(tmp_path):
    summary = train(tiny_cfg(tmp_path, steps=10, eval_samples=20), progress=False)
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "samples_0000010.png", "summary.json",
                 "checkpoints/0000010.pt", "eval.jsonl"):
        assert (tmp_path / name).is_file(), name
    ck = load_checkpoint(tmp_path / "checkpoints/0000010.pt")  # weights_only load
    assert {"model", "ema", "opt", "step", "train_config", "model_config", "rng"} <= set(ck)
    m = summary["digits_metric"]
    # the metric's 20 samples again, from the final EMA weights with the preview's settings (balanced
    # labels, seed + 10,000): its accuracies are the agreement of the MLP and of an RBF SVC fitted here
    # on all real digits with the labels asked for
    from PIL import Image
    from sklearn.svm import SVC

    from dits.evaluate.digits import SVC_C, SVC_GAMMA, load_classifier, real_digits, to_inputs
    from dits.models import DiT
    from dits.models.configs import DiTConfig
    from dits.sample import generate

    cfg = ck["train_config"]
    ema = DiT(DiTConfig(**ck["model_config"]))
    ema.load_state_dict(ck["ema"])
    settings = dict(sampler=cfg["sampler"], steps=cfg["sample_steps"], cfg_scale=cfg["cfg_scale"])
    imgs, labs = generate(ema, 20, seed=cfg["seed"] + 10_000, **settings)
    assert m["n"] == 20 and labs.tolist() == [i % 10 for i in range(20)]
    x = to_inputs(imgs)
    assert m["accuracy"] == pytest.approx(float((load_classifier().predict(x) == labs).mean()))
    real, real_labels = real_digits()
    svc = SVC(kernel="rbf", gamma=SVC_GAMMA, C=SVC_C).fit(to_inputs(real), real_labels)
    assert m["svc_accuracy"] == pytest.approx(float((svc.predict(x) == labs).mean()))
    # the preview grid: one row per class (samples_per_class = 1 column), 8x8 upscaled to 64x64 cells
    # 4 px apart, the class names in a margin on the left
    grid = np.asarray(Image.open(tmp_path / "samples_0000010.png"))
    preview, _ = generate(ema, 10, labels=torch.arange(10), seed=cfg["seed"], **settings)
    margin = grid.shape[1] - (68 + 4)
    assert grid.shape[0] == 10 * 68 + 4 and 8 <= margin < 64
    for r in range(10):
        cell = grid[4 + 68 * r:68 * (r + 1), margin + 4:margin + 68]
        np.testing.assert_array_equal(cell, np.kron(preview[r, :, :, 0], np.ones((8, 8))))


def test_data_order_is_a_permutation_per_epoch():
    r = StepRandomness(seed=0, n=10, batch=4, flip=False)
    seen = torch.cat([r.indices(s) for s in range(5)])  # 20 draws = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(StepRandomness(0, 10, 4, False).indices(3), r.indices(3))


@pytest.mark.parametrize("mode,port", [("ddp", 29533), ("fsdp", 29534)])
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path, mode, port):
    """DDP (and FSDP) over 2 gloo processes: one step on a global batch of 8 gives the
    weights one process gets on that batch; then the run resumes for a second step the other
    way (DDP -> FSDP, FSDP -> DDP), and its recorded config says what it now is."""
    common = ["--ckpt-every", "1", "--batch-size", "8", "--no-progress", "--eval-samples", "0",
              "--sample-every", "1000", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--seed", "5"]
    one = dits_cli("train", "--out", str(tmp_path / "one"), "--steps", "2", *common)
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
              "-m", "dits", "train"]
    extra = ["--fsdp", "true"] if mode == "fsdp" else []
    two = subprocess.run([*launch, "--out", str(tmp_path / "two"), "--steps", "1", *common, *extra],
                         env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, crash_text(two.stderr)
    assert "2 process(es)" in two.stdout
    first = load_checkpoint(tmp_path / "one" / "checkpoints" / "0000001.pt")
    _, m2, e2 = weights(tmp_path / "two")
    for k in first["model"]:
        assert torch.allclose(first["model"][k], m2[k], atol=1e-6, rtol=0), k
        assert torch.allclose(first["ema"][k], e2[k], atol=1e-6, rtol=0), k
    other = ["--fsdp", "false" if mode == "fsdp" else "true"]
    resumed = subprocess.run([*launch, "--resume", str(tmp_path / "two"), "--steps", "2", "--no-progress", *other],
                             env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, crash_text(resumed.stderr)
    assert f"fsdp: {'false' if mode == 'fsdp' else 'true'}" in (tmp_path / "two" / "config.yaml").read_text()
    _, m1, _ = weights(tmp_path / "one")
    _, m2, _ = weights(tmp_path / "two")
    for k in m1:
        assert torch.allclose(m1[k], m2[k], atol=1e-5, rtol=0), k


def test_sigterm_to_the_process_group_with_loader_workers(tmp_path):
    """SLURM signals every process of the job, the DataLoader's workers too: they ignore it, the
    trainer checkpoints and exits 143 (and does not hang on its workers)."""
    from PIL import Image
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 40, 90)).save(tmp_path / "imgs" / cls / f"{i}.png")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    run = subprocess.run([sys.executable, "-m", "dits", "train", *flags, "--data", str(tmp_path / "imgs"),
                          "--image-size", "8", "--batch-size", "4", "--steps", "50", "--num-workers", "2",
                          "--no-progress", "--out", str(tmp_path / "run")], start_new_session=True, timeout=120,
                         env={**ENV, "DITS_FAULT_AT_STEP": "3", "DITS_FAULT_SIGNAL": "SIGTERM", "DITS_FAULT_GROUP": "1"},
                         capture_output=True, text=True)
    assert run.returncode == 143, run.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "run").name == "0000004.pt"


def test_train_on_image_folder_with_classes_and_flat(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 14, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    train(resolve_config(None, {**TINY, "data": str(tmp_path / "imgs"), "image_size": 8, "steps": 2,
                                    "ckpt_every": 2, "batch_size": 4, "out": str(tmp_path / "run")}), progress=False)
    ck = load_checkpoint(tmp_path / "run/checkpoints/0000002.pt")
    assert ck["model_config"]["in_channels"] == 3 and ck["model_config"]["num_classes"] == 2
    flat = tmp_path / "imgs" / "cat"
    train(resolve_config(None, {**TINY, "data": str(flat), "image_size": 8, "steps": 2, "ckpt_every": 2,
                                "batch_size": 4, "out": str(tmp_path / "run2")}), progress=False)
    assert load_checkpoint(tmp_path / "run2/checkpoints/0000002.pt")["model_config"]["num_classes"] == 0


def test_atomic_checkpoint_write_leaves_nothing_on_crash(tmp_path, monkeypatch):
    target = tmp_path / "c.pt"
    save_checkpoint(target, {"a": torch.ones(2)})

    def boom(obj, f):
        Path(f).write_bytes(b"half a file")
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(target, {"a": torch.zeros(2)})
    assert torch.equal(load_checkpoint(target)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


# ------------------------------------------------------------------ bad input: one line, exit 2
def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv,needle", [
    (["train", "--preset", "nope"], "unknown preset"),
    (["train", "--data", "/no/such/folder"], "/no/such/folder"),
    (["train", "--model", "DiT-Q/2", "--data", "digits", "--preset", "digits"], "valid names"),
    (["train", "--patch-size", "3"], "not divisible by patch size"),
    (["train", "--batch-size", "0"], "batch-size"),
])
def test_train_bad_input(capsys, tmp_path, argv, needle):
    code, err = run_cli(capsys, *argv, "--out", str(tmp_path / "r"), "--no-progress")
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_empty_folder_and_bad_checkpoints(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, "train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"))
    assert code == 2 and len(err.splitlines()) == 1
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 truncated")
    code, err = run_cli(capsys, "sample", "--ckpt", str(tmp_path / "trunc.pt"), "--out", str(tmp_path / "s.npz"))
    assert code == 2 and "truncated" in err and not (tmp_path / "s.npz").exists()
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    code, err = run_cli(capsys, "sample", "--ckpt", str(tmp_path / "foreign.pt"), "--out", str(tmp_path / "s.npz"))
    assert code == 2 and "not a DiT checkpoint" in err


def test_resume_with_incompatible_config_and_sample_cli(capsys, tmp_path):
    train(tiny_cfg(tmp_path, steps=2, ckpt_every=2), progress=False)
    code, err = run_cli(capsys, "train", "--resume", str(tmp_path), "--hidden-size", "64")
    assert code == 2 and "--hidden-size" in err
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(tmp_path), "--num-samples", "6", "--sampler", "ddim", "--steps", "3",
                 "--out", str(out), "--class", "2"]) == 0
    d = np.load(out)
    assert d["arr_0"].shape == (6, 8, 8, 1) and d["arr_0"].dtype == np.uint8
    assert d["arr_1"].dtype == np.int64 and (d["arr_1"] == 2).all()
    code, err = run_cli(capsys, "sample", "--ckpt", str(tmp_path), "--class", "12", "--out", str(out))
    assert code == 2 and "0..9" in err
    code, err = run_cli(capsys, "sample", "--ckpt", str(tmp_path), "--out", "/proc/nope/s.npz")
    assert code == 2
