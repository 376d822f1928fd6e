"""The frozen autoencoder between images and the space DiT works in (SPEC §1).

>>> vae = load_autoencoder("stabilityai/sd-vae-ft-ema")   # or -mse, or a local directory
>>> z = vae.encode(images)        # images in [-1, 1] -> latents * 0.18215, (N, 4, H/8, W/8)
>>> x = vae.decode(z)             # -> images in [-1, 1]
>>> pix = load_autoencoder("pixel")  # identity: DiT on pixels, scale 1

Both kinds share one interface: ``encode``, ``decode``, ``latent_channels``,
``downsample``, ``scaling_factor``, ``spec`` (the string recorded in latent caches and
checkpoints) and ``latent_shape(image_size)``. Outputs are float32 whatever the
autoencoder's own dtype, so callers never have to care whether it runs in fp16/bf16.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from dits.errors import UserError

PIXEL_SPECS = ("pixel", "identity", "none")
KNOWN_VAES = ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class _Autoencoder(nn.Module):
    """What the two kinds share. Always frozen and in eval mode."""

    spec: str
    latent_channels: int
    image_channels: int
    downsample: int
    scaling_factor: float

    def train(self, mode: bool = True):
        # Never trained: stays in eval mode even inside a parent's ``.train()``.
        return super().train(False)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a square image of side ``image_size``."""
        if image_size % self.downsample:
            raise UserError(f"image size {image_size} is not a multiple of the autoencoder's downsampling "
                            f"factor {self.downsample}; use a multiple of {self.downsample}")
        s = image_size // self.downsample
        return (self.latent_channels, s, s)

    def _check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise UserError(f"expected images of shape (N, {self.image_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise UserError(f"image sides must be multiples of {self.downsample}, got {tuple(x.shape[2:])}")


class IdentityAutoencoder(_Autoencoder):
    """Pixel-space DiT: "latents" are the images themselves (times ``scaling_factor``, 1)."""

    def __init__(self, channels: int = 3, scaling_factor: float | None = None):
        super().__init__()
        self.spec = "pixel"
        self.latent_channels = self.image_channels = channels
        self.downsample = 1
        self.scaling_factor = float(1.0 if scaling_factor is None else scaling_factor)
        self.eval()

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        self._check_images(x)
        return x.float() * self.scaling_factor

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return z, torch.zeros_like(z)  # deterministic: std 0

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() / self.scaling_factor


class LatentAutoencoder(_Autoencoder):
    """A frozen diffusers ``AutoencoderKL`` that maps [-1, 1] images to scaled latents."""

    def __init__(self, vae, spec: str, scaling_factor: float | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.spec = spec
        self.latent_channels = int(cfg.latent_channels)
        self.image_channels = int(cfg.in_channels)
        # Each encoder stage but the last halves the resolution: 8 for SD's four stages.
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else cfg.scaling_factor)
        # Newer VAEs (SD3, FLUX) also centre their latents; SD's have no shift.
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W) -> float32 latents (N, C, H/f, W/f), scaled.

        ``sample=True`` draws from the posterior as DiT's training does (SPEC §1), with
        ``generator`` if given; ``noise`` (standard normal, the latent shape) fixes the draw
        exactly, independent of batch composition and device. ``sample=False`` gives the mean.
        """
        self._check_images(x)
        dist = self.vae.encode(x.to(device=self.device, dtype=self.dtype)).latent_dist
        if not sample:
            z = dist.mean
        elif noise is not None:
            z = dist.mean + dist.std * noise.to(device=dist.mean.device, dtype=dist.mean.dtype)
        else:
            z = dist.sample(generator=generator)
        return (z.float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the scaled posterior, float32: a sample is ``mean + std * noise``."""
        self._check_images(x)
        dist = self.vae.encode(x.to(device=self.device, dtype=self.dtype)).latent_dist
        return (dist.mean.float() - self.shift_factor) * self.scaling_factor, dist.std.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> float32 images in (about) [-1, 1]; clamp before saving."""
        z = z.float() / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(device=self.device, dtype=self.dtype)).sample.float()


def vae_key(spec) -> str:
    """The string a spec is recorded as: "pixel", a hub id, or a directory's absolute path."""
    if spec is None:
        return "pixel"
    if isinstance(spec, _Autoencoder):
        return spec.spec
    s = str(spec).strip()
    if s.lower() in PIXEL_SPECS:
        return "pixel"
    path = Path(s).expanduser()
    return str(path.resolve()) if path.is_dir() else s


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def pretrained_kwargs() -> dict:
    """Keyword arguments for diffusers' ``from_pretrained`` that keep it quiet without accelerate."""
    import importlib.util

    return {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}


