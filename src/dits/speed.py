"""Speed choices that depend on device, dtype and shape: the one place that decides them.

The model asks it which attention kernel to run; the trainer asks it for the optimiser and the
CUDA math modes. Which kernels and which compile a run uses is its plan, measured on the machine
by dits.plan; the fixed rules here (attention_impl, the oneDNN rule, should_compile) are the
plan's starting point and what runs where nothing is measured (short runs, FSDP). Every choice here picks between implementations
of *the same function* (tests hold each fast path to the eager reference), so a choice can
only change speed, never the model. The rules are measurements, not guesses; the numbers
behind them are in docs/performance.md.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import shutil
import sys

import torch
import torch.nn.functional as F

from dits.errors import UserError

COMPILE_MODES = ("auto", "on", "off")
ATTENTION_IMPLS = ("auto", "sdpa", "math")
GEMM_BACKENDS = ("auto", "onednn", "mkl", "widen", "native")

# Forced attention kernel for tests, benchmarks and a run's plan ("auto" = the rules in attention_impl).
_forced_attention = "auto"
# Forced GEMM backend of `linear` ("auto": oneDNN in eager code, the compiler's own GEMMs inside
# torch.compile; "onednn": oneDNN there too, through the graph op; "mkl": always F.linear) and, in
# CPU half precision (autocast), of `linear` and the attention matmuls ("auto": widen where this
# CPU's half GEMMs are slow, half_gemms_slow; "widen": always; "native": autocast's own kernels).
_forced_gemm = "auto"
_graph_op = None  # dits::onednn_linear_v3 once registered (_onednn_graph_op), by set_gemm("onednn")


# ----------------------------------------------------------------------------- attention
def set_attention(impl: str) -> None:
    """Force an attention kernel everywhere ("sdpa", "math") or restore the rules ("auto")."""
    global _forced_attention
    if impl not in ATTENTION_IMPLS:
        raise UserError(f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
    _forced_attention = impl


def set_gemm(backend: str) -> None:
    """Force the GEMM backend of :func:`linear`: "mkl" (F.linear, MKL on x86 builds), "onednn"
    (oneDNN's kernel wherever it applies: CPU fp32 outside autocast, compiled graphs included) or
    "auto" (oneDNN in eager code; inside torch.compile the compiler's own GEMM calls)."""
    global _forced_gemm, _graph_op
    if backend not in GEMM_BACKENDS:
        raise UserError(f"gemm backend must be one of {', '.join(GEMM_BACKENDS)}, got {backend!r}")
    _forced_gemm = backend
    if backend == "onednn" and _graph_op is None and _onednn_linear_ok():
        _graph_op = _onednn_graph_op()  # registered here, outside any compiled code


@contextlib.contextmanager
def forced(attention: str = "auto", gemm: str = "auto"):
    """Within the block, :func:`attention` and :func:`linear` use these kernels (a run's plan, see
    dits.plan); the previous choices come back afterwards. Same functions, other kernels."""
    old = (_forced_attention, _forced_gemm)
    set_attention(attention)
    set_gemm(gemm)
    try:
        yield
    finally:
        set_attention(old[0])
        set_gemm(old[1])


def attention_impl(device_type: str, dtype: torch.dtype, seq_len: int, grad: bool) -> str:
    """"sdpa" (``F.scaled_dot_product_attention``) or "math" (two matmuls and a softmax).

    - CUDA: SDPA, which dispatches to flash / memory-efficient kernels.
    - CPU, bf16/fp16: math. CPU SDPA's half-precision flash backward is 6-18x slower than
      the explicit matmuls at DiT's shapes, and its forward ~2x (docs/performance.md).
    - CPU, fp32: SDPA when gradients flow (its fused backward wins, ~1.5-2x at 16 tokens);
      math for inference on short sequences (<= 64 tokens, ~1.1-1.25x), where SDPA's per-call
      setup dominates; SDPA again on long sequences (its blocked kernel wins at 256 tokens).
    """
    if device_type != "cpu":
        return "sdpa"
    if dtype in (torch.bfloat16, torch.float16):
        return "math"
    return "sdpa" if grad or seq_len > 64 else "math"


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v with explicit matmuls: the reference definition of attention."""
    scores = matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    return matmul(scores.softmax(dim=-1).to(v.dtype), v)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; with widened half GEMMs (:func:`widened_dtype`) on the
    half-rounded q, k, v in fp32, the output rounded back."""
    dt = widened_dtype(q)
    if dt is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(*(t.to(dt).float() for t in (q, k, v)), attn_mask=attn_mask).to(dt)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):  # (no autocast on e.g. "meta")
        return torch.get_autocast_dtype(dev)
    return x.dtype


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention on (N, H, T, d) tensors with the kernel the rules pick."""
    impl = _forced_attention
    if impl == "auto":
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        impl = attention_impl(q.device.type, _compute_dtype(q), q.shape[-2], grad)
    if impl == "math":
        return math_attention(q, k, v)
    return _sdpa(q, k, v)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """:func:`attention` with a key-padding mask (N, T_k), True where a key is a real token: masked keys
    get exactly zero weight. Every query row must keep at least one key (the text path always keeps
    the timestep token or the null caption's token)."""
    keep = key_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]  # (N, 1, 1, T_k)
    impl = _forced_attention
    if impl == "auto":
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        impl = attention_impl(q.device.type, _compute_dtype(q), q.shape[-2], grad)
    if impl == "math":
        scores = matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1)).masked_fill(~keep, float("-inf"))
        return matmul(scores.softmax(dim=-1).to(v.dtype), v)
    return _sdpa(q, k, v, attn_mask=keep)


