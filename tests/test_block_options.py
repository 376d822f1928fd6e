"""Modern block options (issue 21 #4): --mlp swiglu, --norm rmsnorm, --pos rope, --adam-beta2.

Off is the paper's DiT bit for bit (config, state dict, outputs); each option's modules, parameter
counts and flops (both counters); RoPE's closed-form properties; checkpoints round-trip; the trainer
takes the flags (and resumes exactly); bad input is one line, exit 2, nothing created."""
import math

import pytest
import torch
from torch import nn

from dits.cli import main
from dits.config import resolve_config
from dits.errors import UserError
from dits.models import DiTConfig, create_model
from dits.models.blocks import SwiGLU, swiglu_hidden
from dits.models.embeddings import apply_rope, rope_2d

TINY = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=1, num_classes=10)
OPTIONS = [dict(mlp="swiglu"), dict(norm="rmsnorm"), dict(pos="rope"), dict(mlp="swiglu", norm="rmsnorm", pos="rope")]
# what DiTConfig.to_dict held before the options (class-conditional): the keys of every old checkpoint
OLD_KEYS = {"input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
            "class_dropout_prob", "num_classes", "learn_sigma", "block"}


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("DiT", **{**TINY, **kw})


def inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([1, 500, 999][:n]), torch.tensor([0, 3, 10][:n])


