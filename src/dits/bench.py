"""Speed benchmarks: the trainer's step and the sampler, timed as a user runs them, optionally
side by side with the official DiT code (facebookresearch/DiT, a copy kept outside the repo).

Compared runs are interleaved round by round in one process (so a busy machine slows all of
them alike) and summarised by medians; the table reports ms per step, images/s, achieved
TFLOP/s, MFU against a matmul peak measured in the same run, and peak memory.

Training FLOPs are 3x the forward (backward ~2x): 6 x forward MACs per image (dits.flops
counts MACs, the paper's convention). Sampling counts one forward per image per network
evaluation (2 images with classifier-free guidance).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dits.errors import UserError
from dits.flops import count_flops
from dits.models import create_model
from dits.speed import adamw, check_precision, compile_module, set_attention, setup_device, should_compile

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Setup:
    """What to time: a model shape, a batch, and how to run it."""
    model: str = "DiT"
    depth: int | None = 4
    hidden_size: int | None = 128
    num_heads: int | None = 4
    patch_size: int | None = 2
    input_size: int = 8
    in_channels: int = 1
    num_classes: int = 10
    batch: int = 64
    precision: str = "fp32"
    compile: str = "off"
    grad_checkpoint: bool = False
    device: str = "cpu"
    sampler: str = "ddpm"
    sample_steps: int = 250
    cfg_scale: float = 4.0
    seed: int = 0
    run_steps: int = 400_000  # the length of the run being mimicked: decides what --compile auto does
    grad_clip: float = 0.0    # the run's --grad-clip (0: the norm is only measured, for the log)

    def build(self):
        sizes = {} if self.model != "DiT" else dict(depth=self.depth, hidden_size=self.hidden_size,
                                                      num_heads=self.num_heads, patch_size=self.patch_size)
        torch.manual_seed(self.seed)
        return create_model(self.model, input_size=self.input_size, in_channels=self.in_channels,
                            num_classes=self.num_classes, **sizes).to(self.device)


@dataclass
class Timing:
    name: str
    seconds: list = field(default_factory=list)  # one entry per timed round, per unit of work
    peak_bytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


# ----------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5,
                clock: str = "wall") -> float:
    """FLOP/s of a large square matmul on ``device`` in ``dtype``: the roofline MFU is measured
    against (best of ``repeats``, as a peak should be). Both torch.mm and the kernel dits's own
    Linear layers run (dits.speed.linear: oneDNN for CPU fp32, ~2x MKL's mm on some CPUs) are
    timed, and the faster counts, so MFU never credits dits with beating the machine."""
    from dits.speed import linear

    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, now = float("inf"), CLOCKS[clock]
    with torch.no_grad():
        for mm in (lambda: a @ b, lambda: linear(a, b, None)):
            mm()
            _sync(device)
            for _ in range(repeats):
                t0 = now()
                mm()
                _sync(device)
                best = min(best, now() - t0)
    return 2 * n ** 3 / best


def _peak_memory(device: torch.device) -> int:
    """CUDA: max_memory_allocated; CPU: the process's resident high-water mark (bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


CLOCKS = {
    "wall": time.perf_counter,
    # CPU seconds of this process: on a shared machine (other jobs competing for the cores)
    # it counts the work done rather than the waiting. Meaningful with one thread
    # (OMP_NUM_THREADS=1); with more, it sums the threads' time.
    "cpu": time.process_time,
}


def interleave(contenders: dict[str, Callable[[], None]], rounds: int, per_round: int, warmup: int,
               device: torch.device, progress: bool = True, clock: str = "wall") -> list[Timing]:
    """Run each contender ``warmup`` times, then ``rounds`` rounds of ``per_round`` calls each,
    cycling through the contenders every round; seconds per call, one entry per round."""
    if clock not in CLOCKS or (clock == "cpu" and device.type != "cpu"):
        raise UserError(f"clock must be wall, or cpu for a CPU run, got {clock!r} on {device}")
    now = CLOCKS[clock]
    timings = {name: Timing(name) for name in contenders}
    for name, fn in contenders.items():
        for _ in range(warmup):
            fn()
        _sync(device)
    for r in range(rounds):
        for name, fn in contenders.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = now()
            for _ in range(per_round):
                fn()
            _sync(device)
            timings[name].seconds.append((now() - t0) / per_round)
            timings[name].peak_bytes = max(timings[name].peak_bytes, _peak_memory(device))
        if progress:
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {t.seconds[-1] * 1e3:.1f} ms"
                                                          for n, t in timings.items()), file=sys.stderr, flush=True)
    return list(timings.values())


# ----------------------------------------------------------------------------- dits
def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def _batch(s: Setup, device: torch.device, gen: torch.Generator):
    x = torch.randn(s.batch, s.in_channels, s.input_size, s.input_size, generator=gen).to(device)
    y = torch.randint(0, s.num_classes, (s.batch,), generator=gen).to(device)
    t = torch.randint(0, 1000, (s.batch,), generator=gen).to(device)
    return x, y, t