# ----------------------------------------------------------------------------- half-precision GEMMs
# On a CPU without half-precision arithmetic (AVX2 only: no avx512_bf16, no AMX) torch's bf16 and fp16
# GEMMs fall back to slow kernels: on a Zen 3 EPYC a bf16 (1024x128)x(128x512) GEMM takes 15.6 ms,
# the same product in fp32 1.1 ms (docs/performance.md, nineteenth session). A half-precision GEMM
# multiplies half-rounded operands exactly and accumulates in fp32, then rounds its output; so does
# widening: round the operands to the half dtype, multiply them in fp32, round the product back.
# Same rounding points, same function (up to summation order), at the fp32 kernels' speed. Where the
# CPU has half arithmetic the native kernels win, and nothing widens.
_HALF_SLOW: dict = {}   # dtype -> whether its GEMMs run slower than widened ones here (half_gemms_slow)
WIDEN_RATIO = 1.5       # the native half GEMM must be this much slower than the widened one


def half_gemms_slow(dtype: torch.dtype) -> bool:
    """Whether this CPU's ``dtype`` (bf16/fp16) GEMMs run over WIDEN_RATIO x slower than the same
    product widened to fp32: timed once per process on a 128-cube matmul (a few ms)."""
    if dtype not in _HALF_SLOW:
        import time

        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            a, b = torch.randn(128, 128), torch.randn(128, 128)
            ah, bh = a.to(dtype), b.to(dtype)

            def best(fn):
                fn()
                out = []
                for _ in range(3):
                    t = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - t)
                return min(out)

            try:
                native = best(lambda: ah @ bh)
            except RuntimeError:  # no half matmul at all in this build
                native = float("inf")
            widened = best(lambda: (ah.float() @ bh.float()).to(dtype))
        _HALF_SLOW[dtype] = native > WIDEN_RATIO * widened
    return _HALF_SLOW[dtype]


