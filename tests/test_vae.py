"""The frozen autoencoder: identity and diffusers AutoencoderKL wrappers, scaling, errors."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import pytest
import torch

import diffusers  # noqa: E402  (a hard dependency: a broken install fails here, it is not skipped)

from dits.errors import UserError  # noqa: E402
from dits.vae import (IdentityAutoencoder, LatentAutoencoder, check_latent_channels,  # noqa: E402
                      load_autoencoder, vae_key)



@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny AutoencoderKL (downsampling 2, 4 latent channels) saved like a hub download."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                  norm_num_groups=8, layers_per_block=1)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pixel_specs_give_identity():
    for spec in (None, "pixel", "identity", "Pixel"):
        ae = load_autoencoder(spec)
        assert isinstance(ae, IdentityAutoencoder)
        assert (ae.spec, ae.scaling_factor, ae.downsample, ae.latent_channels) == ("pixel", 1.0, 1, 3)
    x = images()
    assert torch.equal(ae.encode(x), x) and torch.equal(ae.decode(x), x)
    assert load_autoencoder("pixel", channels=1).latent_shape(28) == (1, 28, 28)


def test_local_dir_is_a_frozen_scaled_vae(vae_dir):
    ae = load_autoencoder(vae_dir)
    assert isinstance(ae, LatentAutoencoder)
    assert ae.spec == str(vae_dir.resolve()) == vae_key(str(vae_dir))
    assert (ae.latent_channels, ae.downsample, ae.scaling_factor) == (4, 2, 0.18215)
    assert ae.latent_shape(32) == (4, 16, 16)
    assert not any(p.requires_grad for p in ae.parameters())
    parent = torch.nn.Sequential(ae)
    parent.train()
    assert not ae.vae.training  # stays in eval mode

    x = images()
    z = ae.encode(x, sample=False)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32 and not z.requires_grad
    raw = ae.vae.encode(x).latent_dist
    torch.testing.assert_close(z, raw.mean * 0.18215)
    # decode divides by the factor before the VAE decoder
    torch.testing.assert_close(ae.decode(z), ae.vae.decode(raw.mean).sample)


def test_posterior_sampling_is_seedable(vae_dir):
    ae = load_autoencoder(vae_dir)
    x = images()
    a = ae.encode(x, generator=torch.Generator().manual_seed(3))
    b = ae.encode(x, generator=torch.Generator().manual_seed(3))
    c = ae.encode(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, ae.encode(x, sample=False))  # a sample, not the mean
    noise = torch.randn(2, 4, 8, 8)
    dist = ae.vae.encode(x).latent_dist
    torch.testing.assert_close(ae.encode(x, noise=noise), (dist.mean + dist.std * noise) * 0.18215)


def test_scaling_factor_override_and_low_precision(vae_dir):
    ae = load_autoencoder(vae_dir, scaling_factor=0.5, dtype=torch.bfloat16)
    assert ae.scaling_factor == 0.5 and ae.dtype == torch.bfloat16
    z = ae.encode(images(), sample=False)
    assert z.dtype == torch.float32  # callers always get float32
    assert ae.decode(z).dtype == torch.float32


def test_wraps_an_autoencoder_object(vae_dir):
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir)
    ae = load_autoencoder(vae)
    assert isinstance(ae, LatentAutoencoder) and ae.downsample == 2
    assert load_autoencoder(ae) is ae


def test_pipeline_dir_with_vae_subfolder(vae_dir, tmp_path):
    (tmp_path / "pipe").mkdir()
    os.symlink(vae_dir, tmp_path / "pipe" / "vae")
    assert load_autoencoder(tmp_path / "pipe").latent_channels == 4


def test_bad_specs_are_one_line_user_errors(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "file.bin").write_text("x")
    cases = {
        str(tmp_path / "missing"): "does not exist",
        "./nowhere/vae": "does not exist",
        str(tmp_path / "broken"): "not a valid diffusers AutoencoderKL",
        str(tmp_path / "file.bin"): "is a file",
        "not-a-vae": "unknown VAE",
        "nobody-xyz/no-such-vae": "download it once",
    }
    for spec, message in cases.items():
        with pytest.raises(UserError, match=message) as info:
            load_autoencoder(spec)
        assert "\n" not in str(info.value)


def test_images_must_fit(vae_dir):
    ae = load_autoencoder(vae_dir)
    with pytest.raises(UserError, match="multiples of 2"):
        ae.encode(images(size=15))
    with pytest.raises(UserError, match="shape"):
        ae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(UserError, match="multiple of 2"):
        ae.latent_shape(33)


def test_check_latent_channels(vae_dir):
    ae = load_autoencoder(vae_dir)
    check_latent_channels(ae, 4)
    with pytest.raises(UserError, match="in_channels=4"):
        check_latent_channels(ae, 3)
