"""Speed benchmarks: the trainer's step and the sampler, timed as a user runs them, optionally
side by side with the official DiT code (facebookresearch/DiT, a copy kept outside the repo).

Every contender runs in a process of its own (dits.bench.isolated): its model, allocator,
compiled graphs and thread pool are its own, and while one is timed the others wait idle. Rounds
alternate the contenders (the order rotates every round), the table reports medians over rounds.
(Interleaving them in one process flattered dits: the reference ran up to 1.3x slower right after
dits' compiled graph than timed alone. ``isolation="shared"`` still does that, for the check.)

The table reports ms per step, images/s, achieved TFLOP/s, MFU against a matmul peak measured
in the same run, and peak memory. Training FLOPs are 3x the forward (backward ~2x): 6 x forward
MACs per image (dits.flops counts MACs, the paper's convention). Sampling counts one forward per
image per network evaluation (2 images with classifier-free guidance).
"""
from __future__ import annotations

import contextlib
import os
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from dits.errors import UserError
from dits.flops import count_flops
from dits.models import create_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Setup:
    """What to time: a model shape, a batch, the run's recipe, and how to run it."""
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
    compile: str = "auto"
    plan: str = "auto"        # --plan: auto (what `dits train` would choose), a plan name
    grad_checkpoint: bool = False
    device: str = "cpu"
    sampler: str = "ddpm"
    sample_steps: int = 250
    cfg_scale: float = 4.0
    seed: int = 0
    run_steps: int = 400_000  # the length of the run being mimicked: decides what the plan is
    run_samples: int = 50_000 # ... and of a sampling run (FID's 50,000 samples), in samples
    grad_clip: float = 0.0    # the run's --grad-clip (0: the norm is only measured, for the log)
    lr: float = 1e-4
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = False

    def build(self):
        sizes = {} if self.model != "DiT" else dict(depth=self.depth, hidden_size=self.hidden_size,
                                                      num_heads=self.num_heads, patch_size=self.patch_size)
        torch.manual_seed(self.seed)
        return create_model(self.model, input_size=self.input_size, in_channels=self.in_channels,
                            num_classes=self.num_classes, **sizes).to(self.device)

    def train_config(self):
        """The TrainConfig of the run this setup mimics (what train_step reads from it)."""
        from dits.config import TrainConfig

        return TrainConfig(model=self.model, depth=self.depth, hidden_size=self.hidden_size, num_heads=self.num_heads,
                           patch_size=self.patch_size, batch_size=self.batch, precision=self.precision,
                           compile=self.compile, plan=self.plan, grad_checkpoint=self.grad_checkpoint,
                           grad_clip=self.grad_clip, steps=self.run_steps, lr=self.lr, warmup_steps=self.warmup_steps,
                           ema_decay=self.ema_decay, ema_warmup=self.ema_warmup, seed=self.seed, device=self.device)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Timing:
    name: str
    seconds: list = field(default_factory=list)  # one entry per timed round, per unit of work
    peak_bytes: int = 0
    first_s: float | None = None                 # the first call (a compiled plan's compile is in it)
    compiled: bool = False
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def compile_s(self) -> float | None:
        return max(self.first_s - self.median, 0.0) if self.compiled and self.first_s is not None else None


# ----------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {
    "wall": time.perf_counter,
    # CPU seconds of this process: on a shared machine (other jobs competing for the cores)
    # it counts the work done rather than the waiting. Meaningful with one thread
    # (OMP_NUM_THREADS=1); with more, it sums the threads' time.
    "cpu": time.process_time,
}