def dits_train_step(s: Setup) -> Callable[[], None]:
    """One step of ``dits train`` with its defaults (loop.py's body: loss under autocast,
    backward, AdamW from dits.speed, EMA lerp, loss accumulation on the device)."""
    from dits.diffusion import create_diffusion
    from dits.train.loop import clip_grads, update_ema
    from dits.train.outputs import LossAccumulator

    device = torch.device(s.device)
    check_precision(s.precision, device)
    setup_device(device)
    model = s.build()
    model.grad_checkpoint = s.grad_checkpoint
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    plan, why_not = should_compile(s.compile, device, s.run_steps, s.precision)
    if why_not:
        print(f"dits bench: {why_not}", file=sys.stderr)
    net = compile_module(model, plan) if plan else model
    opt = adamw(model.parameters(), 1e-4, 0.0, device)
    scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "fp16")
    diffusion = create_diffusion("")
    acc, gen = LossAccumulator(), torch.Generator().manual_seed(s.seed)
    model.train()

    def step():
        x, y, t = _batch(s, device, gen)
        noise = torch.randn(x.shape, generator=gen).to(device)
        drop = (torch.rand(s.batch, generator=gen) < 0.1).to(device)
        with _autocast(s.precision, device):
            losses = diffusion.training_losses(net, x, t, model_kwargs={"y": y, "force_drop_ids": drop}, noise=noise)
        opt.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"].mean()).backward()
        scaler.unscale_(opt)
        gnorm = clip_grads(model, s.grad_clip)
        scaler.step(opt)
        scaler.update()
        update_ema(ema, model, 0.9999)
        acc.add(losses, gnorm)
    return step, model


def dits_sample(s: Setup) -> Callable[[], None]:
    """``dits.sample.generate`` with ``dits sample``'s defaults (per-sample seeds, DDPM, CFG)."""
    from dits.sample import generate

    device = torch.device(s.device)
    setup_device(device)
    model = s.build().eval()

    def run():
        generate(model, s.batch, sampler=s.sampler, steps=s.sample_steps, cfg_scale=s.cfg_scale,
                 seed=s.seed, batch_size=s.batch, device=device)
    return run, model


# ----------------------------------------------------------------------------- official
@contextlib.contextmanager
def _official_imports(path: str, extra_paths: list[str]):
    """Import the official ``models`` and ``diffusion`` from ``path`` (plus ``extra_paths``
    for timm and the like), then take them off sys.path / sys.modules again."""
    root = Path(path)
    if not (root / "models.py").is_file() or not (root / "diffusion").is_dir():
        raise UserError(f"--official {path}: expected a facebookresearch/DiT checkout (models.py, diffusion/)")
    added = [str(root), *extra_paths]
    sys.path[:0] = added
    before = set(sys.modules)
    try:
        try:
            models = importlib.import_module("models")
            diffusion = importlib.import_module("diffusion")
        except ImportError as e:
            raise UserError(f"cannot import the official code from {path}: {e} (its models.py needs timm; add its "
                            "location with --official-path or DITS_BENCH_PATH)") from None
        yield models, diffusion
    finally:
        for p in added:
            sys.path.remove(p)
        for name in set(sys.modules) - before:
            if name in ("models", "diffusion") or name.startswith(("models.", "diffusion.")):
                del sys.modules[name]


def _official_model(models, s: Setup, like: torch.nn.Module, fused_attn: bool):
    cfg = like.config
    m = models.DiT(input_size=s.input_size, patch_size=cfg.patch_size, in_channels=s.in_channels,
                   hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                   class_dropout_prob=cfg.class_dropout_prob, num_classes=s.num_classes, learn_sigma=cfg.learn_sigma)
    m.load_state_dict(like.state_dict())  # the same weights (the layouts are identical)
    for blk in m.blocks:
        blk.attn.fused_attn = fused_attn  # timm's two attention paths: SDPA or explicit matmuls
    return m.to(s.device)


def official_train_steps(s: Setup, path: str, extra_paths: list[str], like) -> dict[str, Callable[[], None]]:
    """The loop body of the official train.py (AdamW lr 1e-4 wd 0, loss.item(), its
    update_ema), under the same autocast, for both of timm's attention paths."""
    device = torch.device(s.device)
    steps = {}
    with _official_imports(path, extra_paths) as (models, diffusion_mod):
        diffusion = diffusion_mod.create_diffusion(timestep_respacing="")
        for fused in (True, False):
            model = _official_model(models, s, like, fused)
            ema = copy.deepcopy(model).requires_grad_(False)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
            gen = torch.Generator().manual_seed(s.seed)
            model.train()

            def step(model=model, ema=ema, opt=opt, gen=gen):
                x, y, t = _batch(s, device, gen)
                with _autocast(s.precision, device):
                    loss_dict = diffusion.training_losses(model, x, t, dict(y=y))
                loss = loss_dict["loss"].mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                _official_update_ema(ema, model)
                loss.item()
            steps[f"official (timm {'sdpa' if fused else 'math'} attn)"] = step
    return steps


