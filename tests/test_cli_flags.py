"""Documented command-line features read back against what they promise: the README's `dits
flops` examples, `dits convert` and `dits extract-latents` flags, DITS_DEBUG=1."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import _reference_dit as official
import diffusers
from dits.cli import main
from dits.errors import UserError

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def tiny_vae_dir(path):
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                            layers_per_block=1).save_pretrained(path)
    return path


# ------------------------------------------------------------------ dits flops, as the README shows it
PAPER_TABLE4 = {"DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
                "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39, "DiT-XL/4": 29.05,
                "DiT-XL/2": 118.64}


def test_readme_flops_table_is_what_the_command_prints(capsys):
    """The README's `$ dits flops --all` block is the command's output, and its claim holds: all
    twelve within 0.4 % of the paper's Table 4, the largest gap DiT-S/8's 0.392 %."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("$ dits flops --all\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert main(["flops", "--all"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert [ln.split() for ln in printed] == [ln.split() for ln in block]
    assert main(["flops", "--all", "--json"]) == 0  # unrounded
    rows = json.loads(capsys.readouterr().out)
    gaps = {r["model"]: abs(r["gflops"] - PAPER_TABLE4[r["model"]]) / PAPER_TABLE4[r["model"]] for r in rows}
    assert len(gaps) == 12 and max(gaps.values()) < 0.004
    assert max(gaps, key=gaps.get) == "DiT-S/8" and round(100 * gaps["DiT-S/8"], 3) == 0.392


def test_readme_flops_json_example_cross_attn_at_64(capsys):
    """`dits flops DiT-XL/2 --input-size 64 --block cross-attn --json`: going from 32x32 (T = 256
    tokens) to 64x64 (T = 1024) adds only terms that grow with T, counted here by hand (fvcore:
    one MAC per flop, LayerNorm 4 flops per element plus 1 with an affine); the parameters grow by
    the position embedding alone."""
    out = {}
    for size in (32, 64):
        assert main(["flops", "DiT-XL/2", "--input-size", str(size), "--block", "cross-attn", "--json"]) == 0
        out[size] = json.loads(capsys.readouterr().out)
    assert set(out[64]) == {"model", "params", "gflops"} and out[64]["model"] == "DiT-XL/2"
    depth, d, p, c = 28, 1152, 2, 4

    def grows_with_t(t):
        block = (3 * t * d * d + t * d * d            # self-attention qkv, projection
                 + 2 * t * t * d                      # q k^T, attention @ v
                 + t * d * d + t * d * d              # cross-attention query, projection
                 + 2 * t * 2 * d                      # against the 2 condition tokens
                 + 2 * t * d * 4 * d                  # MLP
                 + 3 * 5 * t * d)                     # three affine LayerNorms
        return depth * block + t * p * p * c * d + 4 * t * d + t * d * p * p * 2 * c  # patches, final norm, linear
    want = (grows_with_t(1024) - grows_with_t(256)) / 1e9
    assert out[64]["gflops"] - out[32]["gflops"] == pytest.approx(want, abs=0.011)  # printed to 2 decimals
    assert out[64]["params"] - out[32]["params"] == (1024 - 256) * d


# ------------------------------------------------------------------ DITS_DEBUG
def test_dits_debug_shows_the_traceback_instead_of_one_line(tmp_path, monkeypatch, capsys):
    argv = ["train", "--preset", "no-such-preset", "--out", str(tmp_path / "r")]
    monkeypatch.delenv("DITS_DEBUG", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-preset" in err
    monkeypatch.setenv("DITS_DEBUG", "1")
    with pytest.raises(UserError, match="no-such-preset"):
        main(argv)
    r = subprocess.run([sys.executable, "-m", "dits", *argv], env={**ENV, "DITS_DEBUG": "1"},
                       capture_output=True, text=True)
    assert r.returncode not in (0, 2) and "Traceback (most recent call last)" in r.stderr
    assert "no-such-preset" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ dits convert
@pytest.fixture(scope="module")
def official_s8(tmp_path_factory):
    """An official-layout DiT-S/8 (16x16x4 latents, 10 classes) from the independent reference,
    saved as a .safetensors state dict."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("convert")
    ref = official.randomised(official.DiT(input_size=16, patch_size=8, in_channels=4, hidden_size=384, depth=12,
                                           num_heads=6, num_classes=10), seed=7).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, root / "s8.safetensors")
    return root, ref


def test_convert_flags(official_s8, tmp_path, capsys):
    """--model names the size; --scheduler ddpm writes the paper's schedule (linear betas 1e-4 ..
    0.02 over 1,000 steps); --vae copies that VAE in; --class-names FILE (one per line) or a latent
    cache dir become id2label; --overwrite replaces; the exported transformer, loaded exactly, is
    the reference model's function."""
    from dits.interop.diffusers import load_exact_diffusers

    root, ref = official_s8
    vae = tiny_vae_dir(tmp_path / "vae")
    names = [f"class {i}" for i in range(10)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "pipe"
    src = str(root / "s8.safetensors")
    assert main(["convert", "--to", "diffusers", src, str(out), "--model", "DiT-S/8", "--scheduler", "ddpm",
                 "--vae", str(vae), "--class-names", str(tmp_path / "names.txt")]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"] and index["vae"][1] == "AutoencoderKL"
    assert [index["id2label"][str(i)] for i in range(10)] == names
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"], sched["num_train_timesteps"]) == (
        1e-4, 0.02, "linear", 1000)
    copied = diffusers.AutoencoderKL.from_pretrained(out / "vae").state_dict()
    for k, v in diffusers.AutoencoderKL.from_pretrained(vae).state_dict().items():
        assert torch.equal(copied[k], v), k
    transformer = load_exact_diffusers(out)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(transformer(x, timestep=t, class_labels=y).sample, ref(x, t, y),
                                   rtol=1e-4, atol=1e-5)
    capsys.readouterr()

    # the wrong size name: one line, exit 2; an existing output: refused, then replaced with --overwrite
    assert main(["convert", "--to", "diffusers", src, str(tmp_path / "x"), "--model", "DiT-B/8"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    assert main(["convert", "--to", "diffusers", src, str(out), "--scheduler", "dpm"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    from dits.data.latents import extract_latents

    for i in range(10):  # a (pixel) latent cache of 10 class folders named c0 .. c9
        (tmp_path / "imgs" / f"c{i}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(tmp_path / "imgs" / f"c{i}" / "0.png")
    cache = extract_latents(tmp_path / "imgs", "pixel", 8, tmp_path / "cache", progress=False)
    assert main(["convert", "--to", "diffusers", src, str(out), "--scheduler", "dpm", "--overwrite",
                 "--class-names", str(cache)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"] and index["vae"] == [None, None]
    assert index["id2label"]["9"] == "c9" and not (out / "vae").exists()
    # ... and back: --from diffusers gives the same weights as the file converted
    assert main(["convert", "--from", "diffusers", str(out), str(tmp_path / "back.pt")]) == 0
    from dits.checkpoint import load_model
    back, _ = load_model(tmp_path / "back.pt")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)
    capsys.readouterr()


# ------------------------------------------------------------------ dits extract-latents
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "imgs" / cls / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "imgs" / "b" / "tiny.png")
    return root, tiny_vae_dir(root / "vae")


def _extract(root, vae, out, *flags):
    return main(["extract-latents", "--data", str(root / "imgs"), "--vae", str(vae), "--image-size", "16",
                 "--out", str(out), "--device", "cpu", "--num-workers", "0", "--batch-size", "4", *flags])


def test_extract_latents_flags(folder, tmp_path, capsys):
    """--small skip drops the 8 px image (error names it; upscale keeps it); --scaling-factor
    multiplies the same posterior draws; --seed draws others; --no-flip stores one variant;
    --store-dtype float32; --posterior moments stores the scaled mean and std of diffusers'
    own latent distribution for each image."""
    from dits.data.folder import ImageFolderDataset
    from dits.data.latents import read_meta

    root, vae = folder
    assert _extract(root, vae, tmp_path / "err", "--small", "error") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tiny.png" in err
    assert _extract(root, vae, tmp_path / "up") == 0                      # default: upscale, keep it
    assert read_meta(tmp_path / "up")["n"] == 7
    for name, flags in (("base", []), ("half", ["--scaling-factor", "0.5"]), ("seed1", ["--seed", "1"])):
        assert _extract(root, vae, tmp_path / name, "--small", "skip", "--store-dtype", "float32", *flags) == 0
    capsys.readouterr()
    base, half, seed1 = (np.load(tmp_path / n / "latents.npy") for n in ("base", "half", "seed1"))
    assert base.shape == (6, 2, 4, 8, 8) and base.dtype == np.float32  # 6 images (tiny skipped), image + flip
    assert read_meta(tmp_path / "base")["scaling_factor"] == 0.18215
    assert read_meta(tmp_path / "half")["scaling_factor"] == 0.5
    np.testing.assert_allclose(half, base * (0.5 / 0.18215), rtol=1e-5, atol=1e-6)
    assert np.abs(seed1 - base).max() > 1e-2

    assert _extract(root, vae, tmp_path / "mom", "--small", "skip", "--no-flip", "--posterior", "moments",
                    "--store-dtype", "float32", "--scaling-factor", "0.5") == 0
    mean, std = np.load(tmp_path / "mom" / "latents.npy"), np.load(tmp_path / "mom" / "std.npy")
    assert mean.shape == std.shape == (6, 1, 4, 8, 8)
    images = ImageFolderDataset(root / "imgs", 16, flip=False, small="skip")
    autoencoder = diffusers.AutoencoderKL.from_pretrained(vae).eval()
    with torch.no_grad():
        for row in (0, 5):
            dist = autoencoder.encode(images[row][0][None]).latent_dist
            np.testing.assert_allclose(mean[row, 0], 0.5 * dist.mean[0].numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(std[row, 0], 0.5 * dist.std[0].numpy(), rtol=1e-4, atol=1e-6)
    # samples are mean + std * noise: the sample cache's draws, standardised, look standard normal
    m_all = np.load(tmp_path / "mom" / "latents.npy")
    z = (half[:, 0] - m_all[:, 0]) / std[:, 0]
    assert np.abs(z).max() < 6 and abs(z.mean()) < 0.2 and 0.8 < z.std() < 1.2
    line = capsys.readouterr().out
    want = r"6 images, latents \(4, 8, 8\) x1 \(float32, posterior moments\), 2 classes, scaling factor 0.5"
    assert re.search(want, line), line