def check_clock(clock: str, device: torch.device) -> None:
    if clock not in CLOCKS or (clock == "cpu" and device.type != "cpu"):
        raise UserError(f"clock must be wall, or cpu for a CPU run, got {clock!r} on {device}")


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5,
                clock: str = "wall", which: str = "best") -> float:
    """FLOP/s of a large square matmul on ``device`` in ``dtype``: the roofline MFU is measured
    against (best of ``repeats``, as a peak should be). Both torch.mm and the kernel dits's own
    Linear layers run (dits.speed.linear: oneDNN for CPU fp32) are timed, and the faster counts
    (``which``: "mm" or "linear" for one of them), so MFU never credits dits with beating the machine."""
    from dits.speed import linear

    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, now = float("inf"), CLOCKS[clock]
    kernels = {"mm": lambda: a @ b, "linear": lambda: linear(a, b, None)}
    with torch.no_grad():
        for name, mm in kernels.items():
            if which not in ("best", name):
                continue
            mm()
            _sync(device)
            for _ in range(repeats):
                t0 = now()
                mm()
                _sync(device)
                best = min(best, now() - t0)
    return 2 * n ** 3 / best


def peak_memory(device: torch.device) -> int:
    """CUDA: max_memory_allocated; CPU: this process's resident high-water mark (bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def interleave(contenders: dict[str, Callable[[], None]], rounds: int, per_round: int, warmup: int,
               device: torch.device, progress: bool = True, clock: str = "wall") -> list[Timing]:
    """In this process: run each contender ``warmup`` times, then ``rounds`` rounds of
    ``per_round`` calls each, cycling through the contenders every round; seconds per call, one
    entry per round. (The isolation="shared" mode; dits.bench.isolated is the default.)"""
    check_clock(clock, device)
    now = CLOCKS[clock]
    timings = {name: Timing(name) for name in contenders}
    for name, fn in contenders.items():
        for i in range(warmup):
            t0 = now()
            fn()
            _sync(device)
            if i == 0:
                timings[name].first_s = now() - t0
    for r in range(rounds):
        for name, fn in contenders.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = now()
            for _ in range(per_round):
                fn()
            _sync(device)
            timings[name].seconds.append((now() - t0) / per_round)
            timings[name].peak_bytes = max(timings[name].peak_bytes, peak_memory(device))
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


def dits_train_step(s: Setup, say=None):
    """One step of ``dits train`` as it runs (dits.train.loop.train_step, through
    dits.bench.steps.TrainStepRunner) with the plan ``s.plan`` names, or with ``auto`` the plan
    `dits train` would choose for a run of ``s.run_steps`` (dits.plan: cache or probe). Fresh
    synthetic inputs every step. Returns (step function, model, dits.plan.Choice)."""
    from dits.bench.steps import TrainStepRunner
    from dits.objectives import create_objective
    from dits.plan import check_request, choose, plan_key, preserved_rng
    from dits.speed import check_precision, setup_device

    device = torch.device(s.device)
    check_precision(s.precision, device)
    check_request(s.plan, s.compile, device, s.precision)
    setup_device(device)
    model = s.build()
    model.grad_checkpoint = s.grad_checkpoint
    cfg = s.train_config()
    objective = create_objective(cfg.objective, noise_schedule=cfg.noise_schedule, learn_sigma=cfg.learn_sigma,
                                 diffusion_steps=cfg.diffusion_steps)
    gen = torch.Generator().manual_seed(s.seed)

    def inputs():
        x, y, _ = _batch(s, device, gen)
        t = objective.draw_t(s.batch, gen).to(device)
        noise = torch.randn(x.shape, generator=gen).to(device)
        drop = (torch.rand(s.batch, generator=gen) < cfg.class_dropout_prob).to(device)
        return x, t, {"y": y, "force_drop_ids": drop}, noise

    example = inputs()
    key = plan_key(device, model.config.to_dict(), s.batch, s.precision, objective=cfg.objective,
                   grad_checkpoint=s.grad_checkpoint)
    with preserved_rng(device):
        choice = choose(s.plan, compile_mode=s.compile, device=device, precision=s.precision, steps=s.run_steps,
                        key=key, make_step=lambda plan: TrainStepRunner(plan, model, cfg, objective, device,
                                                                        lambda: example))
    if say:
        say(f"dits bench: {choice.line}")
    runner = TrainStepRunner(choice.plan, model, cfg, objective, device, inputs, copy_model=False)
    return runner.run, model, choice


def dits_sample(s: Setup):
    """``dits.sample.generate`` with ``dits sample``'s defaults (per-sample seeds, DDPM, CFG) on one
    batch, with the plan ``s.plan`` names, or with ``auto`` the plan `dits sample` would choose for a
    run of ``s.run_samples`` samples in batches of ``s.batch`` (cache or probe, here at setup).
    Returns (function, model, dits.plan.Choice)."""
    from dits.sample import generate, sampling_plan
    from dits.speed import setup_device

    device = torch.device(s.device)
    setup_device(device)
    model = s.build().eval()
    choice = sampling_plan(model, s.run_samples, batch_size=s.batch, sampler=s.sampler, steps=s.sample_steps,
                           guided=s.cfg_scale != 1, device=device, plan=s.plan, compile=s.compile)

    def run():
        generate(model, s.batch, sampler=s.sampler, steps=s.sample_steps, cfg_scale=s.cfg_scale,
                 seed=s.seed, batch_size=s.batch, device=device, plan=choice.plan.name)
    return run, model, choice


# ----------------------------------------------------------------------------- report
def report(timings: list[Timing], s: Setup, work_flops: float, images: int, peak: float, unit: str,
           clock: str = "wall", how: str = "") -> str:
    """The table: per-call time, images/s, TFLOP/s, MFU, peak memory, compile time; then ratios
    to the best official contender (official = the faster of its attention paths, as the issue defines)."""
    w = min(max([38] + [len(t.name) for t in timings]), 64)
    rows = [f"{'':{w}s} {unit:>10s} {'img/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak mem':>9s} {'compile':>8s}"]
    for t in timings:
        sec = t.median
        comp = f"{t.compile_s:6.1f} s" if t.compile_s is not None else f"{'-':>8s}"
        rows.append(f"{t.name[:w]:{w}s} {sec * 1e3:10.1f} {images / sec:9.2f} {work_flops / sec / 1e12:8.4f} "
                    f"{work_flops / sec / peak:6.1%} {t.peak_bytes / 2 ** 20:7.0f} MB {comp}")
    official = [t for t in timings if t.name.startswith("official")]
    mine = [t for t in timings if not t.name.startswith("official")]
    if official:
        top = min(official, key=lambda t: t.median)
        for t in mine:
            rows.append(f"speed-up of {t.name[:w]} over {top.name}: {top.median / t.median:.2f}x{_per_round(t, top)}")
    for t in timings:
        if t.note:
            rows.append(f"{t.name}: {t.note}")
    memory = ("max_memory_allocated" if s.device.startswith("cuda")
              else "each process's RSS high-water mark" if how.startswith("each") else
              "process RSS high-water mark (all contenders)")
    kernels = f"{s.precision} on {s.device}"
    if s.precision != "fp32" and not s.device.startswith("cuda"):
        kernels += ": the faster of its kernels and fp32's"  # peak_for: widened GEMMs run at fp32's rate
    rows.append(f"matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s ({kernels}); {clock} "
                f"clock, {torch.get_num_threads()} thread(s); medians over rounds; peak memory: {memory}")
    if how:
        rows.append(how)
    return "\n".join(rows)


def _per_round(mine: Timing, theirs: Timing) -> str:
    """The ratio round by round (the two contenders ran minutes apart at most within a round):
    on a machine whose load drifts, the median of these moves less than the ratio of medians."""
    ratios = sorted(a / b for a, b in zip(theirs.seconds, mine.seconds))
    if len(ratios) < 2:
        return ""
    return (f" (round by round: median {statistics.median(ratios):.2f}x, "
            f"{ratios[0]:.2f}-{ratios[-1]:.2f}x over {len(ratios)} rounds)")


def peak_for(s: Setup, clock: str) -> float:
    """The matmul rate MFU is taken against. On a CPU, half-precision work may run on fp32 kernels:
    where the CPU has no half arithmetic dits' ``+widen`` GEMMs compute the bf16 product of the
    rounded operands at fp32's rate (against the bf16 kernel alone an AVX2-only Zen 3 read 250 %
    MFU), so the peak is fp32's there, and the faster of the two elsewhere."""
    from dits.speed import half_gemms_slow

    device = torch.device(s.device)
    if device.type == "cuda" or s.precision == "fp32":
        return matmul_peak(device, DTYPES[s.precision], clock=clock)
    fp32 = matmul_peak(device, torch.float32, clock=clock)
    half = DTYPES[s.precision]
    if s.precision == "fp16" or half_gemms_slow(half):
        # CPU fp16 (as before), or half GEMMs that lose to fp32 anyway: timing the native kernel at
        # 1024^3 would cost ~25 s on a Zen 3 (1 GFLOP/s) for a figure that cannot be the peak
        return fp32
    return max(fp32, matmul_peak(device, half, clock=clock))


