"""A cache of VAE latents, so that training never runs the VAE encoder.

``extract_latents`` (CLI: ``dits extract-latents``) encodes every image of an image folder
once, and once more horizontally flipped (the flip is applied to the *image* before
encoding: flipping a latent is not the latent of the flipped image). The cache directory::

    meta.json     what made it (VAE spec, scaling factor, image size, classes, seed ...)
                  and how many rows are done
    latents.npy   (N, V, C, h, w) memory-mapped; V = 2 (original, flipped) or 1 (--no-flip)
    std.npy       same shape, only with posterior="moments"
    labels.npy    (N,) int64
    files.txt     the source image of each row, relative to the data folder

Latents are stored as float16 by default (``dtype="float32"`` doubles the size): the scaled
latents have about unit variance and fp16's 3 significant digits are far below the noise
the diffusion adds (ImageNet 256: 1.28 M x 2 x 4x32x32 -> 21 GB in fp16).

The reference trains on ``latent_dist.sample()`` (SPEC §1), a fresh posterior draw each
time an image is seen. Two ways to cache that (``posterior=``):

* ``"sample"`` (default): each row is one draw, made with noise seeded by (seed, row,
  variant), so a cache is reproducible and does not depend on batch size or interruptions
  (beyond float rounding in the VAE's batched convolutions). Every epoch sees the same draw.
* ``"moments"``: rows hold the posterior mean and ``std.npy`` its standard deviation (twice
  the disk); ``LatentCacheDataset`` draws ``mean + std * noise`` on every access, exactly
  the reference's training distribution.

Resuming: rows are written, flushed, and only then ``meta.json``'s ``done`` count is
advanced (atomically), so after an interruption rerunning the same command continues
where it stopped. ``LatentCacheDataset`` refuses an unfinished cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from dits.errors import UserError
from dits.fileio import write_json_atomic, write_text_atomic

FORMAT = "dits-latent-cache"
VERSION = 1
STORAGE_DTYPES = ("float16", "float32")
POSTERIORS = ("sample", "moments")
# Settings that must agree for a rerun to continue an existing cache.
_RESUME_KEYS = ("vae", "scaling_factor", "image_size", "channels", "dtype", "variants", "posterior", "seed", "n",
                "files_sha256")


def read_meta(cache_dir: str | os.PathLike) -> dict:
    """The ``meta.json`` of a latent cache (UserError if it is not one)."""
    path = Path(cache_dir).expanduser() / "meta.json"
    if not path.is_file():
        raise UserError(f"{path.parent} is not a latent cache (no meta.json); create one with dits extract-latents")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); delete the cache and extract it again") from e
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a dits latent cache")
    if meta.get("version", 0) > VERSION:
        raise UserError(f"{path} has cache format version {meta['version']}; this dits reads up to "
                        f"{VERSION}: upgrade dits")
    return meta


def _noise(shape, seed: int, row: int, variant: int) -> torch.Tensor:
    """Standard normal noise that depends only on (seed, row, variant)."""
    state = np.random.SeedSequence([seed, row, variant]).generate_state(2, dtype=np.uint64)[0]
    g = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(shape, generator=g)


def _files_digest(files, labels, root: Path) -> tuple[str, list[str]]:
    rel = [os.path.relpath(f, root) for f in files]
    h = hashlib.sha256()
    for name, label in zip(rel, labels):
        h.update(f"{name}\t{label}\n".encode())
    return h.hexdigest(), rel


def extract_latents(data: str | os.PathLike, vae, image_size: int, out: str | os.PathLike, *,
                    batch_size: int = 32, device=None, dtype: str = "float16", flip: bool = True,
                    posterior: str = "sample", seed: int = 0, vae_dtype: torch.dtype = torch.float32,
                    num_workers: int = 0, scaling_factor: float | None = None, small: str = "upscale",
                    progress: bool = True, captioned: bool = False) -> Path:
    """Encode the image folder ``data`` into a latent cache at ``out``; resumes an unfinished one.

    ``vae`` is anything :func:`dits.vae.load_autoencoder` accepts (a spec or an autoencoder).
    Returns the cache directory. See the module docstring for the layout.
    """
    from dits.data.folder import ImageFolderDataset
    from dits.vae import load_autoencoder

    if dtype not in STORAGE_DTYPES:
        raise UserError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if posterior not in POSTERIORS:
        raise UserError(f"posterior must be one of {', '.join(POSTERIORS)}, got {posterior!r}")
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another --out")
    autoencoder = load_autoencoder(vae, scaling_factor=scaling_factor, device=device, dtype=vae_dtype)
    shape = autoencoder.latent_shape(image_size)
    dataset = ImageFolderDataset(data, image_size, flip=False, channels=autoencoder.image_channels, small=small,
                                 captioned=captioned)  # captioned: every image under the folder, no labels
    n, variants = len(dataset), 2 if flip else 1
    digest, rel = _files_digest(dataset.files, dataset.labels, dataset.root)
    meta = {
        "format": FORMAT, "version": VERSION,
        "vae": autoencoder.spec, "scaling_factor": autoencoder.scaling_factor, "image_size": int(image_size),
        "channels": autoencoder.image_channels, "latent_shape": list(shape), "dtype": dtype,
        "variants": variants, "seed": int(seed), "posterior": posterior,
        "classes": dataset.classes, "num_classes": dataset.num_classes, "n": n, "done": 0,
        "data": str(dataset.root.resolve()), "files_sha256": digest,
    }

    out.mkdir(parents=True, exist_ok=True)
    lat_path, lab_path, std_path = out / "latents.npy", out / "labels.npy", out / "std.npy"
    moments = posterior == "moments"
    resume = (out / "meta.json").is_file()
    if resume:
        old = read_meta(out)
        for key in _RESUME_KEYS:
            if old.get(key) != meta[key]:
                raise UserError(f"{out} holds a latent cache made with other settings ({key}: {old.get(key)!r}, now "
                                f"{meta[key]!r}); use another --out, or delete it to start over")
        meta["done"] = int(old["done"])
        latents = np.lib.format.open_memmap(lat_path, mode="r+")
        stds = np.lib.format.open_memmap(std_path, mode="r+") if moments else None
        labels = np.lib.format.open_memmap(lab_path, mode="r+")
    else:
        # Only leftovers of a run stopped before its first meta.json may be overwritten.
        ours = {lat_path.name, lab_path.name, std_path.name, "files.txt"}
        if any(p.name not in ours and not p.name.startswith(".") for p in out.iterdir()):
            raise UserError(f"{out} is not empty and not a latent cache; choose an empty or new --out directory")
        # The arrays are filled in place (too big to write atomically); meta.json, written
        # last and atomically, says how many rows are valid.
        latents = np.lib.format.open_memmap(lat_path, mode="w+", dtype=dtype, shape=(n, variants, *shape))
        stds = np.lib.format.open_memmap(std_path, mode="w+", dtype=dtype, shape=latents.shape) if moments else None
        labels = np.lib.format.open_memmap(lab_path, mode="w+", dtype=np.int64, shape=(n,))
        write_text_atomic(out / "files.txt", "".join(f"{r}\n" for r in rel))
        write_json_atomic(out / "meta.json", meta, indent=1)
    if meta["done"] >= n:
        return out

    start = meta["done"]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(start, n)), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, initial=start, unit="img", desc="extract-latents")
    row = start
    try:
        for images, ys in loader:
            b = images.shape[0]
            if variants == 2:
                images = torch.cat([images, images.flip(-1)])  # flip the image, then encode
            mean, std = (m.cpu() for m in autoencoder.encode_moments(images.to(device)))
            if moments:
                stds[row:row + b] = _rows(std, variants, b, dtype)
                stds.flush()
            else:  # one posterior draw, reproducible per (seed, row, variant)
                noise = torch.stack([_noise(shape, seed, row + i % b, i // b) for i in range(variants * b)])
                mean = mean + std * noise
            latents[row:row + b] = _rows(mean, variants, b, dtype)
            labels[row:row + b] = ys.numpy()
            latents.flush()
            labels.flush()
            row += b
            meta["done"] = row
            write_json_atomic(out / "meta.json", meta, indent=1)
            if bar is not None:
                bar.update(b)
    finally:
        if bar is not None:
            bar.close()
        del latents, labels, stds
    return out


def _rows(z: torch.Tensor, variants: int, b: int, dtype: str) -> np.ndarray:
    """(variants * b, C, h, w), variant-major -> (b, variants, C, h, w) in the storage dtype."""
    return z.reshape(variants, b, *z.shape[1:]).transpose(0, 1).numpy().astype(dtype)


class LatentCacheDataset(torch.utils.data.Dataset):
    """(latent, label) pairs from a finished cache: float32 (C, h, w) tensor and int.

    With ``flip`` (and a cache that has flips) each item is the flipped image's latent
    with probability 1/2; a ``posterior="moments"`` cache draws a fresh posterior sample
    each time. Both use torch's global RNG (which the DataLoader seeds in every worker);
    ``get(index, flip, generator)`` lets the caller decide instead.
    ``expect`` (e.g. ``dict(vae="stabilityai/sd-vae-ft-ema", image_size=256)``) lists
    settings the cache must have been made with; ``None`` values are not checked.
    Attributes: ``classes``, ``num_classes``, ``latent_shape``, ``scaling_factor``,
    ``vae_spec``, ``image_size``, ``meta``.
    """

    def __init__(self, cache_dir: str | os.PathLike, flip: bool = True, expect: dict | None = None):
        from dits.vae import vae_key

        self.cache_dir = Path(cache_dir).expanduser()
        self.meta = meta = read_meta(self.cache_dir)
        if meta["done"] < meta["n"]:
            raise UserError(f"latent cache {self.cache_dir} is unfinished ({meta['done']} of {meta['n']} images); "
                            "rerun the same dits extract-latents command to finish it")
        for key, want in (expect or {}).items():
            if want is None:
                continue
            if key not in meta:
                raise UserError(f"latent caches have no setting {key!r} to check")
            have = meta[key]
            same = vae_key(want) == have if key == "vae" else (
                list(want) == list(have) if isinstance(have, list) else want == have)
            if not same:
                raise UserError(f"latent cache {self.cache_dir} was made with {key}={have!r}, not {want!r}; "
                                f"extract the latents again with the {key} you want, or train with {key}={have!r}")
        self.flip = flip and meta["variants"] == 2
        self.classes = list(meta["classes"])
        self.num_classes = int(meta["num_classes"])
        self.latent_shape = tuple(meta["latent_shape"])
        self.scaling_factor = float(meta["scaling_factor"])
        self.vae_spec = meta["vae"]
        self.image_size = int(meta["image_size"])
        self.labels = np.load(self.cache_dir / "labels.npy")
        self.moments = meta.get("posterior") == "moments"
        self._latents = self._stds = None  # opened lazily: one memory map per DataLoader worker
        if self.labels.shape != (meta["n"],):
            raise UserError(f"latent cache {self.cache_dir} is damaged (labels.npy has the wrong size); "
                            "extract it again")

    def _array(self) -> np.ndarray:
        if self._latents is None:
            arr = np.load(self.cache_dir / "latents.npy", mmap_mode="r")
            if arr.shape[0] != self.meta["n"] or tuple(arr.shape[2:]) != self.latent_shape:
                raise UserError(f"latent cache {self.cache_dir} is damaged (latents.npy has shape "
                                f"{arr.shape}); extract it again")
            self._latents = arr
            if self.moments:
                self._stds = np.load(self.cache_dir / "std.npy", mmap_mode="r")
        return self._latents

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_latents"] = state["_stds"] = None  # memory maps are reopened in each worker, not pickled
        return state

    def __len__(self) -> int:
        return int(self.meta["n"])

    def get(self, index: int, flip: bool, generator: torch.Generator | None = None):
        """(latent, label) of image ``index``, of its flipped version if ``flip``: for a caller
        that makes the flip decisions itself (the trainer). A cache made without flips
        ignores ``flip``: flipping a latent is not encoding the flipped image."""
        variant = int(flip and self.meta["variants"] == 2)
        z = torch.from_numpy(np.array(self._array()[index, variant], dtype=np.float32))
        if self.moments:  # a fresh posterior sample, as the reference's training
            std = torch.from_numpy(np.array(self._stds[index, variant], dtype=np.float32))
            z = z + std * torch.randn(z.shape, generator=generator)
        return z, int(self.labels[index])

    def __getitem__(self, index: int):
        return self.get(index, self.flip and torch.rand(1).item() < 0.5)
