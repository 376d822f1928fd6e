"""The plan: how a run's training step executes, measured on the machine it runs on.

A plan is a set of fast-path choices. Each choice picks between implementations of the same
function (dits.speed), so a plan changes the speed of a step, never what it computes:

- mode: ``eager``, ``compile-blocks`` (each transformer block compiled; the blocks share one
  graph, so it compiles in seconds) or ``compile-model`` (the whole network as one graph);
- gemm, CPU only: in fp32 ``onednn`` (dits.speed's oneDNN linear; inside a compiled graph as one
  opaque op, forward and backward) or ``mkl`` (``F.linear``; compiled, inductor's own GEMM calls);
  in bf16/fp16 ``widen`` (fp32 GEMMs on half-rounded operands, the output rounded back: for CPUs
  without half arithmetic) or ``native`` (autocast's own half kernels);
- attention, CPU only: ``sdpa`` or ``math`` (two matmuls and a softmax).

A name joins them with "+" (``eager+onednn+sdpa``, ``compile-blocks+math``); a part left out
keeps dits.speed's rule for it.

With ``--plan auto`` (the default) and ``--compile auto``, :func:`choose` times the candidate
plans on the run's own model, batch, dtype and device, on copies of the model and optimiser and
the run's first batch (:func:`probe`): a few steps each, an eager candidate stopped as soon as it
cannot win, compile candidates held to a deadline (one budget for all of them, a quarter of the
run's estimated time) and then timed in full, the best two timed again
where they are close (:func:`second_look`). It picks the plan with the least total time *for this
run's length*, compile time included, and prints one line. The compile a run pays is the one after
the probe, with inductor's caches filled by it; where that decides between plans, the probe times
it too (``recompile_s``). The measurements are cached per
(device model, torch version, threads, model shape, batch, precision, ...) under
``dits.evaluate.cache.cache_dir()/plans``, so the next run with the same key decides without
measuring; a run of another length decides from the same measurements unless a candidate that was
cut short might win at the new length. ``--plan NAME`` forces a plan, ``--compile on`` compiles the
whole model, ``--compile off`` measures the eager plans only. Runs shorter than ``MIN_PROBE_STEPS``
and ``--fsdp`` runs are not measured: they take dits.speed's rules (``should_compile``).

Sampling (:func:`choose_for_sampling`, from dits.sample.generate) decides the same way for the model
calls of a sampling run, one call of the run's shape timed per step.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from dits.errors import UserError

MODES = ("eager", "compile-blocks", "compile-model")
FP32_GEMMS = ("onednn", "mkl")
HALF_GEMMS = ("widen", "native")
GEMMS = FP32_GEMMS + HALF_GEMMS
ATTENTIONS = ("sdpa", "math")
FORMAT = 9                 # of the cache entries; a change makes old entries invalid
                           # (2: a compiled +onednn plan runs oneDNN in the graph; in 1 it ran MKL there;
                           # 3: timed with freed CPU memory kept in the process, dits.speed.retain_host_memory,
                           # which speeds some plans far more than others;
                           # 4: the patch embedding's tokens made contiguous, which sped the whole-model
                           # compile of DiT-S/2 bf16 by ~4 % and left the per-block compile as it was;
                           # 5: a compiled plan that wins by its step but loses by its cold compile is
                           # compiled once more, warm, and the run is charged that, recompile_s;
                           # 6: half-precision plans widen their GEMMs to fp32 where this CPU's half
                           # GEMMs are slow, +widen / +native;
                           # 7: the oneDNN graph op's input gradient takes Wᵀ as a view, no copy;
                           # 8: a whole-model compile takes the objective's loss into the graph;
                           # 9: compiled candidates are timed in full, a step is the median of the
                           # faster half of the timed ones, and the second look ranks a compiled plan
                           # by its warm compile and charges the warm compile it times)

# The probe. Every candidate costs about WARMUP + TIMED steps (plus a compile); a run shorter than
# MIN_PROBE_STEPS would spend a noticeable share of itself measuring (4 eager candidates x ~10
# steps is 8 % of 500 steps), so it takes the rules instead.
MIN_PROBE_STEPS = 500
MIN_TIMED, MAX_TIMED = 3, 8      # timed steps per candidate (after warm-up)
CANDIDATE_SECONDS = 4.0          # stop timing a candidate after this much (MIN_TIMED steps at least)
NOISE_MARGIN = 0.03              # a candidate is stopped once its estimate is this much over the best
HOPELESS = 2.0                   # an eager candidate whose warm-up call alone is this many times the best
                                 # total is stopped there (a native bf16 DiT-S/2 step on an AVX2 CPU: ~40 s)
RECHECK_MARGIN = 0.25            # the runner-up within this much of the best in total: both timed again
                                 # (three to eight steps on a shared machine misjudge a plan by 10-25 %)
TIE_MARGIN = 0.05                # eager plans this close are a tie for the kernels of the compiled ones (graph_kernels)
SWITCH_MARGIN = 0.02             # another plan replaces the rules' plan only when this much faster in total
BUDGET_FRACTION = 0.25           # the compile candidates, all together, may use this share of the run's
BUDGET_MAX_S = 600.0             # estimated time, and never more than this
MIN_COMPILE_S = 1.0              # a compile candidate with less than this left of the budget is not started


# ----------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Plan:
    mode: str = "eager"
    gemm: str | None = None        # None: dits.speed's rule (oneDNN where it applies)
    attention: str | None = None   # None: dits.speed's rule (attention_impl)

    @property
    def name(self) -> str:
        return "+".join(p for p in (self.mode, self.gemm, self.attention) if p)

    @property
    def compile(self) -> str | None:
        """What dits.speed.compile_module compiles: None, "blocks" or "model"."""
        return {"eager": None, "compile-blocks": "blocks", "compile-model": "model"}[self.mode]

    @classmethod
    def parse(cls, name: str) -> "Plan":
        parts = [p for p in str(name).strip().lower().split("+") if p]
        mode = gemm = attention = None
        for p in parts:
            if p in MODES and mode is None:
                mode = p
            elif p in GEMMS and gemm is None:
                gemm = p
            elif p in ATTENTIONS and attention is None:
                attention = p
            else:
                raise UserError(f"unknown plan {name!r}: a plan is MODE[+GEMM][+ATTENTION] with MODE one of "
                                f"{', '.join(MODES)}, GEMM {' or '.join(FP32_GEMMS)} (fp32) or "
                                f"{' or '.join(HALF_GEMMS)} (bf16/fp16), ATTENTION {' or '.join(ATTENTIONS)} "
                                "(e.g. eager+onednn+sdpa), or auto")
        if not parts:
            raise UserError("--plan is empty; give auto or a plan name such as eager+onednn+sdpa")
        return cls(mode or "eager", gemm, attention)

    def scope(self):
        """The kernels this plan forces, as a context for one training step (dits.speed.forced)."""
        from dits.speed import forced
        return forced(self.attention or "auto", self.gemm or "auto")

    def wrap(self, net: torch.nn.Module, model: torch.nn.Module, quiet: bool = False) -> torch.nn.Module:
        from dits.speed import compile_module
        return compile_module(net, self.compile, model, quiet=quiet) if self.compile else net


def check_plan_name(name: str) -> None:
    """``--plan``'s value, checked before any work (TrainConfig.validate)."""
    if name not in ("auto",):
        Plan.parse(name)