def _loadavg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def _contender_specs(kind: str, s: Setup, official: str | None, extra_paths, attention: str, plans) -> dict:
    specs = {}
    base = {"kind": kind, "setup": s.to_dict(), "threads": torch.get_num_threads()}
    for plan in plans:
        specs[f"dits plan {plan}" if len(plans) > 1 else "dits"] = {**base, "who": "dits", "plan": plan,
                                                                     "attention": attention}
    if official:
        from dits.bench.official import check_layout
        check_layout(official)
        for fused in (True, False):
            specs[f"official (timm {'sdpa' if fused else 'math'} attn)"] = {
                **base, "who": "official", "official": official, "extra_paths": list(extra_paths), "fused": fused}
    return specs


def plan_names(plan: str) -> list[str]:
    """A forced --plan value as its plan names: one, or a comma-separated list of distinct plans
    (each its own contender: a same-run A/B); a bad name is one line (UserError)."""
    from dits.plan import Plan, check_plan_name

    names = [p.strip() for p in plan.split(",")]
    for name in names:
        check_plan_name(name)
    if len(names) > 1 and ("auto" in names or "all" in names
                           or len({Plan.parse(n).name for n in names}) < len(names)):
        raise UserError(f"--plan {plan}: a list names distinct plans (not auto or all)")
    return names


