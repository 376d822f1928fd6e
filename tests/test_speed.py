"""Speed paths compute the same function as the eager reference: attention kernels, the fused
optimiser, activation checkpointing, compile choices, and the `dits bench` commands."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from dits import speed
from dits.cli import main
from dits.config import TrainConfig
from dits.errors import UserError
from dits.models import create_model
from dits.train.loop import lr_at

TINY = dict(depth=2, hidden_size=32, num_heads=4, patch_size=2, input_size=8, in_channels=1, num_classes=10)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = create_model("DiT", **{**TINY, **kw})
    # Non-zero modulation and output layers, so every block really contributes.
    for p in m.parameters():
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    return m


def batch(n=6, seed=1):
    """x, t and (labels, no label dropout): the same inputs on every call, in train mode too."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g), torch.zeros(n, dtype=torch.bool))


def float64_reference(m):
    """The independent reference DiT (tests/_reference_dit.py) with ``m``'s weights, in float64."""
    import _reference_dit as official

    c = m.config
    ref = official.DiT(input_size=c.input_size, patch_size=c.patch_size, in_channels=c.in_channels,
                       hidden_size=c.hidden_size, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                       class_dropout_prob=c.class_dropout_prob, num_classes=c.num_classes, learn_sigma=c.learn_sigma)
    ref.load_state_dict(m.state_dict())
    ref.double().eval()
    return lambda x, t, y: ref.forward(x, t, y)


@pytest.fixture
def forced():
    yield speed.set_attention
    speed.set_attention("auto")


