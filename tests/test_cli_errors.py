"""Bad input through the CLI, as a table: one line (usage errors: two), exit code 2, no
traceback, and nothing created or changed on disk (issues 12 #7 and 14 #7)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from dits.cli import main
from dits.config import TrainConfig, resolve_config
from dits.train import train
from test_train import TINY


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with one tiny trained run (checkpoints at steps 1 and 2) and bad files."""
    root = tmp_path_factory.mktemp("ws")
    train(resolve_config("digits", {**TINY, "steps": 2, "ckpt_every": 1, "sample_every": 100,
                                    "out": str(root / "run")}), progress=False)
    (root / "empty").mkdir()
    (root / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (root / "trunc.pt").write_bytes(b"PK\x03\x04 truncated")
    (root / "config.yaml").write_text("model: DiT\n")
    (root / "afile").write_text("not a directory\n")
    torch.save({"weights": torch.ones(1)}, root / "foreign.pt")
    (root / "pipe").mkdir()
    from PIL import Image
    for cls in ("cat", "dog"):
        (root / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 200, 30)).save(root / "imgs" / cls / "0.png")
    return root


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


RUN = "run"
BAD = [
    # ---- train: names, numbers, combinations (validated before any run dir exists)
    (["train", "--preset", "nope", "--out", "new"], "unknown preset"),
    (["train", "--data", "/no/such/folder", "--out", "new"], "/no/such/folder"),
    (["train", "--model", "DiT-Q/2", "--out", "new"], "unknown model"),
    (["train", "--patch-size", "3", "--out", "new"], "not divisible by patch size"),
    (["train", "--batch-size", "0", "--out", "new"], "--batch-size must be >= 1"),
    (["train", "--sampler", "dpm", "--out", "new"], "sampler 'dpm' is unknown"),
    (["train", "--sample-steps", "0", "--out", "new"], "--sample-steps must be >= 1"),
    (["train", "--preset", "imagenet256", "--out", "new"], "pass --data IMAGE_FOLDER or --latents"),
    (["train", "--vae", "stabilityai/sd-vae-ft-ema", "--out", "new"], "drop --vae"),
    (["train", "--device", "tpu", "--out", "new"], "--device must be auto, cpu, cuda or cuda:N"),
    (["train", "--device", "cuda:99", "--out", "new"], "cuda:99"),
    (["train", "--precision", "fp8", "--out", "new"], "--precision must be one of"),
    (["train", "--on-nonfinite", "ignore", "--out", "new"], "--on-nonfinite must be one of"),
    (["train", "--keep-last", "-1", "--out", "new"], "--keep-last must be >= 0"),
    (["train", "--init", "nowhere/x.pt", "--out", "new"], "not found"),
    (["train", "--init", RUN, "--data", "imgs", "--image-size", "8", "--out", "new"], "input channels"),
    # ---- train: an existing run or file as --out, and --resume
    (["train", "--out", RUN, "--steps", "5"], "already holds a run (at step 2); continue it with --resume"),
    (["train", "--out", "afile"], "is a file"),
    (["train", "--resume", RUN, "--model", "DiT-XL/2"], "--model 'DiT-XL/2' differs from the run's 'DiT'"),
    (["train", "--resume", RUN, "--batch-size", "256"], "--batch-size 256 differs"),
    (["train", "--resume", RUN, "--seed", "0"], "--seed 0 differs"),
    (["train", "--resume", RUN, "--hidden-size", "64"], "--hidden-size"),
    (["train", "--resume", RUN, "--init", RUN], "pass only one"),
    (["train", "--resume", RUN, "--out", "elsewhere"], "drop --out"),
    (["train", "--resume", "empty"], "nothing to resume"),
    (["train", "--resume", RUN, "--sampler", "dpm"], "sampler 'dpm' is unknown"),
    # ---- sample
    (["sample", "--ckpt", RUN, "--steps", "0", "--out", "s.npz"], "--steps must be >= 1"),
    (["sample", "--ckpt", RUN, "--num-samples", "0", "--out", "s.npz"], "--num-samples must be >= 1"),
    (["sample", "--ckpt", RUN, "--device", "cuda:99", "--out", "s.npz"], "cuda:99"),
    (["sample", "--ckpt", RUN, "--sampler", "dpm", "--out", "s.npz"], "--sampler must be one of"),
    (["sample", "--ckpt", RUN, "--class", "12", "--out", "s.npz", "--no-progress"], "0..9"),
    (["sample", "--ckpt", RUN, "--out", "s.jpg"], "--out must end in .npz or .png"),
    (["sample", "--ckpt", "garbage.safetensors", "--out", "s.npz"], "not a readable .safetensors file"),
    (["sample", "--ckpt", "config.yaml", "--out", "s.npz"], "not a checkpoint file (a text file (YAML))"),
    (["sample", "--ckpt", "trunc.pt", "--out", "s.npz"], "truncated"),
    (["sample", "--ckpt", "foreign.pt", "--out", "s.npz"], "not a DiT checkpoint"),
    (["sample", "--ckpt", "empty", "--out", "s.npz"], "neither a run directory"),
    (["sample", "--ckpt", "dits-test/no-such-dit", "--out", "s.npz"], "HF_HUB_OFFLINE"),
    # ---- convert
    (["convert", "--to", "diffusers", RUN, "pipe"], "--overwrite"),
    (["convert", "--from", "diffusers", "empty", "x.pt"], "neither a run directory"),
    (["convert", "--from", "diffusers", RUN, "config.yaml"], "--overwrite"),
]
USAGE = [  # argparse errors: what is wrong, and where to look
    ["train", "--steps", "abc"],
    ["train", "--no-such-flag"],
    ["sample", "--out", "x.npz"],
    ["convert", "--to", "diffusers"],
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a[:3]) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(ws, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(ws)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = snapshot(ws)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert snapshot(ws) == before


@pytest.mark.parametrize("argv", USAGE, ids=[" ".join(a) for a in USAGE])
def test_usage_errors_are_two_lines(ws, monkeypatch, capsys, argv):
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2 and "error:" in err[0] and err[1] == f"see dits {argv[0]} --help", err
    assert snapshot(ws) == before


def test_every_config_field_is_classified_for_resume():
    from dits.config import CHANGE, FIXED, ON_RESUME
    assert set(TrainConfig.fields()) <= set(ON_RESUME)
    assert set(ON_RESUME.values()) == {CHANGE, FIXED}
    for name in ("objective", "guidance_interval", "compile", "grad_checkpoint"):  # other branches' fields
        assert name in ON_RESUME


def test_typed_flags_apply_on_resume_even_when_equal_to_the_default(ws, tmp_path, capsys):
    """lr 1e-4 is TrainConfig's default and precision fp32 too: typed, they still count."""
    run = tmp_path / "run"
    shutil.copytree(ws / RUN, run)
    code = main(["train", "--resume", str(run), "--steps", "3", "--lr", "1e-4", "--precision", "bf16",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "resuming from step 2; lr 0.001 -> 0.0001; precision 'fp32' -> 'bf16'; steps 2 -> 3" in out
    import yaml
    rec = yaml.safe_load((run / "config.yaml").read_text())
    assert rec["lr"] == 1e-4 and rec["steps"] == 3 and rec["precision"] == "bf16"
    assert torch.load(run / "checkpoints/0000003.pt", weights_only=True)["train_config"]["lr"] == 1e-4
    code = main(["train", "--resume", str(run), "--steps", "4", "--precision", "fp32", "--no-progress"])
    assert code == 0 and yaml.safe_load((run / "config.yaml").read_text())["precision"] == "fp32"


def test_overwrite_replaces_the_run(ws, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ws / RUN, run)
    (run / "notes.txt").write_text("mine")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["train", "--out", str(run), "--steps", "1", "--ckpt-every", "1", "--no-progress",
                 "--overwrite", *flags]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000001.pt"]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (run / "notes.txt").read_text() == "mine"  # only what a run writes is replaced


def test_truncated_newest_checkpoint_falls_back_with_one_warning(ws, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ws / RUN, run)
    newest = run / "checkpoints/0000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a torn write
    code = main(["train", "--resume", str(run), "--steps", "2", "--no-progress"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    warn = [ln for ln in cap.err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "0000002.pt is truncated or damaged" in warn[0] and "0000002.pt.bad" in warn[0]
    assert "resuming from step 1" in cap.out
    assert (run / "checkpoints/0000002.pt.bad").stat().st_size == 1000  # kept aside, not deleted
    assert torch.load(run / "checkpoints/0000002.pt", weights_only=True)["step"] == 2  # redone


def test_sample_defaults_are_the_runs_and_no_progress(ws, tmp_path, capsys):
    code = main(["sample", "--ckpt", str(ws / RUN), "--out", str(tmp_path / "g.png"), "--no-progress"])
    cap = capsys.readouterr()
    assert code == 0
    # the run's preview sampler and steps (TINY: ddim, 2), 8 per class for a grid
    assert "wrote 80 samples (diffusion ddim, 2 steps, cfg 1.3)" in cap.out
    assert "sampling" not in cap.err
