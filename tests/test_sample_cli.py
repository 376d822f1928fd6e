"""`dits sample`'s files, opened and read back: the class grid's layout, one PNG per sample with
its documented name, the .npz's arrays; the documented defaults on a run's and on foreign weights;
--guided-channels from the command line."""
import numpy as np
import pytest
import torch
from PIL import Image

import _reference_dit as official
from dits.checkpoint import load_model
from dits.cli import main
from dits.config import resolve_config
from dits.sample import generate
from dits.train import train
from test_train import TINY

SAMPLE = ["--sampler", "ddim", "--steps", "2", "--cfg-scale", "1.3", "--seed", "5", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-step digits run (10 classes, 8x8x1), previews with DDIM 2 steps (TINY)."""
    out = tmp_path_factory.mktemp("sample-run")
    train(resolve_config("digits", {**TINY, "out": str(out), "steps": 1, "ckpt_every": 1, "sample_every": 1000}),
          progress=False)
    model, _ = load_model(out)
    with torch.no_grad():  # a 1-step model is ~0: give it weights that make every sample differ
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    from dits.checkpoint import save_model
    save_model(out / "varied.pt", model)
    return out, model


def _expected(model, n, labels=None, seed=5):
    images, labs = generate(model, n, labels=labels, sampler="ddim", steps=2, cfg_scale=1.3, seed=seed)
    return images, labs


def test_png_grid_is_ten_rows_of_eight_in_class_order(run, tmp_path):
    """The default grid: 8 samples per class, one row per class (0..9 top to bottom), each 8x8
    sample nearest-upscaled 8x into a 64x64 cell, 4 px white gaps (1/16 of a cell), and a white
    margin on the left naming each row: (margin + 8*68+4) by 10*68+4 pixels."""
    out, model = run
    assert main(["sample", "--ckpt", str(out / "varied.pt"), "--out", str(tmp_path / "g.png"), *SAMPLE]) == 0
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    margin = grid.shape[1] - (8 * 68 + 4)
    assert grid.shape[0] == 10 * 68 + 4 and 8 <= margin < 64  # grey: one channel, saved as 'L'
    labels = torch.arange(10).repeat_interleave(8)
    images, _ = _expected(model, 80, labels)
    assert len({img.tobytes() for img in images}) == 80  # every cell distinct: a misplaced one would show
    for r in range(10):
        for c in range(8):
            y0, x0 = 4 + 68 * r, margin + 4 + 68 * c
            cell = grid[y0:y0 + 64, x0:x0 + 64]
            want = np.kron(images[8 * r + c, :, :, 0], np.ones((8, 8), dtype=np.uint8))
            np.testing.assert_array_equal(cell, want, err_msg=f"row {r} col {c}")
    body = grid[:, margin:]
    gaps = np.ones(body.shape, bool)
    for r in range(10):
        for c in range(8):
            gaps[4 + 68 * r:68 * (r + 1), 4 + 68 * c:68 * (c + 1)] = False
    assert (body[gaps] == 255).all()
    # every row's label is ink in the margin beside that row, and the rows' labels differ (0..9)
    rows = [grid[4 + 68 * r:68 * (r + 1), :margin] for r in range(10)]
    assert all((row < 128).any() for row in rows)
    assert len({row.tobytes() for row in rows}) == 10


def test_grid_gap_scales_with_the_cell():
    from dits.sample import grid_gap, make_grid

    assert [grid_gap(c) for c in (8, 16, 64, 128)] == [1, 1, 4, 8]
    g = make_grid(np.zeros((4, 16, 16, 1), np.uint8), ncol=2, scale=4)  # 64 px cells, 4 px apart
    assert g.shape == (2 * 68 + 4, 2 * 68 + 4, 1)
    assert (g[:4] == 255).all() and (g[68:72] == 255).all() and (g[4:68, 4:68] == 0).all()


def test_class_rows_are_named_by_the_data_sets_classes():
    from dits.sample import class_row_labels

    assert class_row_labels(range(3), "glyphs") == ["A", "B", "C"]
    assert class_row_labels([0, 9], "digits") == ["0", "9"]
    assert class_row_labels([2, 11], None) == ["2", "11"]


def test_directory_and_npz_hold_the_same_samples_whatever_the_batch(run, tmp_path):
    """`--out DIR`: one PNG per sample named {index:06d}_{label}.png, labels balanced 0,1,..,9,0,..;
    `.npz`: arr_0 uint8 N x H x W x C, arr_1 int64; sample i uses seed + i, so batch 5 and the
    default batch give the same images."""
    out, model = run
    ckpt = str(out / "varied.pt")
    assert main(["sample", "--ckpt", ckpt, "--num-samples", "12", "--out", str(tmp_path / "dir"), *SAMPLE]) == 0
    assert main(["sample", "--ckpt", ckpt, "--num-samples", "12", "--batch-size", "5",
                 "--out", str(tmp_path / "s.npz"), *SAMPLE]) == 0
    names = sorted(p.name for p in (tmp_path / "dir").iterdir())
    assert names == [f"{i:06d}_{i % 10}.png" for i in range(12)]
    images, labs = _expected(model, 12)
    assert labs.tolist() == [i % 10 for i in range(12)]
    with np.load(tmp_path / "s.npz") as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (12, 8, 8, 1)
        assert z["arr_1"].dtype == np.int64 and z["arr_1"].tolist() == labs.tolist()
        np.testing.assert_array_equal(z["arr_0"], images)
    for i, name in enumerate(names):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "dir" / name)), images[i, :, :, 0])
    # a sample's seed is seed + its index: sample 3 of seed 5 is sample 0 of seed 8
    first, _ = generate(model, 1, labels=torch.tensor([3]), sampler="ddim", steps=2, cfg_scale=1.3, seed=8)
    np.testing.assert_array_equal(first[0], images[3])


@pytest.fixture
def calls(monkeypatch):
    """Record what `dits sample` asks generate() for, and return blank images."""
    seen = []

    def fake(model, n, **kw):
        seen.append({"n": n, **kw})
        labels = kw.get("labels")
        labs = labels.numpy() if labels is not None else np.arange(n) % max(model.num_classes, 1)
        return np.zeros((n, 8, 8, 3), np.uint8), labs.astype(np.int64)
    monkeypatch.setattr("dits.sample.generate", fake)
    return seen


def test_defaults_on_a_run_are_its_preview_settings(run, tmp_path, calls, capsys):
    out, _ = run
    assert main(["sample", "--ckpt", str(out), "--out", str(tmp_path / "g.png"), "--no-progress"]) == 0
    c = calls[-1]
    assert (c["sampler"], c["steps"], c["cfg_scale"], c["n"]) == ("ddim", 2, 1.3, 80)  # TINY's; digits' 1.3
    assert c["labels"].tolist() == [k for k in range(10) for _ in range(8)]
    assert main(["sample", "--ckpt", str(out), "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    assert calls[-1]["n"] == 100 and calls[-1]["labels"] is None  # else 100, balanced
    assert main(["sample", "--ckpt", str(out), "--sampler", "dpm++", "--out", str(tmp_path / "s.npz"),
                 "--no-progress"]) == 0
    assert (calls[-1]["sampler"], calls[-1]["steps"]) == ("dpm++", 50)  # another sampler: not the run's steps
    capsys.readouterr()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Weights with no training config: an official-layout DiT-S/8 state dict (built by the
    independent reference, 16x16x4 latents, 10 classes) and a tiny AutoencoderKL to decode."""
    import diffusers

    root = tmp_path_factory.mktemp("foreign")
    ref = official.randomised(official.DiT(input_size=16, patch_size=8, in_channels=4, hidden_size=384, depth=12,
                                           num_heads=6, num_classes=10), seed=4)
    torch.save(ref.state_dict(), root / "DiT-S-8.pt")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                            layers_per_block=1).save_pretrained(root / "vae")
    return root