def reference_attention(q, k, v):
    """Attention from its definition, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    w = torch.exp(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]))
    return (w / w.sum(-1, keepdim=True)) @ v


# ------------------------------------------------------------------ attention kernels
@pytest.mark.parametrize("t", [2, 16, 80])
def test_attention_kernels_agree_with_the_definition(t):
    q, k, v = (torch.randn(3, 4, t, 8) for _ in range(3))
    ref = reference_attention(q, k, v)
    for out in (speed.math_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), speed.attention(q, k, v)):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = speed.attention(q, k, v)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), ref, atol=3e-2, rtol=3e-2)


def test_attention_rules():
    cpu, cuda = "cpu", "cuda"
    assert speed.attention_impl(cpu, torch.bfloat16, 16, True) == "math"   # CPU bf16 SDPA backward is slow
    assert speed.attention_impl(cpu, torch.float16, 256, False) == "math"
    assert speed.attention_impl(cpu, torch.float32, 16, True) == "sdpa"    # fused fp32 backward wins
    assert speed.attention_impl(cpu, torch.float32, 16, False) == "math"   # short inference
    assert speed.attention_impl(cpu, torch.float32, 256, False) == "sdpa"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert speed.attention_impl(cuda, dtype, 256, True) == "sdpa"     # flash / memory-efficient kernels
    with pytest.raises(UserError):
        speed.set_attention("flash3")


@pytest.mark.parametrize("block", ["adaln-zero", "cross-attn"])
def test_model_forward_and_grads_equal_across_attention_kernels(forced, block):
    m = tiny(block=block)
    x, t, *y = batch()
    outs, grads = {}, {}
    for impl in ("sdpa", "math"):
        forced(impl)
        m.zero_grad()
        out = m(x, t, *y)
        out.square().mean().backward()
        outs[impl], grads[impl] = out.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]
    torch.testing.assert_close(outs["sdpa"], outs["math"], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bf16_fast_path_stays_close_to_fp32_eager(forced):
    m = tiny()
    x, t, *y = batch()
    forced("sdpa")
    ref = m(x, t, *y).detach()
    forced("auto")  # CPU bf16 -> the explicit-matmul kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x, t, *y).float()
    err = (low - ref).abs().max() / ref.abs().max()
    assert err < 0.05, float(err)


# ------------------------------------------------------------------ optimiser
def test_chosen_adamw_matches_torch_adamw_and_its_state_dict():
    a, b = tiny(), tiny()
    fast = speed.adamw(a.parameters(), 1e-2, 0.05, torch.device("cpu"))
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # the same gradients for both (gradients of the weights would amplify rounding)
        for p, q in zip(a.parameters(), b.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        fast.step()
        plain.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    assert not torch.equal(next(a.parameters()), next(tiny().parameters()))  # it did move
    # checkpoints stay interchangeable with a plain AdamW
    plain.load_state_dict(fast.state_dict())
    assert set(fast.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


# ------------------------------------------------------------------ activation checkpointing
def test_grad_checkpoint_gives_the_same_gradients():
    m = tiny()
    x, t, *y = batch()
    grads = []
    for ckpt in (False, True):
        m.grad_checkpoint = ckpt
        m.zero_grad()
        m(x, t, *y).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------ compile and precision choices
def test_compile_choices(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert speed.should_compile("off", cpu, 10**6) == (None, None)
    monkeypatch.setattr(speed, "compiler_missing", lambda device: None)
    monkeypatch.setattr(speed, "_onednn_linear_ok", lambda: False)
    assert speed.should_compile("auto", cpu, 1000) == (None, None)     # too short to repay even the blocks
    assert speed.should_compile("auto", cpu, 4000) == ("blocks", None)  # the digits preset's length
    assert speed.should_compile("auto", cpu, 10**6) == ("model", None)
    assert speed.should_compile("auto", cpu, 10**6, "bf16") == ("model", None)
    monkeypatch.setattr(speed, "_onednn_linear_ok", lambda: True)   # eager oneDNN GEMMs beat compiled fp32
    assert speed.should_compile("auto", cpu, 4000) == (None, None)
    assert speed.should_compile("auto", cpu, 10**6) == (None, None)
    assert speed.should_compile("auto", cpu, 4000, "bf16") == ("blocks", None)
    assert speed.should_compile("auto", cpu, 10**6, "bf16") == ("model", None)
    assert speed.should_compile("auto", cuda, 10**6) == ("model", None)
    assert speed.should_compile("auto", cuda, 10) == (None, None)       # too short to pay back
    assert speed.should_compile("on", cpu, 10) == ("model", None)
    monkeypatch.setattr(speed, "compiler_missing", lambda device: "no C++ compiler")
    with pytest.raises(UserError, match="no C\\+\\+ compiler"):
        speed.should_compile("on", cpu, 10)
    plan, why = speed.should_compile("auto", cuda, 10**6)
    assert plan is None and "no C++ compiler" in why
    assert speed.should_compile("auto", cpu, 4000, "bf16")[0] is None
    with pytest.raises(UserError):
        speed.should_compile("sometimes", cpu, 10)


def test_compile_failure_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    class Broken(torch.nn.Module):  # what torch.compile returns: a module wrapping the original
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, *a, **k):
            raise RuntimeError("C++ compile error: cannot find cc1plus\nmore detail")

    def broken_compile(module, **kw):
        return Broken(module)
    monkeypatch.setattr(torch, "compile", broken_compile)
    m = tiny().eval()
    x, t, *y = batch()
    net = speed.compile_module(m)
    out = net(x, t, *y)
    torch.testing.assert_close(out, m(x, t, *y), atol=0, rtol=0)
    net(x, t, *y)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.compile failed" in err[0] and "cc1plus" in err[0] and "running eager" in err[0]
    assert set(net.state_dict()) == {"module." + k for k in m.state_dict()}  # no duplicated compiled copy


def test_block_compile_failure_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    """The per-block plan: each block's nn.Module.compile; a failing compiler at the first call
    gives one line, and every block runs (and stays) eager, with the same output."""
    calls = []

    def broken_compile(fn, **kw):
        def run(*a, **k):
            calls.append(1)
            raise RuntimeError("InductorError: no vectorized tanh\nmore detail")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    m = tiny().eval()
    x, t, *y = batch()
    ref = m(x, t, *y)  # not compiled yet
    net = speed.compile_module(m, "blocks")
    torch.testing.assert_close(net(x, t, *y), ref, atol=0, rtol=0)
    torch.testing.assert_close(net(x, t, *y), ref, atol=0, rtol=0)
    assert len(calls) == 1                                    # the compiled path was tried once
    assert all(blk._compiled_call_impl is None for blk in m.blocks)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.compile failed" in err[0] and "running eager" in err[0]
    assert set(net.state_dict()) == {"module." + k for k in m.state_dict()}


def test_compiled_blocks_equal_eager_and_the_float64_reference(capsys):
    """Always on (skipped, with the reason, only where inductor has no compiler): the per-block
    plan on a one-block model gives the eager output and the independent reference model's
    float64 output; and it really ran compiled (no fallback line, blocks carry a compiled call)."""
    why = speed.compiler_missing(torch.device("cpu"))
    if why:
        pytest.skip(why)
    m = tiny(depth=1).eval()
    x, t, *y = batch(4)
    with torch.no_grad():
        eager = m(x, t, *y)
        ref = float64_reference(m)(x.double(), t, y[0])
        out = speed.compile_module(m, "blocks")(x, t, *y)
    assert all(blk._compiled_call_impl is not None for blk in m.blocks)
    assert "torch.compile failed" not in capsys.readouterr().err
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    for blk in m.blocks:
        blk._compiled_call_impl = None


@pytest.mark.skipif(not os.environ.get("DITS_TEST_COMPILE"), reason="torch.compile takes ~30 s; DITS_TEST_COMPILE=1")
def test_compiled_model_equals_eager():
    m = tiny()
    x, t, *y = batch()
    ref = m(x, t, *y).detach()
    out = speed.compile_module(m)(x, t, *y).detach()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    blocks = speed.compile_module(m, "blocks")(x, t, *y).detach()
    torch.testing.assert_close(blocks, ref, atol=1e-5, rtol=1e-5)


def test_cosine_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=110, lr_schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.5)
    assert lr_at(cfg, 110) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(TrainConfig(lr=1.0, steps=110), 100) == 1.0


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr()


@pytest.mark.parametrize("argv,needle", [
    (["--compile", "on"], "no C++ compiler"),
    (["--precision", "fp16"], "fp16 is not supported"),
    (["--compile", "maybe"], "compile must be"),
    (["--lr-schedule", "linear"], "lr-schedule"),
])
def test_train_speed_flags_bad_input(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.setattr(speed, "compiler_missing", lambda device: "no C++ compiler on PATH")
    monkeypatch.setattr(speed, "_cpu_fp16_ok", lambda: False)
    code, io = run_cli(capsys, "train", *argv, "--steps", "1", "--out", str(tmp_path / "r"), "--no-progress")
    err = io.err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_bad_grad_checkpoint_value(capsys, tmp_path):
    code = main(["train", "--grad-checkpoint", "sometimes", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "--grad-checkpoint" in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="grad-checkpoint"):
        TrainConfig(grad_checkpoint="sometimes").validate()


# ------------------------------------------------------------------ dits bench train / sample
BENCH = ["--model", "DiT", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "2",
         "--image-size", "8", "--channels", "1", "--num-classes", "10", "--batch", "4", "--rounds", "1"]

# The official side of the bench is a stand-in written independently of dits: the reference
# DiT of tests/_reference_dit.py (its own forward, the official key layout, so the bench's
# strict load of dits' weights into it must succeed) and a small DDIM-style diffusion of its
# own. Every forward it runs is logged, so the test sees that the official contenders ran.
FAKE_MODELS_LOG = """
_LOG = {log!r}
_plain_forward = DiT.forward