def _register_widened_ops():
    """The widened GEMMs as custom ops, ``dits::widened_linear`` and ``dits::widened_matmul`` (None
    where this torch has no ``torch.library.custom_op``, < 2.4). Half-precision tensors in, out
    and in every gradient; fp32 inside. Ops rather than plain code because a compiled graph traces
    its backward under the forward's autocast, which would turn the backward's fp32 GEMMs back into
    half ones; an op's backward is itself these ops, whose bodies run with autocast off."""
    if not hasattr(torch.library, "custom_op"):
        return None

    @torch.library.custom_op("dits::widened_linear", mutates_args=())
    def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

    @widened_linear.register_fake
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    def linear_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def linear_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = widened_linear(grad, weight.t(), None)                  # grad @ W
        gw = widened_linear(grad.t(), x.t(), None)                   # gradᵀ x
        gb = grad.float().sum(0).to(grad.dtype) if ctx.has_bias else None
        return gx, gw, gb

    widened_linear.register_autograd(linear_backward, setup_context=linear_context)

    @torch.library.custom_op("dits::widened_matmul", mutates_args=())
    def widened_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return (a.float() @ b.float()).to(a.dtype)

    @widened_matmul.register_fake
    def _(a, b):
        return a.new_empty(*a.shape[:-1], b.shape[-1])

    def matmul_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def matmul_backward(ctx, grad):  # (a and b have the same batch dimensions: no broadcasting)
        a, b = ctx.saved_tensors
        return widened_matmul(grad, b.transpose(-2, -1)), widened_matmul(a.transpose(-2, -1), grad)

    widened_matmul.register_autograd(matmul_backward, setup_context=matmul_context)
    return widened_linear, widened_matmul


# Registered at import, outside any compiled code (a compiled graph only reads this global).
_WIDE_OPS = _register_widened_ops()


def widened_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The half dtype whose GEMMs run widened to fp32 for ``x`` here, or None: CPU autocast in bf16
    or fp16, and the plan's GEMM choice ("widen"; "auto" where :func:`half_gemms_slow`)."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or _WIDE_OPS is None:
        return None
    dt = torch.get_autocast_dtype("cpu")
    if dt not in (torch.bfloat16, torch.float16) or _forced_gemm not in ("auto", "widen"):
        return None
    if _forced_gemm == "widen":
        return dt
    if torch.compiler.is_compiling():  # (no timing here: the compiler cannot trace it)
        return dt if _HALF_SLOW.get(dt) else None
    return dt if half_gemms_slow(dt) else None


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``, its operands widened to fp32 where :func:`widened_dtype` says so."""
    dt = widened_dtype(a)
    if dt is None or a.shape[:-2] != b.shape[:-2]:
        return a @ b
    return _WIDE_OPS[1](a.to(dt), b.to(dt))


# ----------------------------------------------------------------------------- linear layers
@functools.lru_cache(maxsize=None)
def _onednn_linear_ok() -> bool:
    """Whether this torch has oneDNN's fused CPU linear (``mkldnn::_linear_pointwise``) and it
    gives F.linear's numbers on a probe (it does on x86 builds; a missing op means F.linear)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w, b = torch.randn(4, 8), torch.randn(16, 8), torch.randn(16)
        y = _onednn(x, w, b, "gelu")
        return bool(torch.allclose(y, F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-5))
    except Exception:  # the op is absent or refuses this build/CPU
        return False


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post: str = "none") -> torch.Tensor:
    """x @ weightᵀ (+ bias) (then tanh-GELU if post == "gelu") for a 2-D ``x``, on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], "tanh" if post == "gelu" else "")


class _OneDNNLinear(torch.autograd.Function):
    """F.linear on 2-D inputs with all three GEMMs (forward, input gradient, weight gradient)
    on oneDNN (the weight gradient through :func:`_weight_grad`)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = _onednn(grad, weight.t(), None) if need_x else None        # grad @ W
        gw = _weight_grad(x, grad) if need_w else None
        gb = grad.sum(0) if need_b and ctx.has_bias else None
        return gx, gw, gb