def perturbed(model, seed=2):
    """Non-zero everywhere (the zero-initialised output layer would hide every difference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


# ------------------------------------------------------------------ off is the paper's model
@pytest.mark.parametrize("block", ["adaln-zero", "adaln", "cross-attn", "in-context"])
def test_defaults_are_bit_identical(block):
    old = tiny(block=block)
    explicit = tiny(block=block, mlp="gelu", norm="layernorm", pos="sincos", decoder_depth=0)
    assert set(old.config.to_dict()) == OLD_KEYS                      # configs and checkpoints as before
    assert DiTConfig.from_dict(old.config.to_dict()) == old.config == explicit.config
    a, b = old.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "pos_embed" in a and not any("w1" in k or "decoder" in k or "mask_token" in k for k in a)
    assert all(type(m) is not nn.RMSNorm for m in old.modules())
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(perturbed(old)(x, t, y), perturbed(explicit)(x, t, y))


def test_the_reference_layout_loads_strictly_and_reproduces_outputs():
    """The independent reference DiT (tests/_reference_dit.py): its state dict loads strictly into the
    default model and gives the same outputs; no option key has crept into the default layout."""
    import _reference_dit as official

    ref = official.randomised(official.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                                           num_heads=2, num_classes=10)).eval()
    model = tiny().eval()
    assert set(ref.state_dict()) == set(model.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), ref(x, t, y), atol=1e-5)


# ------------------------------------------------------------------ the options' modules
def test_swiglu_width_params_and_function():
    assert swiglu_hidden(384) == 1024 and swiglu_hidden(1152) == 3072 and swiglu_hidden(32) == 88
    for d in (384, 1152):  # 3 D h = 2 D 4D exactly at these widths: the same weights as the GELU MLP
        assert 3 * d * swiglu_hidden(d) == 2 * d * 4 * d
    with torch.device("meta"):
        gelu, swi = create_model("DiT-S/2"), create_model("DiT-S/2", mlp="swiglu")
    n_gelu, n_swi = (sum(p.numel() for p in m.parameters()) for m in (gelu, swi))
    assert abs(n_swi / n_gelu - 1) < 0.001
    torch.manual_seed(0)
    mlp = SwiGLU(32)
    for lin in (mlp.w1, mlp.w2, mlp.w3):
        nn.init.normal_(lin.bias)
    x = torch.randn(2, 5, 32)
    want = mlp.w3.weight @ (torch.nn.functional.silu(x @ mlp.w1.weight.T + mlp.w1.bias)
                            * (x @ mlp.w2.weight.T + mlp.w2.bias)).unsqueeze(-1)
    assert torch.allclose(mlp(x), want.squeeze(-1) + mlp.w3.bias, atol=1e-5)
    model = tiny(mlp="swiglu")
    assert {k.split(".")[-2] for k in model.state_dict() if k.startswith("blocks.") and ".mlp." in k} == {"w1", "w2", "w3"}


@pytest.mark.parametrize("block", ["adaln-zero", "adaln", "cross-attn", "in-context"])
def test_rmsnorm_replaces_every_layernorm_with_the_same_affine_flag(block):
    old, new = tiny(block=block), tiny(block=block, norm="rmsnorm")
    a = {n: m for n, m in old.named_modules() if isinstance(m, nn.LayerNorm)}
    b = {n: m for n, m in new.named_modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))}
    assert set(a) == set(b) and len(a) >= 3
    for name, ln in a.items():
        rms = b[name]
        assert type(rms) is nn.RMSNorm and rms.eps == 1e-6 and rms.elementwise_affine == ln.elementwise_affine
    x = torch.randn(4, 7, 32)
    rms = nn.RMSNorm(32, eps=1e-6, elementwise_affine=False)
    assert torch.allclose(rms(x), x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6), atol=1e-6)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o.values()))
@pytest.mark.parametrize("block", ["adaln-zero", "adaln", "cross-attn"])
def test_each_option_runs_learns_and_keeps_shapes(opts, block):
    model = tiny(block=block, **opts)
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == (3, 2, 8, 8) and torch.isfinite(out).all()
    assert ("pos_embed" in model.state_dict()) == (opts.get("pos", "sincos") == "sincos")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss = (model(x, t, y) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0 and all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------ RoPE
def test_rope_preserves_norms_and_is_the_identity_at_the_origin():
    cos, sin = rope_2d(16, 5)
    q = torch.randn(2, 3, 25, 16, dtype=torch.float64).float()
    r = apply_rope(q, (cos, sin))
    assert torch.allclose(r.norm(dim=-1), q.norm(dim=-1), rtol=1e-5)
    assert torch.equal(r[:, :, 0], q[:, :, 0])                      # token (0, 0): angle 0
    assert not torch.allclose(r[:, :, 1:], q[:, :, 1:])


def test_rope_scores_depend_only_on_the_relative_offset():
    """<R(p) q, R(p') k> = <q, R(p' - p) k> for 2-D positions p = (row, col): the closed form of a
    rotation per channel pair; so equal offsets give equal scores wherever the pair sits."""
    g, d = 6, 16
    cos, sin = rope_2d(d, g)
    torch.manual_seed(0)
    q, k = torch.randn(d), torch.randn(d)
    tokens = g * g
    rq = apply_rope(q.expand(1, 1, tokens, d).contiguous(), (cos, sin))[0, 0]
    rk = apply_rope(k.expand(1, 1, tokens, d).contiguous(), (cos, sin))[0, 0]
    scores = rq @ rk.T                                                # (T, T)
    pos = [(i // g, i % g) for i in range(tokens)]
    by_offset = {}
    for i, (ri, ci) in enumerate(pos):
        for j, (rj, cj) in enumerate(pos):
            by_offset.setdefault((rj - ri, cj - ci), []).append(float(scores[i, j]))
    assert len(by_offset) == (2 * g - 1) ** 2
    for vals in by_offset.values():
        assert max(vals) - min(vals) < 1e-4
    # and the value is <q, R(offset) k> computed from the angles directly
    quarter = d // 4
    freqs = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)

    def rotate(v, row, col):
        v = v.double().reshape(2, 2, quarter).clone()
        for axis, p in enumerate((row, col)):
            a = p * freqs
            x1, x2 = v[axis, 0].clone(), v[axis, 1].clone()
            v[axis, 0], v[axis, 1] = x1 * torch.cos(a) - x2 * torch.sin(a), x1 * torch.sin(a) + x2 * torch.cos(a)
        return v.reshape(-1)

    for (dr, dc), vals in list(by_offset.items())[::7]:
        assert abs(float(q.double() @ rotate(k, dr, dc)) - vals[0]) < 1e-4


def test_rope_model_has_no_pos_embed_and_sees_positions():
    model = perturbed(tiny(pos="rope"))
    assert "pos_embed" not in model.state_dict() and model.pos_embed is None
    x, t, y = inputs(1)
    flipped = torch.flip(x, dims=[3])
    with torch.no_grad():   # without positions the output would just be the flipped output
        assert not torch.allclose(model(flipped, t, y), torch.flip(model(x, t, y), dims=[3]), atol=1e-4)


def test_rope_refusals():
    with pytest.raises(UserError, match="in-context"):
        DiTConfig(**TINY, block="in-context", pos="rope")
    with pytest.raises(UserError, match="divisible by 4"):
        DiTConfig(**{**TINY, "hidden_size": 36, "num_heads": 6}, pos="rope")   # head width 6
    with pytest.raises(UserError, match="--mlp must be one of"):
        DiTConfig(**TINY, mlp="relu")


# ------------------------------------------------------------------ flops
def _norm_macs(cfg, per_element):
    tokens = cfg.num_tokens
    return (2 * cfg.depth + 1) * tokens * cfg.hidden_size * per_element


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4", "DiT-XL/2"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o.values()))
def test_both_counters_agree_within_one_percent(name, opts):
    from dits.flop_counter import count_flops as torch_count
    from dits.flops import count_flops

    with torch.device("meta"):
        base, model = create_model(name), create_model(name, **opts)
    hooks, torch_macs = count_flops(model), torch_count(model)
    assert abs(torch_macs / hooks - 1) < 0.01
    per = 3 if opts.get("norm") == "rmsnorm" else 4   # the only difference: the norms' fvcore term
    assert hooks - torch_macs == _norm_macs(model.config, per)
    # SwiGLU and RoPE change the count only by the MLP's width (RoPE's rotation is element-wise)
    cfg, d = model.config, model.config.hidden_size
    mlp = cfg.depth * cfg.num_tokens * (3 * d * swiglu_hidden(d) - 2 * d * 4 * d) if "mlp" in opts else 0
    norm = _norm_macs(cfg, per) - _norm_macs(cfg, 4)
    assert hooks - count_flops(base) == mlp + norm


def test_flops_cli_counts_the_options(capsys):
    import json

    assert main(["flops", "DiT-XL/2", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert main(["flops", "DiT-XL/2", "--mlp", "swiglu", "--norm", "rmsnorm", "--pos", "rope", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["params"] == base["params"] - 256 * 1152 + 28 * (2 * 3072 + 1152 - 4608 - 1152)  # no pos_embed
    assert abs(row["gflops"] / base["gflops"] - 1) < 0.001
    assert main(["flops", "DiT-XL/2", "--counter", "torch", "--mlp", "swiglu", "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["gflops"] / base["gflops"] - 1) < 0.01


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o.values()))
def test_checkpoint_round_trip(tmp_path, opts):
    from dits.checkpoint import load_model, save_model

    model = perturbed(tiny(**opts))
    save_model(tmp_path / "m.pt", model)
    back, _ = load_model(tmp_path / "m.pt")
    assert back.config == model.config and {k: opts[k] for k in opts} == {k: back.config.to_dict()[k] for k in opts}
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(back(x, t, y), model(x, t, y))


def test_diffusers_export_refuses_the_options():
    from dits.interop.diffusers import diffusers_config

    with pytest.raises(UserError, match="mlp='swiglu'"):
        diffusers_config(DiTConfig(**TINY, mlp="swiglu"))


# ------------------------------------------------------------------ the trainer
OPT_TINY = dict(objective="diffusion", model="DiT", depth=1, hidden_size=32, num_heads=2, patch_size=2, batch_size=8, lr=1e-3,
                warmup_steps=0, grad_clip=1.0, ema_decay=0.9, log_every=2, ckpt_every=2, sample_every=100,
                sampler="ddim", sample_steps=2, samples_per_class=1, eval_samples=0, seed=5, plan="eager",
                mlp="swiglu", norm="rmsnorm", pos="rope", adam_beta2=0.95)


def test_training_with_the_options_resumes_exactly_and_samples(tmp_path):
    from dits.checkpoint import load_checkpoint, load_model
    from dits.train import train

    train(resolve_config("digits", {**OPT_TINY, "steps": 4, "out": str(tmp_path / "a")}), progress=False)
    train(resolve_config("digits", {**OPT_TINY, "steps": 2, "out": str(tmp_path / "b")}), progress=False)
    train(resolve_config(None, {"steps": 4}), resume=str(tmp_path / "b"), progress=False, typed={"steps"})
    a = load_checkpoint(tmp_path / "a/checkpoints/0000004.pt")
    b = load_checkpoint(tmp_path / "b/checkpoints/0000004.pt")
    assert a["model_config"]["mlp"] == "swiglu" and a["model_config"]["norm"] == "rmsnorm"
    assert a["model_config"]["pos"] == "rope" and a["train_config"]["adam_beta2"] == 0.95
    assert all(g["betas"] == (0.9, 0.95) or list(g["betas"]) == [0.9, 0.95] for g in a["opt"]["param_groups"])
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    model, _ = load_model(tmp_path / "a")
    from dits.objectives import sample
    with torch.no_grad():
        x = sample(model, (2, 1, 8, 8), sampler="ddim", steps=2, y=torch.tensor([1, 2]), seed=0)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_default_optimiser_is_torchs_adamw():
    from dits.config import TrainConfig
    from dits.speed import adamw

    assert TrainConfig().adam_beta2 == 0.999
    opt = adamw([nn.Parameter(torch.zeros(2))], 1e-4, 0.0, torch.device("cpu"))
    assert tuple(opt.param_groups[0]["betas"]) == (0.9, 0.999)


# ------------------------------------------------------------------ bad input
BAD = [
    (["--mlp", "relu"], "--mlp must be one of gelu, swiglu"),
    (["--norm", "batchnorm"], "--norm must be one of layernorm, rmsnorm"),
    (["--pos", "learned"], "--pos must be one of sincos, rope"),
    (["--pos", "rope", "--block", "in-context"], "in-context block's condition tokens"),
    (["--pos", "rope", "--hidden-size", "36", "--num-heads", "6"], "divisible by 4"),
    (["--adam-beta2", "1.0"], "--adam-beta2 must be in [0, 1)"),
    (["--backbone", "unet", "--mlp", "swiglu"], "--mlp describes a DiT"),
    (["--backbone", "unet", "--pos", "rope"], "--pos describes a DiT"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(refuses, argv, needle):
    refuses(["train", *argv, "--steps", "2", "--out", "new"], needle)