def _logged_forward(self, x, t, y):
    with open(_LOG, "a") as f:
        f.write(f"{{'train' if self.training else 'eval'}} {{x.shape[0]}} {{int(self.blocks[0].attn.fused_attn)}}\\n")
    return _plain_forward(self, x, t, y)


DiT.forward = _logged_forward
"""
FAKE_DIFFUSION = """
import torch


class _Diffusion:
    def __init__(self, steps):
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        self.abar_all = torch.cumprod(1 - betas, 0)
        self.ts = torch.linspace(0, 999, steps).round().long() if steps else torch.arange(1000)
        self.abar = self.abar_all[self.ts]

    def training_losses(self, model, x, t, model_kwargs):
        noise = torch.randn_like(x)
        a = self.abar_all[t].float().view(-1, 1, 1, 1)
        out = model(a.sqrt() * x + (1 - a).sqrt() * noise, t, **model_kwargs)
        return {"loss": ((out[:, : x.shape[1]] - noise) ** 2).mean(dim=(1, 2, 3))}

    def p_sample_loop(self, model, shape, noise, clip_denoised=False, model_kwargs=None, progress=False,
                      device=None):
        x = noise
        for i in reversed(range(len(self.ts))):
            t = torch.full((shape[0],), int(self.ts[i]))
            eps = model(x, t, **(model_kwargs or {}))[:, : shape[1]]
            a, a_prev = float(self.abar[i]), float(self.abar[i - 1]) if i else 1.0
            x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
            x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return x