def runnable(plan: Plan, device: torch.device, precision: str) -> str | None:
    """Why ``plan`` cannot run here, or None if it can."""
    from dits.speed import compiler_missing, onednn_available, onednn_in_graph

    if plan.compile:
        missing = compiler_missing(device)
        if missing:
            return f"{plan.mode} needs torch.compile, but {missing}"
    if plan.gemm and device.type != "cpu":
        return f"{plan.gemm} is a CPU GEMM backend (this run is on {device})"
    if plan.gemm in HALF_GEMMS and precision == "fp32":
        return f"+{plan.gemm} chooses half-precision GEMMs (this run is fp32; use +onednn or +mkl)"
    if plan.gemm == "onednn":
        if precision != "fp32":
            return f"oneDNN's linear runs fp32 only (this run is {precision}; drop +onednn)"
        if not onednn_available():
            return "this torch build has no oneDNN linear kernel (use +mkl)"
        if plan.compile and not onednn_in_graph():
            return f"oneDNN inside a compiled graph needs torch.library.custom_op (torch >= 2.4; this is {torch.__version__}); use +mkl"
    if plan.attention and device.type != "cpu":
        return f"the attention choice is a CPU one (on {device} attention is always SDPA)"
    return None


def rule_attention(device: torch.device, precision: str) -> str | None:
    """The attention kernel dits.speed's rule picks for a training step (None off the CPU)."""
    from dits.speed import attention_impl

    if device.type != "cpu":
        return None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return attention_impl("cpu", dtype, 1, True)


def rule_gemm(device: torch.device, precision: str) -> str | None:
    """fp32 on the CPU: oneDNN where it exists; bf16/fp16 on the CPU: ``widen`` where this CPU's
    half GEMMs are slow (dits.speed.half_gemms_slow; None, autocast's own kernels, elsewhere)."""
    from dits.speed import half_gemms_slow, onednn_available

    if device.type != "cpu":
        return None
    if precision != "fp32":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        return "widen" if half_gemms_slow(dtype) else None
    return "onednn" if onednn_available() else "mkl"


def rules_plan(device: torch.device, precision: str, compile_mode: str, steps: int) -> Plan:
    """What dits.speed's fixed rules (should_compile, attention_impl, the oneDNN rule) give. The
    rules' compiled plans keep inductor's own GEMMs (``+mkl``), as compiled runs always did: oneDNN
    inside the graph is a measured candidate (:func:`other_gemm`), not a rule."""
    from dits.speed import should_compile

    what, _ = should_compile(compile_mode, device, steps, precision)
    mode = {None: "eager", "blocks": "compile-blocks", "model": "compile-model"}[what]
    gemm = rule_gemm(device, precision)
    return Plan(mode, "mkl" if what and gemm == "onednn" else gemm, rule_attention(device, precision))


def eager_candidates(device: torch.device, precision: str) -> list[Plan]:
    """Every eager plan that can run here, the rules' one first."""
    from dits.speed import onednn_available

    g0, a0 = rule_gemm(device, precision), rule_attention(device, precision)
    if device.type != "cpu":
        gemms = [g0]
    elif precision != "fp32":  # the rule's half kernels, and the other ones
        gemms = [g0, "native" if g0 == "widen" else "widen"]
    else:
        gemms = [g0, *[g for g in FP32_GEMMS if g != g0 and (g != "onednn" or onednn_available())]]
    attns = [a0] if a0 is None else [a0, *[a for a in ATTENTIONS if a != a0]]
    return [Plan("eager", g, a) for g in gemms for a in attns]


def compile_candidates(device: torch.device, like: Plan) -> list[Plan]:
    """The compiled plans, with the kernels of ``like`` (the fastest eager plan): its attention
    kernel, and its GEMMs (oneDNN's as one op inside the graph, where this torch can)."""
    from dits.speed import compiler_missing, onednn_in_graph

    if compiler_missing(device):
        return []
    gemm = "mkl" if like.gemm == "onednn" and not onednn_in_graph() else like.gemm
    return [Plan(mode, gemm, like.attention) for mode in ("compile-blocks", "compile-model")]


def other_attention(plan: Plan) -> Plan | None:
    """``plan`` with the other CPU attention kernel (None where the plan has no attention choice)."""
    if plan.attention is None:
        return None
    return Plan(plan.mode, plan.gemm, next(a for a in ATTENTIONS if a != plan.attention))


def other_gemm(plan: Plan) -> Plan | None:
    """``plan`` with the other CPU fp32 GEMM backend (None where the plan has no GEMM choice, or the
    other one, oneDNN, cannot run in it). Half precision has none: widened or native, a graph calls
    the same GEMM kernel as eager code does, so the eager probe has settled it."""
    from dits.speed import onednn_available, onednn_in_graph

    if plan.gemm not in FP32_GEMMS:
        return None
    gemm = next(g for g in FP32_GEMMS if g != plan.gemm)
    if gemm == "onednn" and not (onednn_available() and (not plan.compile or onednn_in_graph())):
        return None
    return Plan(plan.mode, gemm, plan.attention)


