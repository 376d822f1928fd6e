"""Long runs: the non-finite guard, preemption, retention, file modes, fine-tuning (--init)."""
import json
import os
import signal
import stat

import pytest
import torch

from dits.checkpoint import load_checkpoint, resolve_weights
from dits.cli import main
from dits.config import resolve_config
from dits.fileio import write_text_atomic
from dits.train import train
from dits.train.faults import Preemption
from dits.train.retention import prune_checkpoints
from test_train import TINY

TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
DIVERGE = ["--lr", "1e4", "--grad-clip", "0", "--warmup-steps", "0", "--steps", "20", "--ckpt-every", "1",
           "--sample-every", "1", "--log-every", "1", "--no-progress"]  # TINY: loss inf at step 3


def strict_json_lines(path):
    def no_constants(name):
        raise AssertionError(f"{path} holds {name}: not strict JSON")
    return [json.loads(x, parse_constant=no_constants) for x in path.read_text().splitlines()]


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    code = main(["train", *TINY_FLAGS, *DIVERGE, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "diverged at step 3: loss is inf; lower --lr" in err and "0000002.pt" in err
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["0000001.pt", "0000002.pt"]  # nothing from the non-finite step
    for name in ckpts:
        ck = load_checkpoint(tmp_path / "checkpoints" / name)
        assert all(torch.isfinite(v).all() for v in [*ck["model"].values(), *ck["ema"].values()])
    assert sorted(p.name for p in tmp_path.glob("samples_*.png")) == ["samples_0000001.png", "samples_0000002.png"]
    assert [r["step"] for r in strict_json_lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_skip_mode_drops_and_counts_non_finite_steps(tmp_path, capsys):
    code = main(["train", *TINY_FLAGS, *DIVERGE, "--steps", "6", "--sample-every", "100",
                 "--on-nonfinite", "skip", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    log = strict_json_lines(tmp_path / "metrics.jsonl")
    assert [r.get("skipped", 0) for r in log] == [0, 0, 1, 2, 3, 4]  # every step after the blow-up
    assert all("loss" not in r for r in log[2:])  # nothing to average on those lines
    ck = load_checkpoint(tmp_path / "checkpoints/0000006.pt")
    before = load_checkpoint(tmp_path / "checkpoints/0000002.pt")
    for k, v in ck["model"].items():  # the dropped updates left the weights as they were
        assert torch.equal(v, before["model"][k]), k
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == 4


def test_strict_json_log_writes_null_for_non_finite_numbers():
    from dits.train.distributed import Dist
    from dits.train.outputs import LossAccumulator
    acc = LossAccumulator()
    acc.add({"loss": torch.tensor(1.0)}, torch.tensor(float("inf")))  # an fp16 overflow step's grad norm
    rec = acc.pop(Dist(), 1, 1e-4, 1.0)
    assert rec["grad_norm"] is None and json.loads(json.dumps(rec, allow_nan=False))["loss"] == 1.0


def test_retention_keeps_the_newest_and_the_milestones(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    for s in range(10, 101, 10):
        (d / f"{s:07d}.pt").write_bytes(b"x")
    (d / "0000005.pt.bad").write_bytes(b"x")  # not a checkpoint any more: never touched
    gone = prune_checkpoints(tmp_path, keep_last=2, keep_every=50)
    assert sorted(p.name for p in d.iterdir()) == ["0000005.pt.bad", "0000050.pt", "0000090.pt", "0000100.pt"]
    assert len(gone) == 7
    assert prune_checkpoints(tmp_path, keep_last=0) == []  # default: keep all


def test_keep_last_in_a_run(tmp_path):
    train(resolve_config("digits", {**TINY, "steps": 4, "ckpt_every": 1, "sample_every": 100, "keep_last": 2,
                                    "out": str(tmp_path)}), progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0000003.pt", "0000004.pt"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_first_signal_asks_to_stop_second_is_not_caught():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as p:
        assert not p.requested()
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this (main) thread
        assert p.requested() and p.name == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second one ends the process
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is before  # restored when the loop ends


# ------------------------------------------------------------------ fine-tuning
def _folder(root, classes, size=8):
    from PIL import Image
    for i, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (size, size), (40 * i, 30 * j, 90)).save(root / cls / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny 3-channel, 2-class, 8-px run to fine-tune from."""
    root = tmp_path_factory.mktemp("base")
    cfg = resolve_config(None, {**TINY, "data": str(_folder(root / "imgs", ["a", "b"])), "image_size": 8,
                                "steps": 2, "ckpt_every": 2, "batch_size": 4, "sample_every": 100,
                                "out": str(root / "run")})
    train(cfg, progress=False)
    return root / "run"


def test_load_init_adapts_label_table_and_position_embedding(base_run):
    from dits.models import DiT
    from dits.models.embeddings import sincos_2d
    from dits.train.finetune import load_init

    w = resolve_weights(base_run)
    cfg = w.config
    torch.manual_seed(0)
    model = DiT(type(cfg)(**{**cfg.to_dict(), "num_classes": 3, "input_size": 16}))
    notes = load_init(model, w)
    assert any("label table re-initialised for 3 classes (was 2; null row kept)" in n for n in notes)
    assert any("position embedding recomputed for 16x16" in n for n in notes)
    sd = model.state_dict()
    for k, v in w.state_dict.items():
        if k not in ("pos_embed", "y_embedder.embedding_table.weight"):
            assert torch.equal(sd[k], v), k
    table, old = sd["y_embedder.embedding_table.weight"], w.state_dict["y_embedder.embedding_table.weight"]
    assert table.shape[0] == 4 and torch.equal(table[-1], old[-1])  # null row stays the (last) null row
    assert not torch.equal(table[:2], old[:2])  # class rows start fresh
    expect = torch.from_numpy(sincos_2d(cfg.hidden_size, 16 // cfg.patch_size)).float()
    assert torch.allclose(sd["pos_embed"][0], expect)


def test_init_cli_starts_fresh_from_the_weights(base_run, tmp_path, capsys):
    data = _folder(tmp_path / "imgs", ["x", "y", "z"], size=16)
    code = main(["train", "--init", str(base_run), "--data", str(data), "--image-size", "16", "--steps", "1",
                 "--ckpt-every", "1", "--batch-size", "4", "--sampler", "ddim", "--sample-steps", "2",
                 "--samples-per-class", "1", "--out", str(tmp_path / "ft"), "--no-progress"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "fine-tuning from" in cap.out and "fresh optimiser, step 0" in cap.out
    ck = load_checkpoint(tmp_path / "ft/checkpoints/0000001.pt")
    assert ck["step"] == 1 and ck["train_config"]["init"] == str(base_run)
    assert ck["model_config"]["num_classes"] == 3 and ck["model_config"]["input_size"] == 16
    assert ck["model_config"]["depth"] == 1 and ck["model_config"]["hidden_size"] == 32  # the weights' shape
    assert all(int(s["step"]) == 1 for s in ck["opt"]["state"].values())  # a fresh AdamW: one step taken
    code = main(["train", "--init", str(base_run), "--data", str(data), "--depth", "2", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "drop --depth" in err and len(err.splitlines()) == 1


def test_readme_fine_tuning_example(base_run, tmp_path, capsys):
    """README's small example: fine-tune a digits run with another recipe (same command shape)."""
    import yaml

    base = tmp_path / "digits"   # the digits preset's own objective (flow), as the README's `make demo`
    flags = [f for f in TINY_FLAGS if not f.startswith(("--objective", "--sampler"))] + ["--sampler=euler"]
    assert main(["train", *flags, "--steps", "2", "--out", str(base), "--no-progress"]) == 0
    ft = tmp_path / "digits-ft"
    assert main(["train", "--init", str(base), "--out", str(ft), "--steps", "2", "--lr", "5e-4",
                 "--sampler", "euler", "--sample-steps", "2", "--eval-samples", "0", "--samples-per-class", "1",
                 "--batch-size", "16", "--ckpt-every", "1", "--log-every", "1", "--no-progress"]) == 0
    assert (ft / "checkpoints/0000002.pt").is_file()
    # the run records where it started and the new recipe
    cfg = yaml.safe_load((ft / "config.yaml").read_text())
    ck = load_checkpoint(ft / "checkpoints/0000001.pt")
    assert cfg["init"] == ck["train_config"]["init"] == str(base) and cfg["lr"] == ck["train_config"]["lr"] == 5e-4
    warm = cfg["warmup_steps"]
    lr0 = 5e-4 * min(1, 1 / warm) if warm else 5e-4  # the linear warm-up's first step
    log = strict_json_lines(ft / "metrics.jsonl")
    assert log[0]["step"] == 1 and log[0]["lr"] == pytest.approx(lr0)
    # ... and it started from the base run's EMA weights: undo AdamW's first step, theta_1 = theta_0 -
    # lr0 * m_hat / (sqrt(v_hat) + eps) with m_hat = exp_avg / 0.1, v_hat = exp_avg_sq / 0.001
    start = load_checkpoint(base / "checkpoints/0000002.pt")
    assert cfg["weight_decay"] == 0
    moved = 0
    for name, st in ck["opt"]["state"].items():
        m_hat, v_hat = st["exp_avg"].double() / 0.1, st["exp_avg_sq"].double() / 0.001
        theta0 = ck["model"][name].double() + lr0 * m_hat / (v_hat.sqrt() + 1e-8)
        torch.testing.assert_close(theta0, start["ema"][name].double(), rtol=0, atol=2e-7, msg=name)
        moved += int((ck["model"][name] != start["ema"][name]).sum())
        # the initial copy is the EMA, not the raw weights (they differ where the base run moved)
        if name == "final_layer.linear.weight":
            assert (start["model"][name] - start["ema"][name]).abs().max() > 1e-5
    assert moved > 0
    assert torch.equal(ck["model"]["pos_embed"], start["ema"]["pos_embed"])


def test_messages_are_shortened_at_a_word_boundary():
    from dits.errors import first_line
    msg = "PytorchStreamReader failed reading zip archive: failed finding central directory\nsecond line"
    assert first_line(msg) == msg.splitlines()[0]
    short = first_line(msg, 50)
    assert short == "PytorchStreamReader failed reading zip archive ..."
    assert first_line(ValueError("")) == "ValueError"