def create_diffusion(timestep_respacing=""):
    return _Diffusion(int(timestep_respacing) if timestep_respacing else 0)
"""


def fake_official(tmp_path):
    """A stand-in with the official code's import layout (models.py + diffusion/)."""
    from pathlib import Path

    root = tmp_path / "official"
    (root / "diffusion").mkdir(parents=True)
    reference = (Path(__file__).parent / "_reference_dit.py").read_text()
    (root / "models.py").write_text(reference + FAKE_MODELS_LOG.format(log=str(tmp_path / "official.log")))
    (root / "diffusion" / "__init__.py").write_text(FAKE_DIFFUSION)
    return root


def _official_calls(tmp_path):
    log = tmp_path / "official.log"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return sorted(set(lines)), len(lines)


def _check_speed_up_lines(out):
    """Each 'speed-up of A over B: r' is A's images/s over B's (the table's rows, to the printed
    digits), and B is the faster of the official contenders."""
    import re

    rate = {}
    for line in out.splitlines():
        # the name column is as wide as the longest name (at least 38): a name, two or more spaces
        m = re.match(r"^(\S.*?) {2,}[0-9.]+ +([0-9.]+) ", line)
        if m:
            rate[m.group(1).strip()] = float(m.group(2))
    ups = re.findall(r"speed-up of (.+) over (.+): ([0-9.]+)x", out)
    assert ups and len(rate) == 3, out
    for mine, theirs, ratio in ups:
        assert theirs.startswith("official") and not mine.startswith("official")
        assert rate[theirs] == max(v for k, v in rate.items() if k.startswith("official")), out
        assert float(ratio) == pytest.approx(rate[mine] / rate[theirs], abs=0.006), out


def test_bench_train_and_sample_print_the_table(capsys, tmp_path):
    official = fake_official(tmp_path)
    code, io = run_cli(capsys, "bench", "train", *BENCH, "--steps", "2", "--official", str(official))
    assert code == 0, io.err
    out = io.out
    for word in ("ms/step", "img/s", "TFLOP/s", "MFU", "peak mem", "official (timm sdpa attn)", "speed-up of dits",
                 "matmul peak measured in this run"):
        assert word in out, out
    _check_speed_up_lines(out)
    # both official attention paths trained on the bench's batch of 4: 3 warm-up + 1 round x 2 steps each
    kinds, n = _official_calls(tmp_path)
    assert kinds == ["train 4 0", "train 4 1"] and n == 2 * (3 + 2), (kinds, n)
    import sys
    assert "models" not in sys.modules  # the official modules are taken off again
    code, io = run_cli(capsys, "bench", "sample", *BENCH, "--sample-steps", "3", "--run-samples", "4",
                       "--official", str(official))   # a short run: the rules' eager plan, nothing probed
    assert code == 0 and "ms/batch" in io.out and "dits generate (ddpm, 3 steps, eager)" in io.out, io.err
    _check_speed_up_lines(io.out)
    # guided sampling: [cond; null] batch of 2 x 4, 3 steps, 1 warm-up + 1 round, both attention paths
    kinds, n = _official_calls(tmp_path)
    assert kinds == ["eval 8 0", "eval 8 1"] and n == 2 * 2 * 3, (kinds, n)