@torch.no_grad()
def _official_update_ema(ema, model, decay=0.9999):
    # What train.py's update_ema does (one mul_ and add_ per named parameter), restated.
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].mul_(decay).add_(p.data, alpha=1 - decay)


def official_samplers(s: Setup, path: str, extra_paths: list[str], like) -> dict[str, Callable[[], None]]:
    """sample.py's loop: x_T, CFG batch with null labels, forward_with_cfg, p_sample_loop."""
    device = torch.device(s.device)
    runs = {}
    if s.sampler != "ddpm":
        raise UserError("the official comparison times DDPM (p_sample_loop); use --sampler ddpm")
    with _official_imports(path, extra_paths) as (models, diffusion_mod):
        diffusion = diffusion_mod.create_diffusion(str(s.sample_steps))
        for fused in (True, False):
            model = _official_model(models, s, like, fused).eval()
            gen = torch.Generator().manual_seed(s.seed)

            @torch.no_grad()
            def run(model=model, gen=gen):
                z = torch.randn(s.batch, s.in_channels, s.input_size, s.input_size, generator=gen).to(device)
                y = torch.randint(0, s.num_classes, (s.batch,), generator=gen).to(device)
                z = torch.cat([z, z], 0)
                y = torch.cat([y, torch.full_like(y, s.num_classes)], 0)
                diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                        model_kwargs=dict(y=y, cfg_scale=s.cfg_scale), progress=False, device=device)
            runs[f"official (timm {'sdpa' if fused else 'math'} attn)"] = run
    return runs


# ----------------------------------------------------------------------------- report
def report(timings: list[Timing], s: Setup, work_flops: float, images: int, peak: float, unit: str,
           clock: str = "wall") -> str:
    """The table: per-call time, images/s, TFLOP/s, MFU, peak memory; then ratios to the best
    official contender (official = the faster of its attention paths, as the issue defines)."""
    rows = [f"{'':38s} {unit:>10s} {'img/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak mem':>9s}"]
    for t in timings:
        sec = t.median
        rows.append(f"{t.name:38s} {sec * 1e3:10.1f} {images / sec:9.2f} {work_flops / sec / 1e12:8.4f} "
                    f"{work_flops / sec / peak:6.1%} {t.peak_bytes / 2 ** 20:7.0f} MB")
    official = [t for t in timings if t.name.startswith("official")]
    mine = [t for t in timings if not t.name.startswith("official")]
    if official:
        best = min(official, key=lambda t: t.median)
        for t in mine:
            rows.append(f"speed-up of {t.name} over {best.name}: {best.median / t.median:.2f}x")
    memory = "max_memory_allocated" if s.device.startswith("cuda") else "process RSS high-water mark (all contenders)"
    rows.append(f"matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s ({s.precision} on {s.device}); {clock} "
                f"clock, {torch.get_num_threads()} thread(s); medians over rounds; peak memory: {memory}")
    return "\n".join(rows)


def _peak_for(s: Setup, clock: str) -> float:
    device = torch.device(s.device)
    dtype = DTYPES[s.precision] if s.precision != "fp16" or device.type == "cuda" else torch.float32
    return matmul_peak(device, dtype, clock=clock)


def bench_train(s: Setup, official: str | None = None, extra_paths=(), rounds: int = 5, per_round: int = 10,
                warmup: int = 3, attention: str = "auto", progress: bool = True, clock: str = "wall") -> str:
    """Time training steps; returns the printed table."""
    set_attention(attention)
    try:
        step, model = dits_train_step(s)
        contenders = {f"dits ({s.precision}, compile {s.compile})": step}
        if official:
            contenders.update(official_train_steps(s, official, list(extra_paths), model))
        peak = _peak_for(s, clock)
        timings = interleave(contenders, rounds, per_round, warmup, torch.device(s.device), progress, clock)
    finally:
        set_attention("auto")
    flops = 6 * count_flops(model) * s.batch
    return report(timings, s, flops, s.batch, peak, "ms/step", clock)


def bench_sample(s: Setup, official: str | None = None, extra_paths=(), rounds: int = 3, warmup: int = 1,
                 progress: bool = True, clock: str = "wall") -> str:
    """Time a whole sampling run of ``s.batch`` images; returns the printed table."""
    run, model = dits_sample(s)
    contenders = {f"dits generate ({s.sampler}, {s.sample_steps} steps)": run}
    if official:
        contenders.update(official_samplers(s, official, list(extra_paths), model))
    peak = _peak_for(s, clock)
    timings = interleave(contenders, rounds, 1, warmup, torch.device(s.device), progress, clock)
    per_image = (2 if s.cfg_scale != 1 else 1) * s.sample_steps
    flops = 2 * count_flops(model) * s.batch * per_image
    return report(timings, s, flops, s.batch, peak, "ms/batch", clock)