def _move(module: nn.Module, device, dtype) -> nn.Module:
    # plain nn.Module.to: diffusers' override warns on every dtype cast, even to float32
    return nn.Module.to(module, device=device, dtype=dtype)


def _from_pretrained(path_or_id: str, **kwargs):
    from diffusers import AutoencoderKL

    with warnings.catch_warnings():  # deprecation chatter from inside huggingface_hub
        warnings.simplefilter("ignore", UserWarning)
        return AutoencoderKL.from_pretrained(path_or_id, **pretrained_kwargs(), **kwargs)


def _from_hub(hub_id: str, dtype: torch.dtype):
    """Load from the local Hugging Face cache, else download; one clear line if neither works."""
    try:  # the cache first: no network round trip (and no retries) when the VAE is there
        return _from_pretrained(hub_id, torch_dtype=dtype, local_files_only=True)
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
    try:
        if offline:
            raise OSError("HF_HUB_OFFLINE is set")
        return _from_pretrained(hub_id, torch_dtype=dtype)
    except Exception as e:
        # diffusers' own message ("does not appear to have a file named config.json") hides
        # that the real problem is usually no network or a wrong id.
        reason = "HF_HUB_OFFLINE is set" if offline else f"hub unreachable or no such repo: {_first_line(e)}"
        raise UserError(f"VAE {hub_id!r} is not in the local Hugging Face cache and could not be downloaded "
                        f"({reason}); download it once with network access, or pass a local directory") from e


def load_autoencoder(spec=None, scaling_factor: float | None = None, device="cpu",
                     dtype: torch.dtype = torch.float32, channels: int = 3) -> _Autoencoder:
    """The autoencoder named by ``spec``.

    ``None``/``"pixel"``/``"identity"``: the identity (``channels`` image channels).
    A hub id (``stabilityai/sd-vae-ft-ema``, ``...-mse``) or a local directory (an
    ``AutoencoderKL`` saved with ``save_pretrained``, or a pipeline directory with a
    ``vae/`` folder): a frozen :class:`LatentAutoencoder` on ``device`` in ``dtype``.
    A ``diffusers.AutoencoderKL`` object is wrapped as is. ``scaling_factor`` overrides the
    VAE config's (0.18215 for SD). Hub ids are looked up in the local Hugging Face cache
    first; with ``HF_HUB_OFFLINE=1`` nothing is downloaded.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in PIXEL_SPECS):
        return IdentityAutoencoder(channels, scaling_factor)
    if isinstance(spec, _Autoencoder):
        return spec
    if isinstance(spec, nn.Module):  # an AutoencoderKL built or loaded by the caller
        name = getattr(spec.config, "_name_or_path", None) or "custom"
        return LatentAutoencoder(_move(spec, device, dtype), str(name), scaling_factor)

    spec = str(spec).strip()
    path = Path(spec).expanduser()
    if path.is_dir():
        sub = None
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            sub = "vae"  # a whole pipeline directory
        try:
            vae = _from_pretrained(str(path), subfolder=sub, torch_dtype=dtype)
        except Exception as e:  # diffusers raises OSError, ValueError, JSON and safetensors errors
            raise UserError(f"{path} is not a valid diffusers AutoencoderKL directory (config.json + "
                            f"diffusion_pytorch_model.safetensors): {_first_line(e)}") from e
        key = vae_key(path)
    elif path.exists():
        raise UserError(f"VAE path {spec} is a file; pass an AutoencoderKL directory or a hub id "
                        f"such as {KNOWN_VAES[0]}")
    elif _HUB_ID.fullmatch(spec):  # "org/name", unless a directory of that name exists (above)
        vae = _from_hub(spec, dtype)
        key = spec
    elif spec.startswith(("/", ".", "~")) or "/" in spec or "\\" in spec:
        raise UserError(f"VAE directory {spec} does not exist; pass an existing directory or a hub id "
                        f"such as {KNOWN_VAES[0]}")
    else:
        raise UserError(f"unknown VAE {spec!r}; use 'pixel', a hub id such as {' or '.join(KNOWN_VAES)}, "
                        "or a local AutoencoderKL directory")
    return LatentAutoencoder(_move(vae, device, dtype), key, scaling_factor)


def check_latent_channels(vae: _Autoencoder, model_in_channels: int) -> None:
    """Refuse a model whose input width does not match the autoencoder's latents."""
    if vae.latent_channels != model_in_channels:
        raise UserError(f"autoencoder {vae.spec!r} gives {vae.latent_channels}-channel latents but the model takes "
                        f"{model_in_channels} channels; build the model with in_channels={vae.latent_channels} "
                        "or use a matching autoencoder")