def _plans_for(s: Setup, plan: str, attention: str) -> list[str]:
    """The --plan values of the dits contender(s): one, a comma-separated list (each its own
    contender: a same-run A/B), or every candidate with --plan all."""
    from dits.plan import Plan, all_candidates, rules_plan

    device = torch.device(s.device)
    if plan == "all":
        return [p.name for p in all_candidates(device, s.precision, s.compile)]
    if attention != "auto":  # --attention: the plan the run would get, with this attention kernel
        if plan != "auto":
            raise UserError("--attention and --plan both choose the attention kernel; give one of them")
        base = rules_plan(device, s.precision, s.compile, s.run_steps)
        return [Plan(base.mode, base.gemm, attention).name]
    return plan_names(plan)


def _run(kind: str, s: Setup, official, extra_paths, rounds, per_round, warmup, attention, progress, clock,
         isolation, plan) -> tuple[list[Timing], torch.nn.Module, float, str]:
    from dits.bench import isolated

    device = torch.device(s.device)
    check_clock(clock, device)
    if kind == "sample" and official and s.sampler != "ddpm":
        raise UserError("the official comparison times DDPM (p_sample_loop); use --sampler ddpm")
    plans = _plans_for(s, plan, attention)
    specs = _contender_specs(kind, s, official, extra_paths, attention, plans)
    like = s.build()
    peak = peak_for(s, clock)  # before any contender starts (and again after them, below)
    load0 = _loadavg()
    if isolation == "shared":
        timings = isolated.run_shared(specs, rounds, per_round, warmup, device, progress, clock)
        how = "contenders interleaved in ONE process (isolation shared: the reference is slowed by dits' graphs)"
    else:
        timings = isolated.run_isolated(specs, rounds, per_round, warmup, progress, clock)
        how = "each contender timed alone in its own process, alternated round by round"
    load1 = _loadavg()
    # and again after: one burst of large matmuls can land on a busy moment; a peak measured low
    # would put MFU above 100 %. The higher of the two is the machine's.
    peak = max(peak, peak_for(s, clock))
    return timings, like, peak, f"{how}; load average {load0} -> {load1}"


