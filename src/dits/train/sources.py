"""Where training batches come from: the step-seeded randomness of the global batch, the
in-memory digits, and DataLoader-backed image folders and latent caches."""
from __future__ import annotations

import torch

from dits.config import TrainConfig
from dits.errors import UserError
from dits.train.distributed import Dist

class StepRandomness:
    """Everything random about step s, for the *global* batch, from generators seeded by
    (seed, s): which examples (one random permutation per epoch), flips, t, noise, label
    dropout. Nothing depends on the process count or on where a run was resumed."""

    def __init__(self, seed: int, n: int, batch: int, flip: bool):
        self.seed, self.n, self.batch, self.flip = seed, n, batch, flip
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch, (step + 1) * self.batch)
        epochs, offsets = pos // self.n, pos % self.n
        return torch.stack([self._perm_for(int(e))[int(o)] for e, o in zip(epochs, offsets)])

    def flips(self, step: int) -> torch.Tensor:
        if not self.flip:
            return torch.zeros(self.batch, dtype=torch.bool)
        g = torch.Generator().manual_seed((self.seed + 2) * 6_700_417 + step)
        return torch.rand(self.batch, generator=g) < 0.5

    def generator(self, step: int) -> torch.Generator:
        """For t, noise and label dropout."""
        return torch.Generator().manual_seed((self.seed + 1) * 7_919_993 + step)


class TensorSource:
    """A dataset held in memory as tensors (the built-in digits): batches by indexing."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int):
        self.x, self.y, self.num_classes = x, y, num_classes

    def __len__(self):
        return len(self.y)

    def batches(self, rand: StepRandomness, start: int, stop: int, lo: int, hi: int):
        for step in range(start, stop):
            idx, flips = rand.indices(step)[lo:hi], rand.flips(step)[lo:hi]
            x = self.x[idx].clone()
            x[flips] = x[flips].flip(-1)
            yield x, self.y[idx]


class _StepItems(torch.utils.data.Dataset):
    """Items addressed as (index, flip, step): the dataset's flipped image (or the cached
    latent of the flipped image) and, for caches that store posterior moments, a posterior
    draw seeded by (step, index)."""

    def __init__(self, ds, seed: int):
        self.ds, self.seed = ds, seed

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        i, flip, step = key
        if hasattr(self.ds, "get"):
            g = torch.Generator().manual_seed((self.seed + 3) * 2_147_483_647 + step * 1_000_003 + i)
            return self.ds.get(i, flip, g)
        x, y = self.ds[i]
        return (x.flip(-1) if flip else x), int(y)


class _StepBatchSampler(torch.utils.data.Sampler):
    def __init__(self, rand: StepRandomness, start: int, stop: int, lo: int, hi: int):
        self.rand, self.start, self.stop, self.lo, self.hi = rand, start, stop, lo, hi

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        for step in range(self.start, self.stop):
            idx, flips = self.rand.indices(step)[self.lo:self.hi], self.rand.flips(step)[self.lo:self.hi]
            yield [(int(i), bool(f), step) for i, f in zip(idx, flips)]


class DatasetSource:
    """A map-style dataset (image folder, latent cache) read by a DataLoader with
    ``num_workers`` processes, one step's slice of the global batch at a time."""

    def __init__(self, dataset, num_classes: int, num_workers: int, seed: int):
        self.dataset, self.num_classes, self.num_workers, self.seed = dataset, num_classes, num_workers, seed

    def __len__(self):
        return len(self.dataset)

    def batches(self, rand: StepRandomness, start: int, stop: int, lo: int, hi: int):
        loader = torch.utils.data.DataLoader(
            _StepItems(self.dataset, self.seed), batch_sampler=_StepBatchSampler(rand, start, stop, lo, hi),
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
            worker_init_fn=_ignore_stop_signals if self.num_workers else None,
            persistent_workers=False, prefetch_factor=4 if self.num_workers else None)
        yield from loader


def _ignore_stop_signals(worker_id: int) -> None:
    """SLURM signals every process of a job and Ctrl-C the whole process group: a loader worker
    that died of it would crash the trainer before it can checkpoint (see train/faults.py).
    Workers end when the trainer closes the loader, or when it is gone."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_data(cfg: TrainConfig, ctx: Dist, typed=()):
    """(source, autoencoder or None, channels, size): what the model sees and how to get it.

    The autoencoder is None when the model's inputs come straight from the source (pixels,
    or a latent cache without ``--vae``, which then trains without loading the VAE)."""
    from dits.vae import load_autoencoder

    if cfg.latents:
        from dits.data.latents import LatentCacheDataset

        ds = LatentCacheDataset(cfg.latents, flip=False, expect={"vae": cfg.vae} if cfg.vae else None)
        if "image_size" in typed and cfg.image_size != ds.image_size:
            raise UserError(f"--image-size {cfg.image_size}: the latent cache {cfg.latents} holds "
                            f"{ds.image_size}px images; drop the flag or extract a new cache")
        cfg.image_size = ds.image_size  # recorded in config.yaml: what the run really trained on
        vae = load_autoencoder(cfg.vae, scaling_factor=ds.scaling_factor, device=ctx.device) if cfg.vae else None
        c, h = ds.latent_shape[0], ds.latent_shape[-1]
        return DatasetSource(ds, ds.num_classes, cfg.num_workers, cfg.seed), vae, c, h
    from dits.data.builtin import builtin, get, is_builtin

    if is_builtin(cfg.data):
        entry = get(cfg.data)
        if cfg.vae:
            raise UserError(f"the built-in {cfg.data} train in pixel space; drop --vae")
        x, y = builtin(cfg.data, "train")  # never the held-out split: that is the held-out loss's
        return TensorSource(x, y, entry.num_classes), None, entry.channels, entry.image_size
    from dits.data.folder import ImageFolderDataset

    # a text run reads every image under the folder (their captions say what they are), a label run the classes
    ds = ImageFolderDataset(cfg.data, cfg.image_size, flip=False, captioned=cfg.text_encoder is not None)
    source = DatasetSource(ds, ds.num_classes, cfg.num_workers, cfg.seed)
    if not cfg.vae:
        return source, None, 3, cfg.image_size
    vae = load_autoencoder(cfg.vae, scaling_factor=cfg.vae_scale, device=ctx.device)
    if cfg.image_size % vae.downsample:
        raise UserError(f"image size {cfg.image_size} is not divisible by the VAE's downsampling {vae.downsample}")
    return source, vae, vae.latent_channels, cfg.image_size // vae.downsample
