"""Training DiT: one loop, read top to bottom.

    data batch -> (frozen VAE) -> x0 -> t, noise -> L_simple + L_vlb -> AdamW -> EMA

Runs on one CPU, one GPU, or many processes under ``torchrun`` (DDP; gloo on CPU, NCCL on
CUDA). All randomness of a step (which images, flips, t, noise, label dropout) is drawn
from a generator seeded by (seed, step) for the *global* batch, and each process takes its
slice. So a run is a pure function of its config: resuming after a kill continues the same
trajectory, and N processes compute the same step as one process on the global batch.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dits.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from dits.fileio import atomic_write, write_json_atomic, write_text_atomic
from dits.config import TrainConfig
from dits.errors import UserError
from dits.models import DiT, create_model

# Config keys that may change when resuming; anything else must match the checkpoint.
RESUMABLE_KEYS = {"steps", "log_every", "ckpt_every", "sample_every", "eval_samples", "num_workers", "device",
                  "out", "samples_per_class", "sample_steps", "sampler", "cfg_scale", "fsdp", "precision"}


# ---------------------------------------------------------------------------- processes
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when there is one; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but this PyTorch sees no CUDA GPU")
    if use_cuda:
        dev = torch.device(f"cuda:{local}" if world > 1 or device in ("auto", "cuda") else device)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: the paper's GPUs' default speed path
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, dev)


# ---------------------------------------------------------------------------- data
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
            persistent_workers=False, prefetch_factor=4 if self.num_workers else None)
        yield from loader


def build_data(cfg: TrainConfig, ctx: Dist):
    """(source, autoencoder or None, channels, size): what the model sees and how to get it.

    The autoencoder is None when the model's inputs come straight from the source (pixels,
    or a latent cache without ``--vae``, which then trains without loading the VAE)."""
    from dits.vae import load_autoencoder

    if cfg.latents:
        from dits.data.latents import LatentCacheDataset

        ds = LatentCacheDataset(cfg.latents, flip=False, expect={"vae": cfg.vae} if cfg.vae else None)
        vae = load_autoencoder(cfg.vae, scaling_factor=ds.scaling_factor, device=ctx.device) if cfg.vae else None
        c, h = ds.latent_shape[0], ds.latent_shape[-1]
        return DatasetSource(ds, ds.num_classes, cfg.num_workers, cfg.seed), vae, c, h
    if cfg.data == "digits":
        from dits.data.digits import IMAGE_SIZE, NUM_CLASSES, load_digits_tensors

        if cfg.vae:
            raise UserError("the built-in digits train in pixel space; drop --vae")
        x, y = load_digits_tensors()
        return TensorSource(x, y, NUM_CLASSES), None, 1, IMAGE_SIZE
    from dits.data.folder import ImageFolderDataset

    ds = ImageFolderDataset(cfg.data, cfg.image_size, flip=False)
    source = DatasetSource(ds, ds.num_classes, cfg.num_workers, cfg.seed)
    if not cfg.vae:
        return source, None, 3, cfg.image_size
    vae = load_autoencoder(cfg.vae, scaling_factor=cfg.vae_scale, device=ctx.device)
    if cfg.image_size % vae.downsample:
        raise UserError(f"image size {cfg.image_size} is not divisible by the VAE's downsampling {vae.downsample}")
    return source, vae, vae.latent_channels, cfg.image_size // vae.downsample


# ---------------------------------------------------------------------------- the loop
def lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1 + step) / (10 + step))
    return cfg.ema_decay


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_p = [p for p in ema.parameters() if p.dtype.is_floating_point]
    src_p = [p.detach() for p in model.parameters() if p.dtype.is_floating_point]
    torch._foreach_lerp_(ema_p, src_p, 1.0 - decay)


def build_model(cfg: TrainConfig, in_channels: int, input_size: int, num_classes: int) -> DiT:
    extra = {k: getattr(cfg, k) for k in ("depth", "hidden_size", "num_heads", "patch_size")}
    return create_model(cfg.model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                        learn_sigma=cfg.learn_sigma, class_dropout_prob=cfg.class_dropout_prob, block=cfg.block,
                        **extra)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> dict:
    """Train a DiT as ``cfg`` says; returns a summary dict (also written to the run dir)."""
    from dits.diffusion import create_diffusion

    cfg.validate()
    ctx = setup_distributed(cfg.device)
    out = Path(cfg.out)
    start, state = 0, None
    if resume:
        ckpt = latest_checkpoint(resume)
        if ckpt is None:
            raise UserError(f"nothing to resume in {resume}: no checkpoint under {Path(resume) / 'checkpoints'}")
        state = load_checkpoint(ckpt)
        cfg = _merge_resume(cfg, state.get("train_config") or {}, str(ckpt))
        out = Path(resume)
        cfg.out = str(out)
        start = int(state["step"])
    if cfg.batch_size % ctx.world:
        raise UserError(f"global batch {cfg.batch_size} is not divisible by {ctx.world} processes")
    local_b = cfg.batch_size // ctx.world

    source, vae, channels, size = build_data(cfg, ctx)
    # how to decode samples later (`dits sample`): the VAE given, or the one that made the cache
    vae_spec = cfg.vae or getattr(getattr(source, "dataset", None), "vae_spec", None)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process and every run
    model = build_model(cfg, channels, size, source.num_classes).to(ctx.device)
    if state is not None:
        model.load_state_dict(state["model"])
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if state is not None:
        ema.load_state_dict(state["ema"])
    net = model
    if cfg.fsdp:
        if ctx.world < 2:
            raise UserError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node=N (N >= 2)")
        shard(model)
        shard(ema)  # sharded the same way, so the EMA update is a local operation on each shard
    elif ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "fp16")
    if state is not None:
        load_optimizer_state(model, opt, state["opt"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    diffusion = create_diffusion("", noise_schedule=cfg.noise_schedule, learn_sigma=cfg.learn_sigma,
                                 diffusion_steps=cfg.diffusion_steps)
    rand = StepRandomness(cfg.seed, len(source), cfg.batch_size, cfg.flip)
    lo, hi = ctx.rank * local_b, (ctx.rank + 1) * local_b

    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", _yaml(cfg.to_dict()))
        _truncate_log(out / "metrics.jsonl", start)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"dits train: {cfg.model} ({n_params / 1e6:.2f}M params) on {cfg.latents or cfg.data}, "
              f"{len(source)} examples, {ctx.world} process(es) on {ctx.device}, batch {cfg.batch_size}, "
              f"steps {start}->{cfg.steps}, run dir {out}", flush=True)
    sample_every = cfg.sample_every or cfg.ckpt_every
    bar = _progress(ctx.main and progress, start, cfg.steps)
    logf = open(out / "metrics.jsonl", "a") if ctx.main else None
    acc, t_last, summary = _Acc(), time.time(), {}
    # Test hook: DITS_FAULT_AT_STEP=k kills this process (SIGKILL, like a crash or OOM-kill)
    # right after step k, to test that --resume continues the exact trajectory.
    fault_at = int(os.environ.get("DITS_FAULT_AT_STEP", "-1"))
    batches = iter(source.batches(rand, start, cfg.steps, lo, hi))
    model.train()
    try:
        for step in range(start, cfg.steps):
            # ---- the global batch's randomness, then this process's slice
            g = rand.generator(step)
            t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), generator=g)
            drop = torch.rand(cfg.batch_size, generator=g) < cfg.class_dropout_prob
            x, y = next(batches)
            torch.manual_seed((cfg.seed + 1) * 1_000_033 + step * ctx.world + ctx.rank)  # e.g. VAE sampling
            x = x.to(ctx.device, non_blocking=True)
            if vae is not None and not cfg.latents:
                x = vae.encode(x)
            noise = torch.randn((cfg.batch_size, *x.shape[1:]), generator=g)[lo:hi].to(ctx.device)
            kwargs = {}
            if source.num_classes > 0:
                kwargs = {"y": y.to(ctx.device), "force_drop_ids": drop[lo:hi].to(ctx.device)}
            # ---- loss, backward, step
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            with _autocast(cfg, ctx.device):
                losses = diffusion.training_losses(net, x, t[lo:hi].to(ctx.device), model_kwargs=kwargs, noise=noise)
            loss = losses["loss"].mean()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            scaler.step(opt)
            scaler.update()
            update_ema(ema, model, ema_decay_at(cfg, step))
            done = step + 1
            acc.add(losses, gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
            if bar is not None:
                bar.update(1)
            # ---- bookkeeping (rank 0 writes; every rank joins the collective parts)
            if done % cfg.log_every == 0 or done == cfg.steps:
                rec = acc.pop(ctx, done, lr_at(cfg, step), time.time() - t_last)
                t_last = time.time()
                if ctx.main:
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                ckpt = _state(cfg, done, model, ema, opt, scaler, vae_spec)  # collective under FSDP
                if ctx.main:
                    save_checkpoint(checkpoint_path(out, done), ckpt)
                    plot_losses(out / "metrics.jsonl", out / "loss.png")
                del ckpt
                ctx.barrier()
            if done % sample_every == 0 or done == cfg.steps:
                sampler_model = ema if not cfg.fsdp else _full_copy(ema, cfg, channels, size, source.num_classes, ctx)
                if ctx.main:
                    summary = preview(cfg, sampler_model, vae, out, done, source.num_classes, ctx.device, bar)
                ctx.barrier()
            if done == fault_at:
                import signal
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        if bar is not None:
            bar.close()
        if logf is not None:
            logf.close()
    if ctx.main:
        summary = {"steps": cfg.steps, "run_dir": str(out), **summary}
        write_json_atomic(out / "summary.json", summary)
    if ctx.world > 1:
        ctx.barrier()  # leave together: a process that tears down gloo while a peer still talks aborts
        dist.destroy_process_group()
    return summary


def shard(model: DiT) -> None:
    """FSDP (PyTorch's ``fully_shard``): each block is its own unit, so only one block's
    full weights exist at a time; the embedders and final layer form the root unit."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def _full_state(module) -> dict:
    """The full (unsharded) state dict on the CPU; a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, opt, state: dict) -> None:
    """Optimizer state saved keyed by parameter names, so DDP and FSDP runs resume each other."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def _full_copy(ema, cfg, channels, size, num_classes, ctx) -> DiT | None:
    """An unsharded copy of the (FSDP) EMA model for sampling on rank 0 (None elsewhere).
    Every process must call it: gathering the shards is a collective."""
    full = _full_state(ema)  # CPU-offloaded: only rank 0 receives the tensors
    if not ctx.main:
        return None
    copy_ = build_model(cfg, channels, size, num_classes)
    copy_.load_state_dict(full)
    return copy_.to(ctx.device).eval()


def _state(cfg, step, model, ema, opt, scaler, vae_spec) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opt_state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"format": "dits", "version": 1, "kind": "train", "step": step, "vae_spec": vae_spec,
            "model_config": model.config.to_dict(), "train_config": cfg.to_dict(),
            "model": _full_state(model), "ema": _full_state(ema), "opt": opt_state,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}