def test_defaults_on_foreign_weights_are_ddpm_250_cfg_4(foreign, tmp_path, calls, capsys):
    base = ["sample", "--ckpt", str(foreign / "DiT-S-8.pt"), "--vae", str(foreign / "vae"), "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "g.png")]) == 0
    c = calls[-1]
    assert (c["sampler"], c["steps"], c["cfg_scale"], c["guided_channels"]) == ("ddpm", 250, 4.0, None)
    assert "ddpm, 250 steps, cfg 4.0" in capsys.readouterr().out
    for sampler in ("ddim", "dpm++", "heun"):  # --sampler X alone: 50 steps
        assert main([*base, "--sampler", sampler, "--out", str(tmp_path / "s.npz")]) == 0
        assert (calls[-1]["sampler"], calls[-1]["steps"], calls[-1]["cfg_scale"]) == (sampler, 50, 4.0)
    # the reference's FID setting
    assert main([*base, "--cfg-scale", "1.5", "--guided-channels", "3", "--out", str(tmp_path / "s.npz")]) == 0
    assert (calls[-1]["cfg_scale"], calls[-1]["guided_channels"]) == (1.5, 3)
    capsys.readouterr()


def test_guided_channels_reach_the_sampler_and_change_the_samples(foreign, tmp_path, monkeypatch, capsys):
    """End to end (2 DDIM steps): --guided-channels 3 on 4-channel latents guides only eps[:3], as
    the official forward_with_cfg does: every guided model output seen is checked against
    u + s (c - u) on the first 3 channels, c (the conditional half) on the rest; 4 is the same as
    guiding every channel, 3 is not."""
    from dits.diffusion import guidance

    seen = []
    real = guidance.combine_guided

    def spy(out, cfg_scale, eps_channels, guided_channels=None):
        got = real(out, cfg_scale, eps_channels, guided_channels)
        k = 4 if guided_channels is None else guided_channels
        cond, uncond = out.chunk(2)
        want = cond.clone()
        want[:, :k] = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        torch.testing.assert_close(got[: len(cond)], want)
        seen.append((guided_channels, eps_channels, cfg_scale))
        return got
    monkeypatch.setattr(guidance, "combine_guided", spy)
    base = ["sample", "--ckpt", str(foreign / "DiT-S-8.pt"), "--vae", str(foreign / "vae"), "--num-samples", "2",
            "--sampler", "ddim", "--steps", "2", "--cfg-scale", "4", "--no-progress"]
    arrays = {}
    for k in (None, 3, 4):
        flags = [] if k is None else ["--guided-channels", str(k)]
        seen.clear()
        assert main([*base, *flags, "--out", str(tmp_path / f"g{k}.npz")]) == 0
        assert set(seen) == {(k, 4, 4.0)} and len(seen) == 2, seen
        with np.load(tmp_path / f"g{k}.npz") as z:
            arrays[k] = z["arr_0"]
    np.testing.assert_array_equal(arrays[4], arrays[None])
    assert np.abs(arrays[3].astype(int) - arrays[None].astype(int)).max() > 0
    capsys.readouterr()