@pytest.mark.parametrize("argv,needle", [
    (["train", "--official", "/no/such/DiT"], "facebookresearch/DiT checkout"),
    (["train", "--batch", "0"], "--batch must be >= 1"),
    pytest.param(["sample", "--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    (["sample", "--sampler", "heun", "--official", "OFFICIAL"], "use --sampler ddpm"),
])
def test_bench_bad_input(capsys, tmp_path, argv, needle):
    argv = [str(fake_official(tmp_path)) if a == "OFFICIAL" else a for a in argv]
    code, io = run_cli(capsys, "bench", argv[0], *BENCH, *argv[1:])
    err = io.err.strip().splitlines()[-1]
    assert code == 2 and needle in err, io.err


# ------------------------------------------------------------------ linear layers
def test_linear_fast_path_is_the_reference_math():
    """dits.speed.linear (oneDNN's fused kernel for CPU fp32 inference, where this torch has it)
    against F.linear and tanh-GELU written out from their definitions in float64."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 64, generator=g), torch.randn(96, 64, generator=g) * 0.1, torch.randn(96, generator=g)
    ref = (x.double() @ w.double().t() + b.double())
    c = (2 / torch.pi) ** 0.5
    ref_gelu = 0.5 * ref * (1 + torch.tanh(c * (ref + 0.044715 * ref ** 3)))
    with torch.no_grad():
        assert torch.allclose(speed.linear(x, w, b).double(), ref, atol=1e-4)
        assert torch.allclose(speed.linear(x, w, b, gelu=True).double(), ref_gelu, atol=1e-4)

def _grads_of(fn, *tensors, dtype):
    """Gradients of sum(fn(...) * probe) with respect to every input, computed in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out * probe.to(dtype)).sum().backward()
    return [out.detach().double()] + [t.grad.double() for t in leaves]


@pytest.mark.parametrize("compiling", [False, True])
def test_gelu_tanh_forms_are_the_reference_function(monkeypatch, compiling):
    """gelu_tanh (aten's kernel in eager mode; x*sigmoid(2u) inside torch.compile) against
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) and its derivative written out in float64."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    c = math.sqrt(2 / math.pi)
    u = c * (x + 0.044715 * x ** 3)
    ref = 0.5 * x * (1 + torch.tanh(u))
    dref = 0.5 * (1 + torch.tanh(u)) + 0.5 * x * (1 - torch.tanh(u) ** 2) * c * (1 + 3 * 0.044715 * x ** 2)
    out, dx = _grads_of(speed.gelu_tanh, x, dtype=torch.float32)
    probe = torch.linspace(-1, 1, x.numel(), dtype=torch.float64)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dx, dref * probe, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("fan_in, fan_out", [(96, 160), (160, 96)])   # both weight-gradient orientations
def test_linear_training_path_gradients(gelu, fan_in, fan_out):
    """With autograd, dits.speed.linear runs all three GEMMs (forward, input gradient, weight
    gradient) on oneDNN where available: output and gradients against the same function
    differentiated by autograd in float64 (F.linear + tanh-GELU). The weight gradient transposes
    the narrower operand (dits.speed._weight_grad): a wide-to-narrow layer takes the other branch."""
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(2, 37, fan_in, generator=g), torch.randn(fan_out, fan_in, generator=g) * 0.1,
               torch.randn(fan_out, generator=g))
    def ref(x, w, b):
        y = F.linear(x, w, b)
        return F.gelu(y, approximate="tanh") if gelu else y
    fast = _grads_of(lambda x, w, b: speed.linear(x, w, b, gelu=gelu), x, w, b, dtype=torch.float32)
    exact = _grads_of(ref, x, w, b, dtype=torch.float64)
    for name, a, e in zip(("output", "d/dx", "d/dW", "d/db"), fast, exact):
        assert a.shape == e.shape, name
        torch.testing.assert_close(a, e, atol=2e-4, rtol=1e-4, msg=name)
    # the parameter gradient lands in .grad with the parameter's own layout (what fused AdamW reads)
    wp = w.clone().requires_grad_(True)
    speed.linear(x, wp, None).sum().backward()
    assert wp.grad.shape == wp.shape and wp.grad.is_contiguous()


def test_model_inference_equals_the_training_path():
    """The same weights give the same function whether the fast inference kernels run (no_grad)
    or the autograd path (F.linear) does: both against the independent reference DiT in float64."""
    from dits.models import create_model

    torch.manual_seed(0)
    m = create_model("DiT", depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, in_channels=1,
                     num_classes=10).eval()
    for name, p in m.named_parameters():  # leave the zero init, so every layer matters
        if name != "pos_embed":
            torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 100, 999]), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        fast = m(x, t, y)
        ref = float64_reference(m)(x.double(), t, y)
    slow = m(x.requires_grad_(True), t, y)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(slow.detach().double(), ref, atol=1e-5, rtol=1e-4)


def test_mfu_divides_by_the_higher_of_the_peaks_measured_before_and_after(capsys, monkeypatch):
    """A matmul burst timed while the machine is busy reads low; MFU against it would exceed 100 %.
    The bench measures the peak before the contenders and again after them and divides by the higher."""
    import re

    from dits.bench import isolated
    from dits.bench import speed as bench_speed

    peaks = iter([1e9, 1e18])  # 1 GFLOP/s "under load" before, then the machine's (absurdly high) own
    monkeypatch.setattr(bench_speed, "peak_for", lambda s, clock: next(peaks))
    # the contenders' own timing is not what is tested here: one made-up round, no worker processes
    monkeypatch.setattr(isolated, "run_isolated", lambda specs, *a, **k: [bench_speed.Timing(n, seconds=[0.01])
                                                                           for n in specs])
    code, io = run_cli(capsys, "bench", "train", *BENCH, "--steps", "1", "--rounds", "1")
    assert code == 0, io.err
    assert "matmul peak measured in this run: 1000000000 GFLOP/s" in io.out, io.out
    mfu = re.findall(r" ([0-9.]+)% ", io.out)
    assert mfu and all(float(m) < 0.1 for m in mfu), io.out


def test_a_cpu_half_precision_peak_is_the_faster_of_its_kernels_and_fp32s(monkeypatch):
    """On a CPU without half arithmetic dits' widened bf16 GEMMs run at fp32's rate: MFU against the
    bf16 kernel alone read 250 % on a Zen 3, whose native kernel is then not timed at all (~25 s
    there). With half arithmetic the faster of the two counts; fp32 and CUDA keep their own dtype's."""
    import dits.speed
    from dits.bench import speed as bench_speed

    rates = {torch.float32: 100e9, torch.bfloat16: 2e9, torch.float16: 1e9}
    asked = []

    def fake_peak(device, dtype, clock="wall", **kw):
        asked.append((device.type, dtype))
        return rates[dtype] * (10 if device.type == "cuda" else 1)

    monkeypatch.setattr(bench_speed, "matmul_peak", fake_peak)
    setup = lambda precision, device="cpu": bench_speed.Setup(precision=precision, device=device)  # noqa: E731
    monkeypatch.setattr(dits.speed, "half_gemms_slow", lambda dtype: True)
    assert bench_speed.peak_for(setup("bf16"), "wall") == 100e9
    assert (("cpu", torch.bfloat16) not in asked), asked
    assert bench_speed.peak_for(setup("fp16"), "wall") == 100e9
    assert bench_speed.peak_for(setup("fp32"), "wall") == 100e9
    # a CPU with bf16 arithmetic: its own kernel, where faster than fp32's
    monkeypatch.setattr(dits.speed, "half_gemms_slow", lambda dtype: False)
    assert bench_speed.peak_for(setup("bf16"), "wall") == 100e9
    rates[torch.bfloat16] = 400e9
    assert bench_speed.peak_for(setup("bf16"), "wall") == 400e9
    asked.clear()
    assert bench_speed.peak_for(setup("bf16", "cuda"), "wall") == 4000e9
    assert asked == [("cuda", torch.bfloat16)]


def test_the_speed_up_line_gives_the_ratio_round_by_round_too():
    """Ratio of medians, then the per-round ratios' median and range (a load that drifts between
    rounds moves both contenders of a round alike). Hand-made timings: rounds 1.5x, 1.0x, 3.0x."""
    from types import SimpleNamespace

    from dits.bench.speed import Timing, report

    mine = Timing("dits (fp32, eager)", seconds=[1.0, 2.0, 1.0])
    theirs = Timing("official (timm math attn)", seconds=[1.5, 2.0, 3.0])
    out = report([mine, theirs], SimpleNamespace(device="cpu", precision="fp32"), 1e9, 8, 1e12, "ms/step")
    line = [r for r in out.splitlines() if r.startswith("speed-up of")]
    assert line == ["speed-up of dits (fp32, eager) over official (timm math attn): 2.00x "
                    "(round by round: median 1.50x, 1.00-3.00x over 3 rounds)"], out
    one = report([Timing("dits", seconds=[1.0]), Timing("official", seconds=[2.0])],
                 SimpleNamespace(device="cpu", precision="fp32"), 1e9, 8, 1e12, "ms/step")
    assert "speed-up of dits over official: 2.00x\n" in one + "\n" and "round by round" not in one, one


@pytest.mark.skipif(not speed.onednn_in_graph() or speed.compiler_missing(torch.device("cpu")) is not None,
                    reason="needs oneDNN's linear as a graph op and a C++ compiler for torch.compile")
def test_the_graph_ops_gradients_are_the_closed_form_in_both_weight_gradient_orientations():
    """Inside a compiled graph the weight gradient gradᵀx is taken either as (gradᵀ)(xᵀ)ᵀ or as the
    transpose of (xᵀ)(gradᵀ)ᵀ, whichever moves fewer elements; both layers below take a different
    one. For loss = Σ y ⊙ r: dx = r W, dW = rᵀ x, db = Σ r, checked in float64."""
    op = speed._onednn_graph_op()
    shapes = [(64, 8, 32), (6, 16, 48)]  # (tokens, in, out)
    transposes_x = [not m * n_out < m * n_in + n_in * n_out for m, n_in, n_out in shapes]
    assert transposes_x == [True, False]  # one layer per orientation
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(m, i, generator=g, requires_grad=True) for m, i, _ in shapes]
    ws = [torch.randn(o, i, generator=g, requires_grad=True) for _, i, o in shapes]
    bs = [torch.randn(o, generator=g, requires_grad=True) for *_, o in shapes]
    rs = [torch.randn(m, o, generator=g) for m, _, o in shapes]

    @torch.compile(dynamic=False)
    def loss(xs, ws, bs):
        return sum((op(x, w, b) * r).sum() for x, w, b, r in zip(xs, ws, bs, rs))
    loss(xs, ws, bs).backward()
    for x, w, b, r in zip(xs, ws, bs, rs):
        r64 = r.double()
        torch.testing.assert_close(x.grad.double(), r64 @ w.detach().double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.grad.double(), r64.t() @ x.detach().double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad.double(), r64.sum(0), rtol=1e-5, atol=1e-5)
        assert w.grad.is_contiguous()