def all_candidates(device: torch.device, precision: str, compile_mode: str = "auto") -> list[Plan]:
    """Every plan `dits bench --plan all` times: the eager ones, then the compiled ones (rules'
    kernels), then the compiled ones with the other attention kernel, then with the other GEMMs."""
    eager = eager_candidates(device, precision)
    if compile_mode == "off":
        return eager
    compiled = compile_candidates(device, eager[0])
    out = eager + compiled
    for other in (other_attention, other_gemm):
        out += [q for q in map(other, compiled) if q is not None and q not in out]
    return out


# ----------------------------------------------------------------------------- the cache key
def cpu_name() -> str:
    """The CPU model: vendor string, family/model/stepping and the vector ISA (Linux), else platform's."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                k, _, v = line.partition(":")
                info[k.strip()] = v.strip()
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in info:
        name += f" (family {info['cpu family']} model {info.get('model', '?')} stepping {info.get('stepping', '?')})"
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in info.get("flags", "").split()]
    if isa:
        name += " " + ",".join(isa)
    return f"{name}, {os.cpu_count()} CPUs"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm {major}{minor})"
    return cpu_name()


def torch_version() -> str:
    return torch.__version__


def plan_key(device: torch.device, model_config: dict, batch: int, precision: str, *, objective: str = "diffusion",
             grad_checkpoint: bool = False, world: int = 1) -> dict:
    """What a measured plan depends on. Two runs with the same key time the same plans alike."""
    return {"format": FORMAT, "device": device_name(device), "torch": torch_version(),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "model": {k: model_config[k] for k in sorted(model_config)}, "batch": int(batch), "precision": precision,
            "objective": objective, "grad_checkpoint": bool(grad_checkpoint), "world": int(world)}


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- measuring
@dataclass
class Measurement:
    """One candidate's timing. ``status``: "measured"; "stopped" (estimate only: it could not win
    the run it was probed for); "bound" (cut short while compiling: ``bound_s`` is a lower bound of
    its compile time, ``allowed_s`` what it was allowed); "failed" (``note`` says why).
    ``compile_s`` is a compiled plan's first compile (inductor's caches as the probe found them);
    ``recompile_s`` the same compile again in a fresh copy, the caches now warm: what the run pays
    after the probe (None: not timed, because it could not change the choice)."""
    plan: str
    status: str
    step_s: float | None = None
    compile_s: float = 0.0
    timed: int = 0
    bound_s: float = 0.0
    allowed_s: float = 0.0
    note: str = ""
    recompile_s: float | None = None

    @property
    def run_compile_s(self) -> float:
        """The compile a run pays after the probe."""
        return self.compile_s if self.recompile_s is None else self.recompile_s

    def total(self, steps: int) -> float | None:
        if self.status in ("measured", "stopped") and self.step_s is not None:
            return self.run_compile_s + steps * self.step_s
        return None


class ProbeDeadline(BaseException):
    """Raised inside a compile that ran past its deadline (a BaseException, so that no
    ``except Exception`` on the way swallows it)."""


@contextlib.contextmanager
def alarm(seconds: float | None):
    """Raise :class:`ProbeDeadline` in this thread after ``seconds`` (SIGALRM; main thread only,
    elsewhere or with None no deadline)."""
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    fired = []

    def ring(signum, frame):
        fired.append(True)
        raise ProbeDeadline()

    # The signal can land while Python runs a callback (e.g. a weakref finaliser inside torch.compile),
    # where the exception cannot propagate: Python would print it as "Exception ignored" and go on.
    # Keep that quiet, and raise the deadline once the block ends instead.
    old_hook = sys.unraisablehook

    def quiet(unraisable):
        if not isinstance(unraisable.exc_value, ProbeDeadline):
            old_hook(unraisable)

    old = signal.signal(signal.SIGALRM, ring)
    sys.unraisablehook = quiet
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        sys.unraisablehook = old_hook
    if fired:  # the alarm rang but was swallowed by a callback: the deadline still passed
        raise ProbeDeadline()


def steady(times: list[float]) -> float:
    """A candidate's step time from its timed steps: the median of the faster half. Noise on a shared
    machine and the first steps after a compile only ever add time: the digits' whole-model compile
    ran its first three timed steps at 52-57 ms and the rest at 43-46 (Zen 4, 24th session), so the
    median of three read it 18 % slow."""
    fast = sorted(times)[: max(1, (len(times) + 1) // 2)]
    return statistics.median(fast)


def measure(plan: Plan, make_step: Callable, steps: int, best_total: float | None = None,
            allowed_s: float | None = None, clock: Callable[[], float] = time.perf_counter,
            deadline=alarm) -> Measurement:
    """Time ``plan``: build its step (``make_step(plan)`` -> an object with ``run()``, ``close()``
    and ``failed()``), a warm-up call (with the compile for a compiled plan), then up to MAX_TIMED
    timed calls. An eager plan stops as soon as it cannot beat ``best_total`` for a run of ``steps``.
    A compiled plan whose steps beat ``best_total`` but whose first compile makes it lose is
    built and compiled once more (:func:`recompile`): the run after the probe pays that compile."""
    compiled = plan.compile is not None
    handle, start = None, clock()
    try:
        with deadline(allowed_s if compiled else None):
            handle = make_step(plan)
            t = clock()
            handle.run()
            first = clock() - t
            why = handle.failed()
            if why:
                return Measurement(plan.name, "failed", note=why)
            if compiled:
                handle.run()  # a second warm-up call: a compiled step's first backward may still compile
            elif best_total is not None and steps * first > best_total * HOPELESS:
                # a warm-up call runs slower than a steady step, never faster: this plan cannot win
                return Measurement(plan.name, "stopped", step_s=first, timed=1)
        times, status = [], "measured"
        t_begin = clock()
        while len(times) < MAX_TIMED:
            t = clock()
            handle.run()
            times.append(clock() - t)
            if len(times) < MIN_TIMED:
                continue
            # Only an eager plan is stopped on its steps: a compiled one has paid its compile, next to
            # which its remaining timed steps cost little (digits: 5 steps of 50 ms after a 22 s
            # compile), and three steps right after a compile misjudged the whole-model compile of the
            # digits by 18 % on a Zen 4 (docs/performance.md, 24th session).
            s = steady(times)
            if not compiled and best_total is not None and steps * s > best_total * (1 + NOISE_MARGIN):
                status = "stopped"
                break
            if clock() - t_begin > CANDIDATE_SECONDS:
                break
        s = steady(times)
        m = Measurement(plan.name, status, step_s=s, compile_s=max(first - s, 0.0) if compiled else 0.0,
                        timed=len(times))
    except ProbeDeadline:
        spent = clock() - start
        return Measurement(plan.name, "bound", bound_s=spent, allowed_s=allowed_s or spent,
                           note="compile cut short at its deadline")
    except Exception as e:  # noqa: BLE001 - out of memory, a kernel this build lacks, ...: not a candidate
        why = (str(e).strip().splitlines() or [""])[0][:160]
        return Measurement(plan.name, "failed", note=f"{type(e).__name__}: {why}")
    finally:
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.close()
    if compiled and best_total is not None and steps * m.step_s < best_total < m.total(steps):
        m.recompile_s = recompile(plan, make_step, m.step_s, allowed_s, clock, deadline)
    return m


def recompile(plan: Plan, make_step: Callable, step_s: float, allowed_s: float | None,
              clock: Callable[[], float], deadline) -> float | None:
    """The compile of ``plan`` in a fresh step, after a first one filled inductor's caches (dynamo
    traces again, inductor finds its graphs compiled): what a run pays once the probe has compiled.
    None if it fails or runs past ``allowed_s``."""
    handle = None
    try:
        with deadline(allowed_s):
            handle = make_step(plan)
            t = clock()
            handle.run()
            again = clock() - t
        return None if handle.failed() else max(again - step_s, 0.0)
    except (ProbeDeadline, Exception):  # noqa: BLE001 - the first compile's figure stands
        return None
    finally:
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.close()


def budget(steps: int, step_s: float) -> float:
    """How long the compile candidates may take to probe, all together, for a run of ``steps`` at ``step_s``."""
    return min(BUDGET_FRACTION * steps * step_s, BUDGET_MAX_S)


@dataclass
class CompileBudget:
    """What the compile candidates of one probe may still spend: one allowance for all of them. Each
    had had a budget of its own, so four cold compiles could cost the whole run's length again: the
    digits demo's 2,500 steps on a Zen 3 (~3 min) were preceded by a 153 s probe, four cold compiles of
    23-36 s (docs/performance.md, 25th session). A candidate is cut short where the allowance runs
    out, and one that finds less than MIN_COMPILE_S left is not started (both recorded as "bound")."""
    total: float
    left: float

    @classmethod
    def for_run(cls, steps: int, base: Measurement | None) -> "CompileBudget":
        seconds = budget(steps, base.step_s) if base and base.step_s else BUDGET_MAX_S
        return cls(seconds, seconds)


def best(ms: dict[str, Measurement], names, steps: int) -> tuple[str | None, float | None]:
    totals = {n: ms[n].total(steps) for n in names if n in ms and ms[n].total(steps) is not None}
    if not totals:
        return None, None
    n = min(totals, key=totals.get)
    return n, totals[n]


def graph_kernels(ms: dict[str, Measurement], eager: list[Plan]) -> Plan:
    """The eager plan whose kernels the compiled candidates start from: among the eager plans
    within TIE_MARGIN of the fastest, the one with most of the kernels the compiler plans itself
    (MKL's GEMMs, ``F.linear``; the math attention, whose scale and softmax inductor fuses), then
    the fastest. A tie in eager code says nothing of a graph: on a Zen 3, eager+onednn+sdpa
    96.6 ms, eager+mkl+math 100.3 ms, and compiled the MKL/math plans ran 72-83 ms against
    oneDNN/SDPA's 102-117 (docs/performance.md, 26th session). The rules' plan where none is timed."""
    timed = [(ms[p.name].step_s, p) for p in eager
             if p.name in ms and ms[p.name].status in ("measured", "stopped") and ms[p.name].step_s is not None]
    if not timed:
        return eager[0]
    fastest = min(t for t, _ in timed)
    tied = [(t, p) for t, p in timed if t <= fastest * (1 + TIE_MARGIN)]
    return min(tied, key=lambda tp: (-((tp[1].gemm == "mkl") + (tp[1].attention == "math")), tp[0]))[1]


def candidates_for(ms: dict[str, Measurement], eager: list[Plan], device, compile_ok: bool, steps: int,
                   has_blocks: bool = True) -> list[Plan]:
    """The eager plans, then (if compiling is allowed) the compiled ones, in three stages, each
    built on what ``ms`` has measured of the one before (so the list grows as the probe goes):

    1. the per-block compile (the cheapest compile: one block graph) with the eager kernels of
       :func:`graph_kernels` (the fastest eager plan's, or the compiler's own where eager is a
       tie), and with the other fp32 GEMM backend;
    2. the whole-model compile, with the GEMMs that won stage 1;
    3. the best compiled plan with the other attention kernel.

    Where the model has no transformer ``blocks`` (stage 1 is empty), the whole-model compile with
    the eager kernels is tried, then the best one with the other attention kernel and GEMMs."""
    plans = list(eager)
    if not compile_ok:
        return plans
    like = graph_kernels(ms, eager)
    compiled = [p for p in compile_candidates(device, like) if has_blocks or p.mode != "compile-blocks"]
    # The GEMMs inside a graph rank otherwise than in eager code: inductor plans around its own
    # (MKL) GEMM calls, a oneDNN linear stays one opaque op. On a Zen 3 eager oneDNN and MKL ran
    # within noise (96.6 against 100.3 ms) while compiled, MKL's per-block plan took ~83 ms and
    # oneDNN's 112.7; with the compiled candidates built on the eager winner's oneDNN and the MKL
    # variant tried last, the shared compile budget ran out first and the run took 0.83x the
    # official step (docs/performance.md, 26th session). So the GEMMs are settled on the cheapest
    # compile, before the whole model is compiled once with the winner's. On CPUs where oneDNN's
    # GEMMs are ~2x MKL's (Zen 5, AMX Xeon) both stages keep oneDNN.
    stage1 = [p for p in compiled if p.mode == "compile-blocks"]
    stage1 += [q for q in map(other_gemm, stage1) if q is not None and q not in compiled]
    plans += stage1
    if any(p.name not in ms for p in stage1):
        return plans  # stage 2 waits for stage 1's measurements
    g_name, _ = best(ms, [p.name for p in stage1], steps)
    gemm = next((p.gemm for p in stage1 if p.name == g_name), None)
    later = [p if gemm is None else Plan(p.mode, gemm, p.attention) for p in compiled if p.mode != "compile-blocks"]
    plans += later
    done = stage1 + later
    if any(p.name not in ms for p in later):
        return plans
    # Inside a compiled graph the attention kernels rank otherwise than in eager too: inductor fuses
    # the math attention's scale and softmax into the kernels around them, SDPA stays one opaque
    # call. DiT-S/2 bf16 on an AMX Xeon: eager sdpa/math within 2 %, compiled 813 vs 608 ms/step
    # (docs/performance.md). So the best compiled plan is also tried with the other kernel.
    top, _ = best(ms, [p.name for p in done], steps)
    if top:
        winner = next(p for p in done if p.name == top)
        others = [other_attention(winner)] + ([] if stage1 else [other_gemm(winner)])
        plans += [q for q in others if q is not None and q not in plans]
    return plans


def unsettled(ms: dict[str, Measurement], plans: list[Plan], steps: int) -> list[Plan]:
    """The candidates whose measurements cannot decide a run of ``steps``: never measured, or cut
    short while compiling with less time than this run would allow and a bound it might still beat."""
    default = plans[0].name
    if default not in ms or ms[default].total(steps) is None:
        return list(plans)
    _, top = best(ms, [p.name for p in plans], steps)
    allow = min(top, budget(steps, ms[default].step_s))
    out = []
    for p in plans:
        m = ms.get(p.name)
        if m is None or (m.status == "bound" and m.bound_s < top and m.allowed_s < allow * (1 - 1e-9)):
            out.append(p)
    return out


def probe(plans: list[Plan], make_step: Callable, steps: int, known: dict[str, Measurement] | None = None, *,
          clock: Callable[[], float] = time.perf_counter, deadline=alarm,
          account: CompileBudget | None = None) -> dict[str, Measurement]:
    """Measure the ``plans`` not in ``known``, in order (the first is the baseline: the rules'
    plan), each against the best total so far; returns ``known`` with the new measurements. The
    compile candidates draw on one ``account`` (:class:`CompileBudget`; by default this call's own,
    BUDGET_FRACTION of the run at the baseline's step)."""
    ms = dict(known or {})
    for p in plans:
        if p.name in ms:
            continue
        _, top = best(ms, [q.name for q in plans], steps)
        if not p.compile:
            ms[p.name] = measure(p, make_step, steps, top, None, clock, deadline)
            continue
        account = account or CompileBudget.for_run(steps, ms.get(plans[0].name))
        cap = top if top is not None else math.inf
        allowed = min(cap, account.total)  # what it is recorded as allowed: a longer run may allow it more
        if account.left < MIN_COMPILE_S:
            ms[p.name] = Measurement(p.name, "bound", allowed_s=allowed, note="the probe's compile budget was spent")
            continue
        t = clock()
        m = measure(p, make_step, steps, top, min(cap, account.left), clock, deadline)
        account.left -= clock() - t
        ms[p.name] = replace(m, allowed_s=allowed) if m.status == "bound" else m
    return ms


def charge_warm(ms: dict[str, Measurement], plans: list[Plan], make_step: Callable, steps: int, *,
                clock: Callable[[], float] = time.perf_counter, deadline=alarm) -> dict[str, Measurement]:
    """Charge a warm compile wherever a cold one alone makes a compiled candidate lose. :func:`measure`
    times the warm compile of a candidate that loses by its cold compile to the best *so far*; a
    candidate that was the best when measured (so charged cold) and is overtaken by a later one
    charged warm was never given the same. The probe's first compile filled inductor's caches for it
    too; it is compiled once more and charged that (Zen 3, digits fp32: compile-model+mkl 58.9 ms/step
    + 28 s cold lost to compile-model+onednn 65.3 ms + 0.9 s warm, which was 10 % slower for 4,000 steps)."""
    ms = dict(ms)
    names = [p.name for p in plans]
    whole = CompileBudget.for_run(steps, ms.get(names[0])).total
    for _ in range(len(plans)):
        changed = False
        for p in plans:
            m, (_, top) = ms.get(p.name), best(ms, names, steps)
            if (not p.compile or m is None or m.status != "measured" or m.recompile_s is not None
                    or top is None or not steps * m.step_s < top < m.total(steps)):
                continue
            allowed = min(top, whole)
            warm = recompile(p, make_step, m.step_s, allowed, clock, deadline)
            if warm is not None:
                ms[p.name], changed = replace(m, recompile_s=warm), True
        if not changed:
            break
    return ms


SIDE_BY_SIDE = "timed side by side with "  # the note of a stage-1 pair settled by side_by_side


def alternate(pair: list[Plan], make_step: Callable, clock: Callable[[], float] = time.perf_counter,
              deadline=alarm) -> dict[str, tuple[float, list[float]]] | None:
    """Build the plans of ``pair`` (both at once), two warm-up calls each, then time their steps
    alternated (A, B, A, B, ...; MIN_TIMED to MAX_TIMED each, about 2 x CANDIDATE_SECONDS): a drift of
    the machine's speed moves both alike. Returns {name: (first call's seconds, timed steps)}, or
    None where a build or a step fails (out of memory with two copies, ...)."""
    handles, first, times = [], {}, {p.name: [] for p in pair}
    try:
        with deadline(None):
            for p in pair:
                h = make_step(p)
                handles.append(h)
                t = clock()
                h.run()  # for a compiled plan, the compile again: warm, inductor's caches hold its graphs
                first[p.name] = clock() - t
                h.run()
                if h.failed():
                    return None
            t_begin = clock()
            while min(len(v) for v in times.values()) < MAX_TIMED:
                for p, h in zip(pair, handles):
                    t = clock()
                    h.run()
                    times[p.name].append(clock() - t)
                if min(len(v) for v in times.values()) >= MIN_TIMED and clock() - t_begin > 2 * CANDIDATE_SECONDS:
                    break
    except Exception:  # noqa: BLE001 - the figures measured before stand
        return None
    finally:
        for h in handles:
            with contextlib.suppress(Exception):
                h.close()
    return {n: (first[n], times[n]) for n in times}


def side_by_side(ms: dict[str, Measurement], pair: list[Plan], make_step: Callable, steps: int, *,
                 clock: Callable[[], float] = time.perf_counter, deadline=alarm) -> dict[str, Measurement]:
    """Time the two plans of ``pair`` again, alternated (:func:`alternate`), where both are measured
    and lie within RECHECK_MARGIN of each other in total, and take these figures for both. Timed
    one after the other, a few steps each, the two per-block compiles of the Zen 3's digits (26th
    session) read 87.5 ms (oneDNN) against 105.2 ms (MKL), where forty steps each put them at 104
    and 89: that machine's step time drifts by 15 % within a minute. Done once per pair: the note
    records it (and the cache keeps it)."""
    if len(pair) != 2 or any(ms.get(p.name) is None or ms[p.name].status != "measured" for p in pair):
        return ms
    a, b = (ms[p.name] for p in pair)
    if SIDE_BY_SIDE in a.note or a.total(steps) is None or b.total(steps) is None:
        return ms
    lo, hi = sorted((a.total(steps), b.total(steps)))
    if hi > lo * (1 + RECHECK_MARGIN):
        return ms
    runs = alternate(pair, make_step, clock, deadline)
    if runs is None:
        return ms
    ms = dict(ms)
    for p, other in zip(pair, reversed(pair)):
        m, (_, times) = ms[p.name], runs[p.name]
        ms[p.name] = replace(m, step_s=steady(times), timed=len(times),
                             note=(m.note + "; " if m.note else "") + SIDE_BY_SIDE + other.name)
    return ms


def stage1_pair(plans: list[Plan]) -> list[Plan]:
    """The first two per-block compiles of ``plans``: :func:`candidates_for`'s first stage (the two
    GEMM backends), or, where there is no GEMM choice (half precision), the per-block compile and its
    other-attention twin of stage 3."""
    return [p for p in plans if p.mode == "compile-blocks"][:2]


def second_look(ms: dict[str, Measurement], plans: list[Plan], make_step: Callable, steps: int, *,
                clock: Callable[[], float] = time.perf_counter, deadline=alarm) -> dict[str, Measurement]:
    """Time the best and the runner-up once more where they lie within RECHECK_MARGIN of each other,
    their steps alternated (:func:`alternate`), and take those figures for both. Three to eight
    steps per candidate, on a shared machine, misjudged one by 10-25 %: digits fp32 on a Zen 4,
    torch 2.15, compile-model+mkl+math timed at 64.2 ms against its sdpa variant's 59.8 ms, and
    1.46x against 1.17x the official step side by side minutes later (docs/performance.md, 22nd
    session). Each had kept its faster estimate of two timings one after the other, until the
    Zen 3's eager plan, read at 80.3 ms in a fast moment (it runs ~100-104), kept that figure and
    beat the whole-model compile (~83 ms) for the run (26th session).

    The two are ranked as the run after the probe would pay them: a compiled plan by its warm
    compile, where the probe found none by its steps alone (its first compile filled inductor's
    caches; charged cold, the whole-model compile of the digits, 22 s, could never come within the
    margin of a per-block compile charged 0.1 s warm). Timing it again compiles it again, warm: that
    compile is what it is charged from then on (``recompile_s``)."""
    names = [p.name for p in plans]

    def hopeful(m: Measurement) -> float | None:
        if m.total(steps) is None or m.timed < MIN_TIMED:
            return None
        return steps * m.step_s + (m.recompile_s or 0.0)  # eager: none; compiled: warm, where known

    hopes = {n: hopeful(ms[n]) for n in names if n in ms}
    ranked = sorted((h, n) for n, h in hopes.items() if h is not None)
    if len(ranked) < 2 or ranked[1][0] > ranked[0][0] * (1 + RECHECK_MARGIN):
        return ms
    pair = [next(p for p in plans if p.name == n) for _, n in ranked[:2]]
    runs = alternate(pair, make_step, clock, deadline)
    if runs is None:
        return ms
    ms = dict(ms)
    for plan in pair:
        m, (first, times) = ms[plan.name], runs[plan.name]
        step = steady(times)
        warm = m.recompile_s
        if plan.compile:
            again = max(first - step, 0.0)
            warm = again if warm is None else min(warm, again)
        ms[plan.name] = replace(m, status="measured", step_s=step, timed=max(m.timed, len(times)), recompile_s=warm)
    return ms


def decide(ms: dict[str, Measurement], plans: list[Plan], steps: int) -> Plan:
    """The plan with the least total time for ``steps`` (compile included); the first plan (the
    rules') unless another is SWITCH_MARGIN faster."""
    names = [p.name for p in plans]
    name, top = best(ms, names, steps)
    if name is None:
        return plans[0]
    base = ms[names[0]].total(steps) if names[0] in ms else None
    if base is not None and top > base * (1 - SWITCH_MARGIN):
        name = names[0]
    return next(p for p in plans if p.name == name)


def compile_cost(m: Measurement) -> str:
    """``6 s``, or with a warm recompile timed ``0.8 s (15 s cold)``."""
    if m.recompile_s is None:
        return f"{m.compile_s:.0f} s"
    return f"{m.recompile_s:.1f} s ({m.compile_s:.0f} s cold)"


def describe(chosen: Plan, ms: dict[str, Measurement], plans: list[Plan], steps: int, unit: str = "step") -> str:
    """``plan eager+onednn+sdpa, 30.1 ms/step; compile-blocks+sdpa would be 33.0 ms + 6.4 s, ...``"""
    m = ms.get(chosen.name)
    head = f"plan {chosen.name}"
    if m and m.step_s is not None:
        head += f", {m.step_s * 1e3:.1f} ms/{unit}" + (f" + {compile_cost(m)} compile" if chosen.compile else "")
    others = []
    for mode in MODES:
        rivals = [p for p in plans if p.mode == mode and p != chosen and p.name in ms]
        if not rivals:
            continue
        measured = [p for p in rivals if ms[p.name].total(steps) is not None]
        if measured:
            p = min(measured, key=lambda q: ms[q.name].total(steps))
            r = ms[p.name]
            others.append(f"{p.name} would be {r.step_s * 1e3:.1f} ms" + (f" + {compile_cost(r)}" if p.compile else ""))
        elif mode != "eager":
            r = max((ms[p.name] for p in rivals), key=lambda r: r.bound_s)
            others.append(f"{r.plan} " + (f"failed ({r.note})" if r.status == "failed"
                                          else f"> {r.bound_s:.0f} s to compile" if r.bound_s > 0
                                          else "not compiled (the probe's compile budget was spent)"))
    return head + ("; " + ", ".join(others) if others else "") + f" (for {steps:,} {unit}s)"


# ----------------------------------------------------------------------------- the cache
def cache_file(digest: str):
    from dits.evaluate.cache import cache_dir
    return cache_dir() / "plans" / f"{digest}.json"


def load_cached(key: dict) -> dict[str, Measurement]:
    """The cached measurements for ``key`` ({} if none, unreadable, or made for another key)."""
    path = cache_file(key_digest(key))
    try:
        entry = json.loads(path.read_text())
        if entry.get("key") != json.loads(json.dumps(key, default=str)):
            return {}
        return {n: Measurement(**m) for n, m in entry.get("plans", {}).items()}
    except (OSError, ValueError, TypeError):
        return {}


def save_cached(key: dict, ms: dict[str, Measurement], probe_s: float, steps: int, warn=None) -> bool:
    """Write the measurements for ``key``; an unwritable cache is one warning line, nothing else."""
    from dits.fileio import write_json_atomic

    path = cache_file(key_digest(key))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    entry = {"key": json.loads(json.dumps(key, default=str)), "plans": {n: asdict(m) for n, m in ms.items()},
             "probed": {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(probe_s, 2), "run_steps": steps,
                        "loadavg": [round(x, 2) for x in load] if load else None}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, entry)
        return True
    except OSError as e:
        (warn or _stderr)(f"plan cache {path.parent} is not writable ({e.strerror or e}); running without caching")
        return False


def forget_warm_compiles_without_caches(ms: dict[str, Measurement]) -> dict[str, Measurement]:
    """Cached warm recompiles hold only while inductor's on-disk cache does (it lives under /tmp by
    default, the plan cache under the user's cache dir); without it a run pays the first compile."""
    if not any(m.recompile_s is not None for m in ms.values()) or inductor_cache_present():
        return ms
    return {n: replace(m, recompile_s=None) for n, m in ms.items()}


def inductor_cache_present() -> bool:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        return os.path.isdir(cache_dir()) and any(os.scandir(cache_dir()))
    except Exception:  # noqa: BLE001 - another torch's layout: assume the worst, a cold compile
        return False


def _stderr(msg: str) -> None:
    print(f"dits: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the decision
@dataclass
class Choice:
    plan: Plan
    line: str                         # the one line the run prints
    key: dict | None = None
    measurements: dict = field(default_factory=dict)
    probed: bool = False              # whether anything was timed for this run
    by_rules: bool = False            # taken from the fixed rules (nothing measured or cached decided it)

    def record(self) -> dict:
        """What a checkpoint keeps, so that a resume on the same machine keeps the plan."""
        return {"name": self.plan.name, "key": key_digest(self.key) if self.key else None}


def choose(request: str, *, compile_mode: str, device: torch.device, precision: str, steps: int, key: dict,
           make_step: Callable, resumed: dict | None = None, measurable: bool = True, why_not: str = "",
           has_blocks: bool = True, warn=None, clock: Callable[[], float] = time.perf_counter,
           deadline=alarm, unit: str = "step", rules: Plan | None = None) -> Choice:
    """The plan for a run of ``steps`` more steps (see the module docstring).

    ``request``: ``--plan`` (auto or a name); ``compile_mode``: ``--compile``; ``resumed``: the
    plan record of the checkpoint a resume starts from; ``measurable`` False (with ``why_not``)
    takes the rules without measuring (e.g. under FSDP); ``unit``: what one step is, for the line;
    ``rules``: the plan taken where nothing is measured (default :func:`rules_plan`, the training rules)."""
    def bad(msg):
        return UserError(f"--plan {request}: {msg}")

    if request != "auto":
        plan = Plan.parse(request)
        if compile_mode == "off" and plan.compile:
            raise bad("contradicts --compile off")
        if compile_mode == "on" and plan.mode != "compile-model":
            raise bad("contradicts --compile on (which compiles the whole model)")
        why = runnable(plan, device, precision)
        if not why and plan.mode == "compile-blocks" and not has_blocks:
            why = "this model has no transformer blocks to compile one by one (use compile-model)"
        if why:
            raise bad(why)
        return Choice(plan, f"plan {plan.name} (--plan)", key)

    def the_rules(mode):
        return rules or rules_plan(device, precision, mode, steps)

    if compile_mode == "on":
        plan = the_rules("on")
        return Choice(plan, f"plan {plan.name} (--compile on)", key)
    if resumed and resumed.get("key") == key_digest(key):
        try:
            plan = Plan.parse(resumed.get("name", ""))
        except UserError:
            plan = None
        if plan is not None and runnable(plan, device, precision) is None and (compile_mode == "auto" or not plan.compile):
            return Choice(plan, f"plan {plan.name} (kept from the run: same machine, torch and shape)", key)
    if not measurable or steps < MIN_PROBE_STEPS:
        plan = the_rules(compile_mode)
        if plan.mode == "compile-blocks" and not has_blocks:
            plan = Plan("compile-model", plan.gemm, plan.attention)
        why = (why_not if not measurable else "") or f"a run of {steps:,} {unit}s is too short to measure (< {MIN_PROBE_STEPS})"
        return Choice(plan, f"plan {plan.name} (the rules: {why})", key, by_rules=True)
    eager = eager_candidates(device, precision)
    compile_ok = compile_mode == "auto"
    ms = forget_warm_compiles_without_caches(load_cached(key))
    plans = candidates_for(ms, eager, device, compile_ok, steps, has_blocks)
    todo = unsettled(ms, plans, steps)
    probed, t0 = False, clock()
    if todo:
        def drop(names):
            return {k: v for k, v in ms.items() if k not in {p.name for p in names}}
        ms = probe(eager, make_step, steps, drop(todo), clock=clock, deadline=deadline)      # the eager plans
        account = CompileBudget.for_run(steps, ms.get(eager[0].name))  # one budget for all compiles
        for _ in range(4):  # the compiled stages of candidates_for, each on the measurements of the last
            plans = candidates_for(ms, eager, device, compile_ok, steps, has_blocks)
            todo = unsettled(ms, plans, steps)
            if not todo:
                break
            ms = probe(plans, make_step, steps, drop(todo), clock=clock, deadline=deadline, account=account)
            ms = side_by_side(ms, stage1_pair(plans), make_step, steps, clock=clock, deadline=deadline)
        ms = charge_warm(ms, plans, make_step, steps, clock=clock, deadline=deadline)
        ms = second_look(ms, plans, make_step, steps, clock=clock, deadline=deadline)
        probed = True
        if ms.get(eager[0].name) is None or ms[eager[0].name].total(steps) is None:
            plan = the_rules(compile_mode)
            note = ms.get(eager[0].name).note if ms.get(eager[0].name) else "no measurement"
            return Choice(plan, f"plan {plan.name} (the rules: the probe failed: {note})", key, ms, True, by_rules=True)
        spent = clock() - t0
        saved = save_cached(key, ms, spent, steps, warn)
        source = f"measured in {spent:.0f} s" + (", cached" if saved else "")
    else:
        source = "from the plan cache"
    chosen = decide(ms, plans, steps)
    return Choice(chosen, f"{describe(chosen, ms, plans, steps, unit)}; {source}", key, ms, probed)


def check_request(request: str, compile_mode: str, device: torch.device, precision: str,
                  has_blocks: bool = True) -> None:
    """A forced ``--plan`` (or ``--compile on``) this machine cannot run: one line, before any work."""
    from dits.speed import compiler_missing

    if request == "auto":
        if compile_mode == "on" and compiler_missing(device):
            raise UserError(f"--compile on: {compiler_missing(device)}; use --compile off (or auto)")
        return
    choose(request, compile_mode=compile_mode, device=device, precision=precision, steps=0, key={},
           make_step=None, has_blocks=has_blocks)


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """The probe leaves the global random state as it found it (the run's trajectory is untouched)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def choose_for_run(cfg, model: torch.nn.Module, ctx, steps: int, example: tuple, objective,
                   resumed: dict | None = None) -> Choice:
    """The plan of a `dits train` run: :func:`choose` with the trainer's own step
    (dits.bench.steps.TrainStepRunner: loop.train_step on copies of the model, EMA and optimiser,
    with the run's first batch ``example`` = (x, t, model_kwargs, noise)). Under torchrun, rank 0
    decides and the others take its plan."""
    from dits.bench.steps import TrainStepRunner

    shape = model.config.to_dict()
    if "mask_keep" in example[2]:  # a masked run (--mask-ratio) times its masked step: another key
        shape["mask_keep_tokens"] = int(example[2]["mask_keep"].shape[1])
    key = plan_key(ctx.device, shape, example[0].shape[0], cfg.precision,
                   objective=cfg.objective, grad_checkpoint=cfg.grad_checkpoint, world=ctx.world)

    def make_step(plan):
        return TrainStepRunner(plan, model, cfg, objective, ctx.device, lambda: example, copy_model=True)

    with preserved_rng(ctx.device):
        choice = choose(cfg.plan, compile_mode=cfg.compile, device=ctx.device, precision=cfg.precision, steps=steps,
                        key=key, make_step=make_step, resumed=resumed,
                        measurable=not cfg.fsdp and ctx.main, has_blocks=hasattr(model, "blocks"),
                        why_not="not measured under --fsdp" if cfg.fsdp else "rank 0 measures")
    if ctx.world > 1:
        import torch.distributed as dist

        msg = [choice.plan.name, choice.line]
        dist.broadcast_object_list(msg, src=0)
        if not ctx.main:
            choice = Choice(Plan.parse(msg[0]), msg[1], key)
    return choice


def choose_for_sampling(model: torch.nn.Module, x_shape: tuple, calls: int, device: torch.device,
                        request: str = "auto", compile_mode: str = "auto", measurable: bool = True,
                        why_not: str = "") -> Choice:
    """The plan of a sampling run of ``calls`` model calls on batches of ``x_shape`` (the guided
    call's doubled batch): :func:`choose` timing one model call (dits.bench.steps.SampleCallRunner)
    per step, on the same candidates and cache as training (keyed by objective "sample"). Runs of
    fewer than MIN_PROBE_STEPS calls take the rules: eager, with dits.speed's kernels chosen per call
    (its inference rules: math attention on short sequences), as before plans existed."""
    from dits.bench.steps import SampleCallRunner

    shape = model.config.to_dict() if hasattr(model, "config") else {
        "class": type(model).__name__, "params": sum(p.numel() for p in model.parameters())}
    key = plan_key(device, shape, x_shape[0], "fp32", objective="sample")

    def make_step(plan):
        return SampleCallRunner(plan, model, x_shape, device)

    with preserved_rng(device):
        return choose(request, compile_mode=compile_mode, device=device, precision="fp32", steps=calls, key=key,
                      make_step=make_step, measurable=measurable, why_not=why_not,
                      has_blocks=hasattr(model, "blocks"), unit="call",
                      rules=Plan("compile-model" if compile_mode == "on" else "eager"))
