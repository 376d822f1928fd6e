"""DiT model family: closed forms, invariants, reference layout, parameter counts."""
import math

import pytest
import torch

from dits.errors import UserError
from dits.models import DiT_models, MODEL_NAMES, create_model
from dits.models.blocks import Attention
from dits.models.embeddings import sincos_2d, timestep_embedding


def tiny(**kw):
    args = dict(depth=2, hidden_size=32, num_heads=4, patch_size=2, input_size=8, in_channels=3, num_classes=5)
    args.update(kw)
    return create_model("DiT", **args)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


# ----------------------------------------------------------------- embeddings
def test_sincos_2d_values_at_known_positions():
    d, g = 16, 3
    pe = sincos_2d(d, g)
    assert pe.shape == (g * g, d)
    omega = [1 / 10000 ** (k / (d / 4)) for k in range(d // 4)]
    for row in range(g):
        for col in range(g):
            tok = pe[row * g + col]
            # first half: the column coordinate, [sin | cos]; second half: the row.
            for k, w in enumerate(omega):
                assert tok[k] == pytest.approx(math.sin(col * w), abs=1e-12)
                assert tok[d // 4 + k] == pytest.approx(math.cos(col * w), abs=1e-12)
                assert tok[d // 2 + k] == pytest.approx(math.sin(row * w), abs=1e-12)
                assert tok[3 * d // 4 + k] == pytest.approx(math.cos(row * w), abs=1e-12)


def test_pos_embed_is_fixed_and_in_state_dict():
    m = tiny()
    assert not m.pos_embed.requires_grad
    assert m.state_dict()["pos_embed"].shape == (1, 16, 32)
    assert torch.allclose(m.pos_embed[0], torch.from_numpy(sincos_2d(32, 4)).float())


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 17.0, 999.0])
    emb = timestep_embedding(t, 256)
    k = torch.arange(128, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000) * k / 128)
    args = t.double()[:, None] * freqs
    expected = torch.cat([torch.cos(args), torch.sin(args)], 1)
    assert emb.shape == (4, 256)
    assert torch.allclose(emb.double(), expected, atol=2e-4)  # float32 of args up to ~1000 rad
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))


# ----------------------------------------------------------------- structure
def test_init_adaln_zero_blocks_are_identity_and_output_is_zero():
    m = tiny()
    m.eval()
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 1, 2, 4])
    tokens = m.x_embedder(x) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y, False)
    for blk in m.blocks:
        assert torch.equal(blk(tokens, c), tokens)
    out = m(x, t, y)
    assert out.shape == (4, 6, 8, 8)
    assert torch.count_nonzero(out) == 0


def test_patch_embedding_tokens_are_the_conv_in_token_order_and_contiguous():
    """Token (row r, col c) of image i is the stride-p conv's output at (r, c); the tokens are
    laid out row after row (contiguous), so the residual stream every block adds to is too
    (a strided view here made every LayerNorm and residual kernel downstream read across strides)."""
    m = tiny()
    x = torch.randn(2, 3, 8, 8)
    tokens = m.x_embedder(x)
    w, b = m.x_embedder.proj.weight, m.x_embedder.proj.bias
    # patchify's (p, p, C) patches reordered to (C, p, p), the order of the conv weight's flattening
    patches = m.patchify(x).reshape(2, 16, 2, 2, 3).permute(0, 1, 4, 2, 3).reshape(2, 16, 3 * 2 * 2)
    expected = patches.double() @ w.reshape(w.shape[0], -1).double().T + b.double()
    assert tokens.shape == (2, 16, w.shape[0])
    assert torch.allclose(tokens.double(), expected, atol=1e-5)
    assert tokens.is_contiguous()
    assert (m.x_embedder(x) + m.pos_embed).is_contiguous()


def test_patchify_unpatchify_round_trip():
    m = tiny(learn_sigma=False)
    x = torch.randn(2, 3, 8, 8)
    tokens = m.patchify(x)
    assert tokens.shape == (2, 16, 2 * 2 * 3)
    assert torch.equal(m.unpatchify(tokens), x)
    # token (row 1, col 2) holds pixels x[:, :, 2:4, 4:6], channel-last within the patch
    patch = tokens[0, 1 * 4 + 2].reshape(2, 2, 3)
    assert torch.equal(patch.permute(2, 0, 1), x[0, :, 2:4, 4:6])