def _merge_resume(cfg: TrainConfig, saved: dict, where: str) -> TrainConfig:
    """The checkpoint's config wins, except for keys that may change on resume; a flag that
    contradicts the checkpoint (say another model size) is an error, not a silent override."""
    defaults = TrainConfig().to_dict()
    merged = dict(saved)
    for k, v in cfg.to_dict().items():
        if k in RESUMABLE_KEYS:
            if v != defaults.get(k):
                merged[k] = v
        elif k in saved and v != saved[k] and v != defaults.get(k):
            raise UserError(f"--resume: {k}={v!r} differs from the checkpoint's {saved[k]!r} ({where}); "
                            "drop the flag or start a new run")
    return TrainConfig.from_dict(merged, where=where).validate()


class _Acc:
    """Running means of the logged losses since the last log line.

    Sums stay on the device: reading a value back (``float``) would make the GPU wait on
    every step; it happens once per log line instead."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, losses: dict, gnorm):
        for k, v in {**losses, "grad_norm": gnorm}.items():
            v = v.detach().float().mean()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def pop(self, ctx: Dist, step: int, lr: float, seconds: float) -> dict:
        keys = sorted(self.sums)
        vals = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        if ctx.world > 1:  # average over processes so the log describes the global batch
            vals = vals.to(ctx.device)
            dist.all_reduce(vals)
            vals = vals / ctx.world
        vals = vals.cpu()
        rec = {"step": step, **{k: round(float(v), 6) for k, v in zip(keys, vals) if k != "grad_norm"},
               "grad_norm": round(float(vals[keys.index("grad_norm")]), 4), "lr": lr,
               "steps_per_s": round(self.count / max(seconds, 1e-9), 2)}
        self.__init__()
        return rec


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    write_text_atomic(path, "".join(k + "\n" for k in keep))


def _yaml(d: dict) -> str:
    import yaml
    return yaml.safe_dump(d, sort_keys=False)


# ---------------------------------------------------------------------------- outputs
def preview(cfg: TrainConfig, ema: DiT, vae, out: Path, step: int, num_classes: int, device, bar=None) -> dict:
    """Sample a grid (one row per class) with the EMA weights; on digits, score samples."""
    from dits.sample import generate, grid_labels, save_grid

    if cfg.latents and vae is None:
        return {}  # trained from a latent cache without --vae: nothing to decode previews with
    rows = num_classes if num_classes > 0 else 8
    per = cfg.samples_per_class
    labels = grid_labels(num_classes, per) if num_classes > 0 else None
    common = dict(sampler=cfg.sampler, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale if num_classes else 1.0,
                  vae=vae, device=device,
                  diffusion_steps=cfg.diffusion_steps, noise_schedule=cfg.noise_schedule)
    images, _ = generate(ema, rows * per, labels=labels, seed=cfg.seed, **common)
    save_grid(images, out / f"samples_{step:07d}.png", ncol=per)
    result = {"samples": str(out / f"samples_{step:07d}.png")}
    if cfg.data == "digits" and not cfg.latents and cfg.eval_samples > 0:
        from dits.evaluate.digits import digits_metric, format_digits_metric, svc_accuracy

        imgs, labs = generate(ema, cfg.eval_samples, seed=cfg.seed + 10_000, batch_size=500, **common)
        m = digits_metric(imgs, labs)
        m["svc_accuracy"] = svc_accuracy(imgs, labs) if num_classes else None
        m = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in m.items()}
        line = f"step {step}: {format_digits_metric(m)}"
        (bar.write if bar is not None else print)(line)
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **m}) + "\n")
        result["digits_metric"] = m
    return result


def plot_losses(metrics: Path, png: Path) -> None:
    """loss.png: the training loss (and its L_simple / L_vlb parts) against steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.exists() else []
    if not recs:
        return
    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, style in (("loss", "-"), ("mse", "--"), ("vb", ":")):
        if key in recs[0]:
            ax.plot(steps, [r[key] for r in recs], style, label={"loss": "loss", "mse": "L_simple (mse)",
                                                                "vb": "L_vlb (bits/dim)"}[key])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("training loss")
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