# ----------------------------------------------------------------------------- host memory
_FAULTS = r"""
import os, resource, sys, torch
from dits.speed import setup_device
setup_device(torch.device("cpu"))
from dits.speed import retain_host_memory
def step():  # a step's worth of large tensors, allocated, written and freed
    xs = [torch.ones(n) for n in (1 << 18, 3 << 20, 1 << 24)]  # 1, 12 and 64 MiB
    del xs
for _ in range(8):  # the heap settles in a few steps (a 64 MiB hole appears once the pieces merge)
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(retain_host_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "confstr")
                    or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""), reason="glibc's malloc only")
def test_a_cpu_run_reuses_freed_tensor_memory_without_page_faults_unless_told_not_to():
    """The steady state of a CPU step touches no new page (each would be a fault: 3-10 us in a VM);
    DITS_RETAIN_MEMORY=0 leaves malloc as it was, which faults on every large tensor again."""
    import subprocess

    def run(**env):
        out = subprocess.run([sys.executable, "-c", _FAULTS], env={**os.environ, **env}, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    on, faults_on = run()
    off, faults_off = run(DITS_RETAIN_MEMORY="0")
    pages = 10 * ((1 << 18) + (3 << 20) + (1 << 24)) * 4 // 4096
    assert on and faults_on < pages // 100, (faults_on, pages)
    assert not off and faults_off > pages // 2, (faults_off, pages)  # the default malloc: faults each time


# ------------------------------------------------------------------ half-precision GEMMs widened to fp32
@pytest.mark.parametrize("gelu", [False, True])
def test_widened_half_gemms_round_where_the_native_ones_do(gelu):
    """bf16 autocast: a GEMM rounds its operands to bf16, multiplies exactly, accumulates in fp32
    and rounds its output (and its gradients) to bf16. The widened path (fp32 kernels on the
    rounded operands) must do the same: outputs within one bf16 step of the float64 product of the
    rounded operands, every gradient of a bf16 GEMM bf16-representable, native and widened within
    one bf16 step of each other."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((2, 24, 64), (48, 64), (48,)))
    exact = x.bfloat16().double() @ w.bfloat16().double().t() + b.bfloat16().double()
    out = {}
    for gemm in ("widen", "native"):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        with speed.forced(gemm=gemm), torch.autocast("cpu", dtype=torch.bfloat16):
            y = speed.linear(xs, ws, bs, gelu=gelu)
            q, k = y[..., :16].reshape(2, 1, 24, 16), y[..., 16:32].reshape(2, 1, 24, 16)
            a = speed.math_attention(q, k, y[..., 32:].reshape(2, 1, 24, 16))
        assert y.dtype == torch.bfloat16 and a.dtype == torch.bfloat16
        if not gelu:  # one rounding of the exact product (fp32 accumulation adds ~1e-6 relative)
            step = exact.abs() * 2.0 ** -8 + 1e-5
            assert ((y.double() - exact).abs() <= step).all(), gemm
        (y.float().square().sum() + a.float().sum()).backward()
        for grad in (xs.grad, ws.grad):  # each is a bf16 GEMM's output, cast to the fp32 leaf
            assert torch.equal(grad, grad.bfloat16().float()), gemm
        out[gemm] = (y.double(), a.double(), xs.grad.double(), ws.grad.double())
    for wide, native in zip(out["widen"], out["native"]):
        scale = native.abs().max()
        torch.testing.assert_close(wide / scale, native / scale, rtol=0, atol=2.0 ** -6)


def test_half_gemms_slow_is_timed_once_and_only_auto_and_widen_widen(monkeypatch):
    speed._HALF_SLOW.pop(torch.bfloat16, None)
    slow = speed.half_gemms_slow(torch.bfloat16)
    assert isinstance(slow, bool) and speed._HALF_SLOW[torch.bfloat16] is slow
    x = torch.ones(2, 2)
    for gemm, slow_here, widened in (("auto", True, True), ("auto", False, False), ("widen", False, True),
                                     ("native", True, False), ("mkl", True, False)):
        monkeypatch.setitem(speed._HALF_SLOW, torch.bfloat16, slow_here)
        with speed.forced(gemm=gemm):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert (speed.widened_dtype(x) == torch.bfloat16) is widened, (gemm, slow_here)
            assert speed.widened_dtype(x) is None  # fp32, outside autocast: never
