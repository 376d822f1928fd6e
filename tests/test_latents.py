"""Latent caches: extraction, flips, resuming, refusing mismatched or unfinished caches, CLI."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers  # a hard dependency: a broken install fails here, it is not skipped

from dits.data import latents as latents_mod  # noqa: E402
from dits.data.folder import ImageFolderDataset  # noqa: E402
from dits.data.latents import LatentCacheDataset, extract_latents, read_meta  # noqa: E402
from dits.errors import UserError  # noqa: E402
from dits.vae import LatentAutoencoder, load_autoencoder  # noqa: E402

SIZE = 32  # images 32px -> latents 4x16x16 with the tiny VAE (downsampling 2)



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("latents")
    photos = load_sample_images().images
    for c, name in enumerate(("china", "flower")):
        (root / "data" / name).mkdir(parents=True)
        for k in range(4):
            crop = photos[c][15 * k:15 * k + 50, 25 * k:25 * k + 70]
            Image.fromarray(crop).save(root / "data" / name / f"{k}.{'png' if k % 2 else 'jpg'}")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                  norm_num_groups=8, layers_per_block=1)
    vae.save_pretrained(root / "vae")
    cache = extract_latents(root / "data", root / "vae", SIZE, root / "cache", batch_size=3, progress=False)
    return root, cache


def test_cache_layout_and_meta(setup):
    root, cache = setup
    meta = read_meta(cache)
    assert meta["n"] == meta["done"] == 8
    assert meta["vae"] == str((root / "vae").resolve()) and meta["scaling_factor"] == 0.18215
    assert meta["image_size"] == SIZE and meta["latent_shape"] == [4, 16, 16]
    assert meta["classes"] == ["china", "flower"] and meta["num_classes"] == 2
    arr = np.load(cache / "latents.npy", mmap_mode="r")
    assert arr.shape == (8, 2, 4, 16, 16) and arr.dtype == np.float16
    assert np.load(cache / "labels.npy").tolist() == [0] * 4 + [1] * 4
    assert (cache / "files.txt").read_text().splitlines()[0] == os.path.join("china", "0.jpg")


def test_rows_are_posterior_samples_of_the_image_and_of_its_flip(setup):
    root, cache = setup
    ae = load_autoencoder(root / "vae")
    images = ImageFolderDataset(root / "data", SIZE, flip=False)
    arr = np.load(cache / "latents.npy")
    for row in (0, 5):
        x = images[row][0][None]
        for variant, img in enumerate((x, x.flip(-1))):
            z = ae.encode(img, noise=latents_mod._noise((4, 16, 16), 0, row, variant)[None])[0]
            np.testing.assert_allclose(arr[row, variant], z.numpy(), atol=2e-3, rtol=2e-3)  # fp16 storage
        mean = ae.encode(x, sample=False)[0].numpy()
        assert np.abs(arr[row, 0] - mean).max() > 0  # a sample, not the mean
    # The flipped image's latent is not the flipped latent (the VAE is not flip-equivariant).
    assert np.abs(arr[0, 1] - arr[0, 0][..., ::-1]).max() > 1e-2


def test_dataset_returns_both_variants(setup):
    root, cache = setup
    ds = LatentCacheDataset(cache, expect=dict(vae=str(root / "vae"), image_size=SIZE))
    assert len(ds) == 8 and ds.num_classes == 2 and ds.classes == ["china", "flower"]
    assert ds.latent_shape == (4, 16, 16) and ds.scaling_factor == 0.18215
    arr = np.load(cache / "latents.npy")
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        z, y = ds[2]
        assert z.dtype == torch.float32 and z.shape == (4, 16, 16) and y == 0
        seen.add(next(v for v in (0, 1) if np.array_equal(z.numpy(), arr[2, v].astype(np.float32))))
    assert seen == {0, 1}
    no_flip = LatentCacheDataset(cache, flip=False)
    assert all(np.array_equal(no_flip[3][0].numpy(), arr[3, 0].astype(np.float32)) for _ in range(5))
    # the trainer's interface: it decides the flip itself
    z, y = no_flip.get(5, flip=True)
    assert np.array_equal(z.numpy(), arr[5, 1].astype(np.float32)) and y == 1
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers reopen the memory map
    assert clone._latents is None
    for _ in range(4):  # the reopened map reads the stored rows: row 1, either variant, label 0
        z, y = clone[1]
        assert y == 0 and any(np.array_equal(z.numpy(), arr[1, v].astype(np.float32)) for v in (0, 1))
    assert clone._latents is not None


def test_mismatched_expectations_are_refused(setup):
    root, cache = setup
    with pytest.raises(UserError, match="image_size=32, not 64"):
        LatentCacheDataset(cache, expect=dict(image_size=64))
    with pytest.raises(UserError, match="made with vae="):
        LatentCacheDataset(cache, expect=dict(vae="stabilityai/sd-vae-ft-ema"))
    LatentCacheDataset(cache, expect=dict(vae=None, image_size=SIZE))  # None: not checked
    with pytest.raises(UserError, match="not a latent cache"):
        LatentCacheDataset(root / "data")


def test_interrupted_extraction_resumes_to_the_same_cache(setup, tmp_path, monkeypatch):
    root, cache = setup
    out = tmp_path / "cache"
    calls = {"n": 0}
    real_encode = LatentAutoencoder.encode_moments

    def failing_encode(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the second batch
        return real_encode(self, *args, **kwargs)

    monkeypatch.setattr(LatentAutoencoder, "encode_moments", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        extract_latents(root / "data", root / "vae", SIZE, out, batch_size=3, progress=False)
    assert read_meta(out)["done"] == 3
    with pytest.raises(UserError, match=r"unfinished \(3 of 8"):
        LatentCacheDataset(out)
    monkeypatch.undo()
    # Rerun, even with another batch size: continues at row 3 and gives the same rows (up to
    # float rounding: batched convolutions may round differently).
    extract_latents(root / "data", root / "vae", SIZE, out, batch_size=4, progress=False)
    assert read_meta(out)["done"] == 8
    np.testing.assert_allclose(np.load(out / "latents.npy"), np.load(cache / "latents.npy"), rtol=4e-3, atol=1e-4)
    np.testing.assert_array_equal(np.load(out / "labels.npy"), np.load(cache / "labels.npy"))
    # Different settings in the same directory are refused, not mixed in.
    with pytest.raises(UserError, match="other settings.*seed"):
        extract_latents(root / "data", root / "vae", SIZE, out, seed=1, progress=False)


def test_moments_cache_draws_a_fresh_sample_each_time(setup, tmp_path):
    root, cache = setup
    out = extract_latents(root / "data", root / "vae", SIZE, tmp_path / "m", posterior="moments", dtype="float32",
                          batch_size=8, progress=False)
    mean, std = np.load(out / "latents.npy"), np.load(out / "std.npy")
    assert mean.shape == std.shape == (8, 2, 4, 16, 16) and (std > 0).all()
    ae = load_autoencoder(root / "vae")
    x = ImageFolderDataset(root / "data", SIZE, flip=False)[6][0][None]
    m, s = ae.encode_moments(x.flip(-1))
    np.testing.assert_allclose(mean[6, 1], m[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std[6, 1], s[0].numpy(), rtol=1e-4, atol=1e-6)
    ds = LatentCacheDataset(out, flip=False, expect=dict(posterior="moments"))
    torch.manual_seed(0)
    a, b = ds[6][0], ds[6][0]
    assert not torch.equal(a, b)  # a new posterior draw on every access
    noise = (a.numpy() - mean[6, 0]) / std[6, 0]
    assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2
    torch.manual_seed(0)
    assert torch.equal(ds[6][0], a)  # ... from torch's seeded RNG


def test_output_must_be_new_or_a_cache(setup, tmp_path):
    root, _ = setup
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        extract_latents(root / "data", "pixel", SIZE, tmp_path / "busy", progress=False)
    with pytest.raises(UserError, match="storage dtype"):
        extract_latents(root / "data", "pixel", SIZE, tmp_path / "c", dtype="int8", progress=False)
    with pytest.raises(UserError, match="posterior"):
        extract_latents(root / "data", "pixel", SIZE, tmp_path / "c", posterior="mode", progress=False)


def test_pixel_cache_float32_without_flips(setup, tmp_path):
    root, _ = setup
    out = extract_latents(root / "data", "pixel", 16, tmp_path / "pix", dtype="float32", flip=False,
                          progress=False)
    ds = LatentCacheDataset(out, expect=dict(vae="pixel", image_size=16))
    arr = np.load(out / "latents.npy")
    assert arr.shape == (8, 1, 3, 16, 16) and arr.dtype == np.float32
    torch.testing.assert_close(ds[4][0], ImageFolderDataset(root / "data", 16, flip=False)[4][0])


def test_cli(setup, tmp_path, capsys):
    from dits.cli import main

    root, cache = setup
    out = tmp_path / "cli-cache"
    args = ["extract-latents", "--data", str(root / "data"), "--vae", str(root / "vae"), "--image-size", str(SIZE),
            "--out", str(out), "--batch-size", "8", "--device", "cpu", "--num-workers", "0"]
    assert main(args) == 0
    assert "8 images" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(out / "latents.npy"), np.load(cache / "latents.npy"), rtol=4e-3, atol=1e-4)
    assert main(args) == 0  # already complete: nothing to do
    bad = ["extract-latents", "--data", str(tmp_path / "nope"), "--vae", "pixel", "--out", str(tmp_path / "x")]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "meta.json").read_text())["done"] == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extract_on_cuda_matches_cpu(setup, tmp_path):
    root, cache = setup
    out = extract_latents(root / "data", root / "vae", SIZE, tmp_path / "gpu", device="cuda", batch_size=4,
                          vae_dtype=torch.bfloat16, progress=False)
    # bf16 VAE and TF32 convolutions: close to the fp32 CPU cache, not equal
    np.testing.assert_allclose(np.load(out / "latents.npy"), np.load(cache / "latents.npy"), rtol=0.1, atol=0.05)


def test_train_from_latent_cache_resumes_and_samples(setup, tmp_path):
    """`dits train --latents` (no VAE loaded), a resume, then `dits sample` decoding with the
    VAE recorded from the cache; a resumed run equals an uninterrupted one."""
    from dits.checkpoint import latest_checkpoint, load_checkpoint
    from dits.cli import main
    from dits.config import resolve_config
    from dits.train import train

    root, cache = setup
    base = dict(latents=str(cache), model="DiT", depth=1, hidden_size=32, num_heads=2, patch_size=4,
                batch_size=4, log_every=2, ckpt_every=2, eval_samples=0, sampler="ddim", sample_steps=2,
                samples_per_class=1)
    train(resolve_config(None, {**base, "steps": 4, "out": str(tmp_path / "a")}), progress=False)
    train(resolve_config(None, {**base, "steps": 2, "out": str(tmp_path / "b")}), progress=False)
    train(resolve_config(None, {"steps": 4}), resume=str(tmp_path / "b"), progress=False)
    a = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert a["step"] == b["step"] == 4 and a["model_config"]["in_channels"] == 4
    assert a["vae_spec"] == read_meta(cache)["vae"]
    assert a["train_config"]["image_size"] == SIZE  # the cache's, recorded (not the default 256)
    with pytest.raises(UserError, match="holds 32px images"):
        train(resolve_config(None, {**base, "image_size": 64, "out": str(tmp_path / "c")}), progress=False,
              typed={"image_size"})
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(tmp_path / "a"), "--num-samples", "2", "--sampler", "ddim",
                 "--steps", "2", "--out", str(out)]) == 0
    assert np.load(out)["arr_0"].shape == (2, SIZE, SIZE, 3)