def bench_train(s: Setup, official: str | None = None, extra_paths=(), rounds: int = 5, per_round: int = 10,
                warmup: int = 3, attention: str = "auto", progress: bool = True, clock: str = "wall",
                isolation: str = "process", plan: str | None = None) -> str:
    """Time training steps; returns the printed table."""
    timings, model, peak, how = _run("train", s, official, extra_paths, rounds, per_round, warmup, attention,
                                     progress, clock, isolation, plan or s.plan)
    flops = 6 * count_flops(model) * s.batch
    return report(timings, s, flops, s.batch, peak, "ms/step", clock, how)


def bench_sample(s: Setup, official: str | None = None, extra_paths=(), rounds: int = 3, warmup: int = 1,
                 progress: bool = True, clock: str = "wall", isolation: str = "process", plan: str = "auto") -> str:
    """Time sampling one batch of ``s.batch`` images with the plan a run of ``s.run_samples``
    samples gets (or ``plan``: a name, or "all"); returns the printed table."""
    timings, model, peak, how = _run("sample", s, official, extra_paths, rounds, 1, warmup, "auto", progress, clock,
                                     isolation, plan)
    per_image = (2 if s.cfg_scale != 1 else 1) * s.sample_steps
    flops = 2 * count_flops(model) * s.batch * per_image
    return report(timings, s, flops, s.batch, peak, "ms/batch", clock, how)


# ----------------------------------------------------------------------------- the machine
def torch_info(device: torch.device | str = "cpu", peaks: bool = True) -> list[str]:
    """What the figures depend on: the device model and ISA, torch and its BLAS / oneDNN builds,
    threads, and large-matmul peaks (GFLOP/s, best of 5) per kernel and dtype."""
    from dits.plan import device_name
    from dits.speed import onednn_available

    device = torch.device(device)
    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([^\s]+)", config)
    dnn = re.search(r"MKL-DNN v([^\s]+)", config) or re.search(r"oneDNN v([^\s]+)", config)
    cap = re.search(r"CPU capability usage: (\S+)", config)
    lines = [f"device: {device_name(device)}",
             f"torch {torch.__version__}; MKL {mkl.group(1) if mkl else 'absent'}; oneDNN "
             f"{dnn.group(1) if dnn else 'absent'} (linear kernel {'usable' if onednn_available() else 'absent'}); "
             f"ATen CPU capability {cap.group(1) if cap else '?'}; {torch.get_num_threads()} thread(s); "
             f"load average {_loadavg()}"]
    if device.type == "cpu":
        flags = ""
        with contextlib.suppress(OSError):
            flags = next((ln.split(":", 1)[1] for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
        isa = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16",
                           "amx_tile", "amx_bf16") if f in flags.split()]
        lines.append("ISA: " + (" ".join(isa) if isa else "unknown (no /proc/cpuinfo)"))
    if peaks:
        cells = []
        for dtype, which, label in ((torch.float32, "mm", "fp32 torch.mm"), (torch.float32, "linear", "fp32 dits linear"),
                                    (torch.bfloat16, "mm", "bf16 torch.mm")):
            if label.endswith("dits linear") and (device.type != "cpu" or not onednn_available()):
                continue
            try:
                cells.append(f"{label} {matmul_peak(device, dtype, which=which) / 1e9:.0f}")
            except RuntimeError as e:
                cells.append(f"{label} n/a ({str(e).splitlines()[0][:40]})")
        n = 8192 if device.type == "cuda" else 1024
        lines.append(f"matmul peaks ({n}x{n}, GFLOP/s): " + ", ".join(cells))
    return lines