def test_sdpa_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    attn = Attention(32, 4).double()
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    n, t, d = x.shape
    q, k, v = attn.qkv(x).reshape(n, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    expected = attn.proj((w @ v).transpose(1, 2).reshape(n, t, d))
    assert torch.allclose(attn(x), expected, atol=1e-12)


@pytest.mark.parametrize("block", ["adaln-zero", "adaln", "cross-attn", "in-context"])
def test_all_block_designs_run_and_learn(block):
    torch.manual_seed(0)
    m = tiny(block=block)
    x, t, y = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 5, (4,))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    target = torch.randn(4, 6, 8, 8)
    losses = []
    for _ in range(5):
        loss = (m(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not m.pos_embed.requires_grad


def test_label_dropout_uses_null_row_num_classes():
    m = tiny(num_classes=7, class_dropout_prob=0.5)
    assert m.y_embedder.embedding_table.weight.shape[0] == 8
    torch.manual_seed(0)
    emb = m.y_embedder(torch.zeros(2000, dtype=torch.long), train=True)
    null = m.y_embedder.embedding_table.weight[7]
    frac = (emb == null).all(dim=1).float().mean().item()
    assert 0.45 < frac < 0.55
    assert tiny(class_dropout_prob=0.0).y_embedder.embedding_table.weight.shape[0] == 5


def test_unconditional_model_needs_no_labels():
    m = randomize(tiny(num_classes=0))
    assert not any(k.startswith("y_embedder") for k in m.state_dict())
    out = m(torch.randn(2, 3, 8, 8), torch.tensor([3, 4]))
    assert out.shape == (2, 6, 8, 8)


def test_cfg_scale_one_equals_conditional_output_and_guides_eps_only():
    m = randomize(tiny()).eval()
    x = torch.randn(3, 3, 8, 8)
    xx = torch.cat([x, x])
    t = torch.tensor([5, 70, 400, 5, 70, 400])
    y = torch.tensor([0, 1, 2, 5, 5, 5])  # conditional half, then null labels
    cond = m(xx, t, y)
    # guidance scale 1 gives the conditional prediction (for the half that is kept)
    assert torch.allclose(m.forward_with_cfg(xx, t, y, 1.0)[:3], cond[:3], atol=1e-6)
    out = m.forward_with_cfg(xx, t, y, 4.0)
    eps_c, eps_u = cond[:3, :3], cond[3:, :3]
    assert torch.allclose(out[:3, :3], eps_u + 4.0 * (eps_c - eps_u), atol=1e-5)
    assert torch.equal(out[:, 3:], cond[:, 3:])  # variance channels never guided
    quirk = m.forward_with_cfg(xx, t, y, 4.0, guided_channels=2)
    assert torch.allclose(quirk[:3, :2], out[:3, :2]) and torch.equal(quirk[:, 2:], cond[:, 2:])


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.03), (torch.float16, 0.006)])
def test_low_precision_forward_is_the_fp32_function(dtype, tol):
    """The model cast to bf16 / fp16 computes the fp32 function within that format's precision:
    max error relative to the output's scale under ~8 (bf16) or ~11 (fp16) bits of mantissa."""
    import _reference_dit as official

    m = randomize(tiny()).eval()
    ref = official.DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=5)
    ref.load_state_dict(m.state_dict())  # the independent reference's forward, in float64
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([1, 2, 300, 999]), torch.tensor([0, 1, 4, 5])
    with torch.no_grad():
        want = ref.double()(x.double(), t, y)
        torch.testing.assert_close(m(x, t, y).double(), want, rtol=1e-4, atol=1e-5)  # fp32 itself
        low = m.to(dtype)(x.to(dtype), t, y)
    assert low.dtype == dtype
    err = float((low.double() - want).abs().max() / want.abs().max())
    assert err < tol, err


# ----------------------------------------------------------------- reference layout
def reference_keys(depth, conditional=True):
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
            "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
            "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    if conditional:
        keys.add("y_embedder.embedding_table.weight")
    for i in range(depth):
        for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    return keys


def test_state_dict_has_exactly_the_reference_keys_and_shapes():
    with torch.device("meta"):
        m = create_model("DiT-XL/2")
    sd = m.state_dict()
    assert set(sd) == reference_keys(28)
    D = 1152
    assert sd["pos_embed"].shape == (1, 256, D)
    assert sd["x_embedder.proj.weight"].shape == (D, 4, 2, 2)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, D)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (6 * D, D)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 8, D)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (2 * D, D)


def test_strict_load_of_reference_state_dict_reproduces_outputs():
    src = randomize(tiny(), seed=3)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    assert set(sd) == reference_keys(2)
    dst = tiny()
    dst.load_state_dict(sd, strict=True)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 900]), torch.tensor([3, 0])
    assert torch.equal(src.eval()(x, t, y), dst.eval()(x, t, y))


PARAMS = {"DiT-S/2": 32_963_360, "DiT-B/2": 130_512_416, "DiT-L/2": 458_102_816, "DiT-XL/2": 675_129_632}


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts(name):
    with torch.device("meta"):
        m = create_model(name)
    assert sum(p.numel() for p in m.parameters()) == PARAMS[name]


def test_twelve_names_and_reference_dict():
    assert len(MODEL_NAMES) == 12 and set(DiT_models) == set(MODEL_NAMES)
    with torch.device("meta"):
        m = DiT_models["DiT-B/4"](input_size=16, num_classes=10)
    assert (m.config.depth, m.config.hidden_size, m.config.num_heads, m.config.patch_size) == (12, 768, 12, 4)
    assert m.y_embedder.embedding_table.weight.shape[0] == 11
    assert create_model("DiT-XL-2", depth=1).config.hidden_size == 1152  # hyphen alias


# ----------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors():
    with pytest.raises(UserError, match="valid names"):
        create_model("DiT-M/2")
    with pytest.raises(ValueError, match="not divisible by patch size"):
        create_model("DiT-S/8", input_size=28)
    with pytest.raises(ValueError, match="unknown block"):
        tiny(block="film")
    m = tiny()
    with pytest.raises(ValueError, match=r"\(N, 3, 8, 8\)"):
        m(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be in 0..5"):
        m(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="class-conditional"):
        m(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