def _weight_grad(x: torch.Tensor, grad: torch.Tensor, linear=_onednn, in_graph: bool = False) -> torch.Tensor:
    """gradᵀ x (out x in) on oneDNN, as ``linear(a, b)`` = a bᵀ. oneDNN takes ``b`` in any layout
    but copies a transposed ``a`` first, so ``a`` is the operand whose transpose moves fewer
    elements: gradᵀ (M x out), or xᵀ (M x in) and then the result's transpose. Eager code returns
    that transpose as a view, for free: the narrower of x and grad is the one copied (for the MLP's
    second linear, 512 -> 128 at the digits' width, that halves the weight-gradient GEMM's time).
    In a compiled graph (``in_graph``, ``linear`` the graph op) the copies are graph ops, tiled by
    inductor (~4x faster than the aten transpose oneDNN would make), and the result is made
    contiguous too, so its in x out elements count (DiT-S/2 fp32: ~3 % of the step; docs/performance.md,
    eleventh session)."""
    m, n_in, n_out = x.shape[0], x.shape[1], grad.shape[1]
    if m * n_out < m * n_in + (n_in * n_out if in_graph else 0):
        return linear(grad.t().contiguous(), x.t(), None)                      # (gradᵀ)(xᵀ)ᵀ
    gw = linear(x.t().contiguous(), grad.t(), None).t()                        # ((xᵀ)(gradᵀ)ᵀ)ᵀ
    return gw.contiguous() if in_graph else gw


@functools.lru_cache(maxsize=None)
def _onednn_graph_op():
    """oneDNN's linear as a custom op (``dits::onednn_linear_v3``) that torch.compile keeps as one
    opaque call, with its backward (input and weight gradients) on oneDNN too (the transposes
    around them left to the graph, :func:`_weight_grad`); None where this torch
    has no ``torch.library.custom_op`` (< 2.4). Inside a compiled graph a plain F.linear becomes
    inductor's GEMM call (MKL on x86); this is how a compiled plan keeps oneDNN's GEMMs (``+onednn``
    in a compiled plan's name), which on some CPUs run at twice MKL's fp32 rate."""
    if not hasattr(torch.library, "custom_op"):
        return None

    # The name's version changes with the backward: torch.compile's on-disk caches key a graph by
    # the ops it calls, not by the code of their registered backward (v2: the graph's _weight_grad;
    # v3: the input gradient takes Wᵀ as a view, as the eager op does).
    @torch.library.custom_op("dits::onednn_linear_v3", mutates_args=())
    def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _onednn(x.contiguous(), weight, bias)

    @onednn_linear.register_fake
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        # grad @ W. oneDNN reorders its weight operand into its own blocked layout whatever the
        # strides, so Wᵀ goes in as a view: a copy first bought nothing (the same bits, a GEMM no
        # slower; one transpose of every weight a step saved; docs/performance.md, 21st session)
        gx = onednn_linear(grad, weight.t(), None)
        gw = _weight_grad(x, grad, onednn_linear, in_graph=True)
        gb = grad.sum(0) if ctx.has_bias else None
        return gx, gw, gb

    onednn_linear.register_autograd(backward, setup_context=setup_context)
    return onednn_linear


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's CPU linear kernel (and it gives F.linear's numbers)."""
    return _onednn_linear_ok()


def onednn_in_graph() -> bool:
    """Whether oneDNN's linear can also run inside a compiled graph (the graph op; torch >= 2.4)."""
    return _onednn_linear_ok() and _onednn_graph_op() is not None


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Eager CPU fp32 outside autocast, unless "mkl" is forced; inside torch.compile only where a
    plan forces "onednn" (the graph op, :func:`_onednn_graph_op`): left alone, a compiled graph
    keeps inductor's own GEMMs."""
    if (_forced_gemm == "mkl" or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")):
        return False
    if torch.compiler.is_compiling():  # (no probe call here: the compiler cannot trace it)
        return _forced_gemm == "onednn" and _graph_op is not None
    return _onednn_linear_ok()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """``F.linear`` (followed by tanh-GELU if ``gelu``), the reference math.

    In fp32 on the CPU the matmuls run on oneDNN's linear kernel instead of the MKL path
    F.linear takes: on this project's CPU (AMD EPYC, AVX-512) ~2x faster at DiT's shapes, in
    training (forward, input and weight gradients) as in inference (docs/performance.md), and
    the same function up to float rounding. For inference the bias and the GELU are fused into
    the kernel; with autograd the GELU stays a separate op (its backward needs the
    pre-activation). In CPU half precision, on a CPU without half arithmetic, the GEMMs run on
    fp32 kernels with half-rounded operands (:func:`widened_dtype`). Autocast otherwise and other
    devices and dtypes keep F.linear; so does torch.compile
    (inductor plans its own GEMMs) unless a plan forces "onednn", which puts oneDNN's kernel in
    the graph as one op (:func:`_onednn_graph_op`).
    """
    dt = widened_dtype(x)
    if dt is not None:  # CPU half precision without half arithmetic: fp32 GEMMs on half-rounded operands
        y = _WIDE_OPS[0](x.reshape(-1, x.shape[-1]).to(dt), weight.to(dt), None if bias is None else bias.to(dt))
        y = y.reshape(*x.shape[:-1], weight.shape[0])
        return gelu_tanh(y) if gelu else y
    if _onednn_applies(x, weight):
        x2 = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():
            y = _graph_op(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
            return gelu_tanh(y) if gelu else y
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            y = _OneDNNLinear.apply(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
            return gelu_tanh(y) if gelu else y
        y = _onednn(x2.contiguous(), weight, bias, "gelu" if gelu else "none")
        return y.reshape(*x.shape[:-1], weight.shape[0])
    y = F.linear(x, weight, bias)
    return gelu_tanh(y) if gelu else y


_GELU_K = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation: 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))).

    Inside torch.compile it is written as x σ(2√(2/π) (x + 0.044715 x³)), the same function
    (0.5 (1 + tanh u) = σ(2u)): the compiler fuses either form into one loop, and exp (in σ) is
    ~2.5x cheaper than tanh on the CPU, which made GELU's forward and backward ~10 % of the
    compiled bf16 DiT-S/2 step (docs/performance.md). Eager mode keeps aten's single GELU kernel.
    """
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(_GELU_K * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


# ----------------------------------------------------------------------------- optimiser
def adamw(params, lr: float, weight_decay: float, device: torch.device,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """torch.optim.AdamW with the fused kernel where this torch has one for ``device``
    (CUDA, and CPU since torch 2.4): one kernel over all parameters instead of a Python loop
    of small ops per tensor. Same update rule, same state dict as the default AdamW. ``betas``
    default to torch's (0.9, 0.999), the reference's (``--adam-beta2`` sets the second)."""
    params = list(params)
    betas = (float(betas[0]), float(betas[1]))
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        # An older torch or a device without the fused kernel: the multi-tensor path.
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                                 foreach=device.type != "cpu" or None)


# ----------------------------------------------------------------------------- device modes
def setup_device(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (Ampere+): ~8x the fp32 tensor throughput with
    a 10-bit mantissa, the precision DiT's reference training used by default. On CPU, freed
    tensor memory is kept for the next step (:func:`retain_host_memory`)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        retain_host_memory()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.lru_cache(maxsize=None)
def retain_host_memory() -> bool:
    """Keep the memory of freed CPU tensors inside the process, for the next step to reuse.

    By default glibc's malloc serves each large tensor (activations, gradients: megabytes) with
    a fresh mmap and gives it back when it is freed, and trims the heap's free top; the next
    step's tensors then touch new pages, one page fault per 4 KiB. On a bare machine that costs
    little; in a virtual machine a fault costs 3-10 us (a CPU cloud VM measured in
    docs/performance.md: ~9,000 faults and ~12 ms of a 56 ms digits fp32 step). Serving
    allocations up to 1 GiB from the heap and never trimming it makes the steady state fault-free:
    the process keeps its peak memory (as PyTorch's CUDA caching allocator does) instead of
    handing it back between steps. Same tensors, same results; only where their bytes live.

    Linux with glibc only (elsewhere, or with ``DITS_RETAIN_MEMORY=0``, nothing changes).
    Process-wide and applied once; returns whether it is in effect."""
    if not sys.platform.startswith("linux") or os.environ.get("DITS_RETAIN_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, _ = libc.mallopt, libc.gnu_get_libc_version  # glibc's (musl has no such version call)
    except (OSError, AttributeError):
        return False
    # 1 GiB where this glibc accepts it, else the largest threshold older ones do (32 MiB)
    big = mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(big and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run (one line, before any work)."""
    if precision == "fp16" and device.type == "cpu" and not _cpu_fp16_ok():
        raise UserError("--precision fp16 is not supported by this CPU's torch build; use --precision bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16 is not supported on {torch.cuda.get_device_name(device)}; use fp16 or fp32")


@functools.lru_cache(maxsize=None)
def _cpu_fp16_ok() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            a = torch.ones(2, 2, requires_grad=True)
            (a @ a).sum().backward()
        return True
    except RuntimeError:
        return False


# ----------------------------------------------------------------------------- compile
def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile cannot run here, or None if it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if sys.platform == "win32":
        return "torch.compile's inductor backend is not supported on Windows"
    if device.type == "cpu" and not (shutil.which("gcc") or shutil.which("cc") or shutil.which("g++")):
        return "no C++ compiler (gcc) on PATH for inductor's CPU kernels"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (needed for inductor's CUDA kernels)"
    return None


# Compile pays back its one-off cost only over long runs, and there are two ways to pay it:
#   "model":  the whole network as one graph; the fastest step, the longest compile.
#   "blocks": each transformer block compiled on its own; the blocks share one graph (their
#             parameters are graph inputs), so it compiles in seconds, and the step keeps most
#             of the gain.
# Measured on this project's 2-core CPU, bf16, one process, cold inductor cache (docs/performance.md):
#   digits preset: eager 28.7 ms, blocks 21.5 ms (6 s to compile), model 19.4 ms (29 s)
#   DiT-S/2 b8:    eager 652 ms,  blocks 551 ms  (7 s),           model 524 ms  (45 s)
# "blocks" repays its compile after ~1,000 steps and stays ahead of "model" up to ~10,000.
# CPU fp32 does not compile where oneDNN's linear exists: its eager GEMMs (1.3-1.6x faster
# steps) beat a compiled graph, whose matmuls go back to MKL. On CUDA the gain is large
# (fused LayerNorm/modulate/GELU epilogues) and minutes of compile are repaid within the
# first thousand steps of any real run.
AUTO_COMPILE_MIN_STEPS = {"cuda": 2_000, "cpu": 10_000}   # whole-model compile from here on
AUTO_COMPILE_BLOCKS_MIN_STEPS = {"cpu": 1_500}             # per-block compile from here on


def should_compile(mode: str, device: torch.device, steps: int,
                   precision: str = "fp32") -> tuple[str | None, str | None]:
    """The fixed rule: what to compile for a run of ``steps`` more steps: None, "blocks" or
    "model" (see above), and a one-line reason when "auto" would compile but cannot. The trainer
    measures instead (dits.plan) and uses this rule only where it does not measure: runs under
    dits.plan.MIN_PROBE_STEPS (which this rule never compiles) and --fsdp runs. The thresholds
    come from one CPU; on another one the plan's measurement decides.

    "on" compiles the model, and where no compiler exists it is a user error; "auto" chooses
    by what repays its cost and silently skips what would not.
    """
    if mode not in COMPILE_MODES:
        raise UserError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "off":
        return None, None
    missing = compiler_missing(device)
    if mode == "on":
        if missing:
            raise UserError(f"--compile on: {missing}; use --compile off (or auto)")
        return "model", None
    if device.type == "cpu" and precision == "fp32" and _onednn_linear_ok():
        return None, None  # eager oneDNN GEMMs beat the compiled graph (see above)
    if steps >= AUTO_COMPILE_MIN_STEPS.get(device.type, sys.maxsize):
        plan = "model"
    elif steps >= AUTO_COMPILE_BLOCKS_MIN_STEPS.get(device.type, sys.maxsize):
        plan = "blocks"
    else:
        return None, None
    if missing:
        return None, f"not compiling: {missing}"
    return plan, None


def _contiguous_inputs(block: torch.nn.Module) -> None:
    """A compiled block gets its tensor arguments contiguous. The first block's input (the patch
    embedding plus the position table) is a transposed view; fed as it is, inductor's graph (torch
    2.13, CPU) computed the block's *gradients* 1-9 % off the eager ones while the forward agreed
    (tests/test_plan.py::test_every_plan_gives_the_reference_loss_and_gradients found it). One
    copy of the first block's input per step; later blocks' inputs are contiguous already."""
    compiled = block._compiled_call_impl

    def call(*args, **kwargs):
        return compiled(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
    block._compiled_call_impl = call


def compiled_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules a per-block compile compiles: the transformer blocks, and a masked-training
    decoder's blocks too."""
    return list(getattr(model, "blocks", None) or []) + list(getattr(model, "decoder_blocks", None) or [])


def uncompile_blocks(blocks) -> None:
    """Undo ``nn.Module.compile`` on ``blocks``: they run eager again."""
    for blk in blocks:
        blk._compiled_call_impl = None


class CompiledOrEager(torch.nn.Module):
    """``module`` compiled, with a clean fallback: if compiling fails on the first call (a
    broken toolchain, an unsupported op), say why in one line and run eager from then on.
    Compilation happens before anything executes, so the fallback call starts from scratch.

    ``blocks`` given: only those submodules are compiled (in place, ``nn.Module.compile``),
    the rest of ``module`` runs eager. The parameters are ``module``'s own (no copy); save
    ``module``, not this wrapper."""

    def __init__(self, module: torch.nn.Module, blocks: list[torch.nn.Module] | None = None, quiet: bool = False):
        super().__init__()
        self.module = module
        self.__dict__["_quiet"] = quiet  # the plan probe reads .failed and reports it itself
        self.__dict__["_blocks"] = list(blocks or [])  # kept out of the module tree (listed once)
        if self._blocks:
            for blk in self._blocks:
                blk.compile(dynamic=False)
                _contiguous_inputs(blk)
            self.__dict__["_compiled"] = module
        else:
            self.__dict__["_compiled"] = torch.compile(module, dynamic=False)
        self.failed = False

    def forward(self, *args, **kwargs):
        if not self.failed:
            try:
                return self._compiled(*args, **kwargs)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any compiler failure means: run eager
                self.failed = True
                uncompile_blocks(self._blocks)
                why = (str(e).strip().splitlines() or [""])[0][:200]
                self.__dict__["why"] = f"{type(e).__name__}: {why}"
                if not self._quiet:
                    print(f"dits: torch.compile failed ({type(e).__name__}: {why}); running eager", file=sys.stderr)
        return self.module(*args, **kwargs)


def compile_module(module: torch.nn.Module, plan: str = "model", model: torch.nn.Module | None = None,
                   quiet: bool = False) -> torch.nn.Module:
    """``module`` (a DiT, or a DDP wrapper of ``model``) compiled by ``plan`` ("model", or
    "blocks": each of ``model.blocks``), with an eager fallback (see :class:`CompiledOrEager`)."""
    if next(module.parameters(), torch.empty(0)).device.type == "cpu":
        for dt in (torch.bfloat16, torch.float16):  # timed here, outside the graph (widened_dtype)
            half_gemms_slow(dt)
    if plan == "blocks":
        return CompiledOrEager(module, blocks=compiled_blocks(model if model is not None else module), quiet=quiet)
    return CompiledOrEager(module, quiet=quiet)
