"""Masked training (issue 21 #3, MaskDiT): the kept tokens and their positions, the decoder's full
sequence, the split loss in closed form, R = 0 and the unmasked tail are the plain step bit for bit,
flops of the masked step, exact resume, sampling unmasked, bad input."""
import json

import pytest
import torch

from dits.cli import main
from dits.config import resolve_config
from dits.masking import DEFAULT_DECODER_DEPTH, Masking, TokenMask, draw_keep
from dits.models import create_model
from dits.objectives import create_objective

TINY = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=1, num_classes=10)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model("DiT", **{**TINY, "decoder_depth": 2, **kw})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero everywhere: the zero-initialised layers would hide mistakes
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([1, 500, 999][:n]), torch.tensor([0, 3, 10][:n])


# ------------------------------------------------------------------ which tokens
def test_draw_keep_is_a_sorted_random_subset_of_equal_size():
    keep = draw_keep(200, 16, 6, torch.Generator().manual_seed(0))
    assert keep.shape == (200, 6) and keep.dtype == torch.long
    assert (keep[:, 1:] > keep[:, :-1]).all() and keep.min() >= 0 and keep.max() < 16   # distinct, in order
    again = draw_keep(200, 16, 6, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)                                                      # the generator decides
    counts = torch.bincount(keep.flatten(), minlength=16).float()
    assert counts.min() > 0.6 * counts.mean()                                            # every position drawn
    m = Masking(0.5, 0.1, num_tokens=16, patch_size=2, steps=10, unmask_steps=3)
    assert m.kept == 8 and [m.active(s) for s in range(10)] == [True] * 7 + [False] * 3
    assert m.draw(7, 4, torch.Generator()) is None and m.draw(6, 4, torch.Generator()).shape == (4, 8)
    assert Masking(0.95, 0.1, 16, 2, 10).kept == 1   # int(T (1 - R)), at least one token


@pytest.mark.parametrize("pos", ["sincos", "rope"])
@pytest.mark.parametrize("block", ["adaln-zero", "adaln", "cross-attn"])
def test_encoder_sees_the_kept_tokens_at_their_positions_and_the_decoder_restores_them(block, pos):
    model = tiny(block=block, pos=pos)
    x, t, y = inputs()
    keep = draw_keep(3, 16, 5, torch.Generator().manual_seed(2))
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("enc", a))
    model.blocks[-1].register_forward_hook(lambda m, a, out: seen.setdefault("enc_out", out))
    model.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("dec", a))
    with torch.no_grad():
        out = model(x, t, y, mask_keep=keep)
        full = model.x_embedder(x) + (model.pos_embed if model.pos_embed is not None else 0)
    assert out.shape == (3, 2, 8, 8)
    enc_in, dec_in = seen["enc"][0], seen["dec"][0]
    assert enc_in.shape == (3, 5, 32)                                          # the encoder's 5 tokens ...
    assert torch.equal(enc_in, full[torch.arange(3)[:, None], keep])          # ... are those at `keep`
    if pos == "rope":   # ... and so are their rotation angles
        rope = seen["enc"][4]
        cos_full, _ = model._rope(x.device)
        assert torch.equal(rope[0], cos_full[0][keep])
    assert dec_in.shape == (3, 16, 32)                                         # the decoder's full sequence
    add = model.pos_embed[0] if model.pos_embed is not None else torch.zeros(16, 32)
    for i in range(3):
        dropped = [j for j in range(16) if j not in keep[i].tolist()]
        assert torch.allclose(dec_in[i, keep[i]], seen["enc_out"][i] + add[keep[i]])
        assert torch.allclose(dec_in[i, dropped], model.mask_token[0, 0] + add[dropped])


def test_keeping_every_token_is_the_unmasked_forward_bit_for_bit():
    model = tiny(pos="rope")
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask_keep=torch.arange(16).expand(3, 16)), model(x, t, y))


def test_mask_keep_needs_a_decoder():
    from dits.errors import UserError

    torch.manual_seed(0)
    plain = create_model("DiT", **TINY)
    x, t, y = inputs()
    assert plain.decoder_blocks is None and not any("decoder" in k for k in plain.state_dict())
    with pytest.raises(UserError, match="decoder"):
        plain(x, t, y, mask_keep=torch.arange(4).expand(3, 4))


# ------------------------------------------------------------------ the loss
class Fixed(torch.nn.Module):
    """A 'model' with a fixed output that records the kwargs it was called with."""

    def __init__(self, out):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x, t, y=None, mask_keep=None, force_drop_ids=None):
        self.calls.append(mask_keep)
        return self.out


def test_masked_loss_in_closed_form():
    torch.manual_seed(0)
    n, p = 2, 2
    x0, noise = torch.randn(n, 1, 8, 8), torch.randn(n, 1, 8, 8)
    out = torch.randn(n, 2, 8, 8)
    t = torch.tensor([10, 700])
    keep = torch.tensor([[0, 3, 5, 6, 9, 10, 12, 15], [1, 2, 4, 7, 8, 11, 13, 14]])
    masking = Masking(0.5, 0.1, num_tokens=16, patch_size=p, steps=10)
    obj = create_objective("diffusion", masking=masking)
    net = Fixed(out)
    terms = obj.training_losses(net, x0, t, model_kwargs={"mask_keep": keep}, noise=noise)
    assert torch.equal(net.calls[0], keep)                                     # the model drops the same tokens
    abar = torch.as_tensor(obj.diffusion.alphas_cumprod, dtype=torch.float32)[t].view(n, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    for i in range(n):
        vis_err, mae = [], []
        for tok in range(16):
            r, c = divmod(tok, 4)
            sl = (i, 0, slice(r * p, r * p + p), slice(c * p, c * p + p))
            if tok in keep[i]:
                vis_err.append(((noise[sl] - out[sl]) ** 2).flatten())
            else:
                target = x_t[sl].flatten()
                target = (target - target.mean()) / (target.var(correction=0) + 1e-6) ** 0.5
                mae.append(((out[sl].flatten() - target) ** 2).mean())
        assert torch.allclose(terms["mse"][i], torch.cat(vis_err).mean(), atol=1e-6)
        assert torch.allclose(terms["mae"][i], torch.stack(mae).mean(), atol=1e-6)
    # the VLB term is the plain one restricted to the visible pixels
    vis = TokenMask(keep, 16, p, 1)
    plain = obj.diffusion.vb_terms_bpd(lambda *a, **k: torch.cat([out[:, :1].detach(), out[:, 1:]], 1), x0, x_t, t,
                                       clip_denoised=False, reduce=vis.mean_visible)["output"]
    assert torch.allclose(terms["vb"], plain)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"] + 0.1 * terms["mae"])


def test_flow_masked_loss_visible_velocity_plus_mae():
    torch.manual_seed(1)
    x0, noise, out = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    keep = draw_keep(2, 16, 4, torch.Generator().manual_seed(3))
    obj = create_objective("flow", masking=Masking(0.75, 0.3, 16, 2, 10))
    terms = obj.training_losses(Fixed(out), x0, torch.tensor([0.2, 0.9]), model_kwargs={"mask_keep": keep}, noise=noise)
    vis = TokenMask(keep, 16, 2, 1)
    assert torch.allclose(terms["mse"], vis.mean_visible(((noise - x0) - out) ** 2))
    assert torch.allclose(terms["loss"], terms["mse"] + 0.3 * terms["mae"])


def test_unmasked_steps_are_the_plain_step_bit_for_bit():
    """R = 0 (no masking configured) and a masked run's unmasked tail compute the same loss as the
    plain objective on the same model; keeping every token differs only in float rounding."""
    model = tiny()
    x0, t, y = inputs()
    noise = torch.randn_like(x0)
    kw = {"y": y}
    plain = create_objective("diffusion").training_losses(model, x0, t, model_kwargs=kw, noise=noise)
    masking = Masking(0.5, 0.1, 16, 2, steps=10, unmask_steps=2)
    tail = create_objective("diffusion", masking=masking).training_losses(model, x0, t, model_kwargs=kw, noise=noise)
    assert all(torch.equal(plain[k], tail[k]) for k in plain) and torch.equal(tail["mae"], torch.zeros(3))
    every = create_objective("diffusion", masking=masking).training_losses(
        model, x0, t, model_kwargs={**kw, "mask_keep": torch.arange(16).expand(3, 16)}, noise=noise)
    assert torch.allclose(every["loss"], plain["loss"], rtol=1e-5) and torch.equal(every["mae"], torch.zeros(3))


def test_mask_ratio_zero_builds_todays_model():
    from dits.train.loop import build_model

    base = dict(model="DiT", depth=2, hidden_size=32, num_heads=2, patch_size=2)
    torch.manual_seed(5)
    a = build_model(resolve_config("digits", base), 1, 8, 10)
    torch.manual_seed(5)
    b = build_model(resolve_config("digits", {**base, "mask_ratio": 0.0}), 1, 8, 10)
    assert list(a.state_dict()) == list(b.state_dict()) and all(torch.equal(v, b.state_dict()[k])
                                                               for k, v in a.state_dict().items())
    assert a.config.to_dict() == b.config.to_dict() and "decoder_depth" not in a.config.to_dict()
    assert Masking.for_run(resolve_config("digits", {**base, "mask_ratio": 0.0}), a.config) is None
    torch.manual_seed(5)
    c = build_model(resolve_config("digits", {**base, "mask_ratio": 0.5}), 1, 8, 10)
    assert c.config.decoder_depth == DEFAULT_DECODER_DEPTH and len(c.decoder_blocks) == DEFAULT_DECODER_DEPTH


# ------------------------------------------------------------------ flops
def test_masked_step_flops_in_closed_form_and_both_counters():
    from dits.flop_counter import count_flops as torch_count
    from dits.flops import count_flops

    with torch.device("meta"):
        model = create_model("DiT-S/2", decoder_depth=2)
    cfg = model.config
    d, t, k = cfg.hidden_size, cfg.num_tokens, int(cfg.num_tokens * 0.25)
    full, masked = count_flops(model), count_flops(model, mask_ratio=0.75)
    # per encoder block and token: qkv + proj + MLP = 12 D^2, two LayerNorms 8 D; attention 2 T^2 D per block
    assert full - masked == cfg.depth * (12 * d * d * (t - k) + 2 * d * (t * t - k * k) + 8 * d * (t - k))
    assert abs(torch_count(model, mask_ratio=0.75) / masked - 1) < 0.01
    with torch.device("meta"):
        plain = create_model("DiT-S/2")
    # sampling: each decoder block is one more full block (its adaLN Linear D -> 6D on c: 6 D^2)
    assert full - count_flops(plain) == 2 * (12 * d * d * t + 2 * d * t * t + 8 * d * t + 6 * d * d)


def test_flops_cli_prints_the_masked_step(capsys):
    assert main(["flops", "DiT-XL/2", "--mask-ratio", "0.5", "--mask-decoder-depth", "8"]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if "masked training step (R=0.5)" in ln]
    assert len(line) == 1 and "sampling (all tokens, encoder + decoder)" in line[0]
    assert main(["flops", "DiT-XL/2", "--mask-ratio", "0.5", "--mask-decoder-depth", "8", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["masked_gflops"] < 0.65 * row["gflops"] and row["gflops"] > 118.69   # + an 8-block decoder
    assert main(["flops", "DiT-XL/2", "--counter", "torch", "--mask-ratio", "0.5", "--json"]) == 0
    row_t = json.loads(capsys.readouterr().out)
    assert row_t["masked_gflops"] < row_t["gflops"]


# ------------------------------------------------------------------ training
MTINY = dict(objective="diffusion", model="DiT", depth=1, hidden_size=32, num_heads=2, patch_size=2, batch_size=8, lr=1e-3,
             warmup_steps=0, grad_clip=1.0, ema_decay=0.9, log_every=1, ckpt_every=3, sample_every=100,
             sampler="ddim", sample_steps=2, samples_per_class=1, eval_samples=0, seed=7, plan="eager",
             mask_ratio=0.5, mask_decoder_depth=1, unmask_steps=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dits.train import train

    root = tmp_path_factory.mktemp("masked")
    train(resolve_config("digits", {**MTINY, "steps": 6, "out": str(root / "straight")}), progress=False)
    train(resolve_config("digits", {**MTINY, "steps": 3, "unmask_steps": 0, "out": str(root / "resumed")}),
          progress=False)
    train(resolve_config(None, {"steps": 6, "unmask_steps": 2}), resume=str(root / "resumed"), progress=False,
          typed={"steps", "unmask_steps"})
    return root


def test_masked_run_resumes_exactly(runs):
    from dits.checkpoint import load_checkpoint

    a = load_checkpoint(runs / "straight/checkpoints/0000006.pt")
    b = load_checkpoint(runs / "resumed/checkpoints/0000006.pt")
    assert a["model_config"]["decoder_depth"] == 1 and a["train_config"]["mask_ratio"] == 0.5
    assert "mask_token" in a["model"] and any(k.startswith("decoder_blocks.0.") for k in a["model"])
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    log = [json.loads(ln) for ln in (runs / "straight/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(r["mae"] > 0 for r in log[:4]) and all(r["mae"] == 0 for r in log[4:])   # the unmasked tail


def test_sampling_is_unmasked(runs):
    from dits.checkpoint import load_model
    from dits.objectives import sample

    model, _ = load_model(runs / "straight")
    assert model.config.decoder_depth == 1
    lengths = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    with torch.no_grad():
        x = sample(model, (2, 1, 8, 8), sampler="ddim", steps=2, y=torch.tensor([1, 2]), seed=0)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and set(lengths) == {16}


def test_masked_step_drops_tokens_through_the_trainer(tmp_path):
    """The trainer's step puts R of the tokens out of the encoder's sight (the step-time saving)."""
    from dits.train import train
    from dits.train import loop

    lengths = []
    real = loop.train_step

    def spy(parts, step, x, t, kwargs, noise):
        lengths.append(kwargs.get("mask_keep").shape if "mask_keep" in kwargs else None)
        return real(parts, step, x, t, kwargs, noise)

    loop.train_step = spy
    try:
        train(resolve_config("digits", {**MTINY, "mask_ratio": 0.75, "steps": 3, "unmask_steps": 1,
                                        "out": str(tmp_path / "r")}), progress=False)
    finally:
        loop.train_step = real
    assert lengths == [(8, 4), (8, 4), None]


# ------------------------------------------------------------------ bad input
BAD = [
    (["--mask-ratio", "1"], "--mask-ratio must be in [0, 1)"),
    (["--mask-ratio", "-0.1"], "--mask-ratio must be in [0, 1)"),
    (["--mask-ratio", "0.5", "--block", "in-context"], "does not support --block in-context"),
    (["--mask-ratio", "0.5", "--unmask-steps", "3"], "more than the run's --steps 2"),
    (["--mask-ratio", "0.5", "--mask-decoder-depth", "0"], "--mask-decoder-depth must be >= 1"),
    (["--mask-ratio", "0.5", "--mask-loss-weight", "-1"], "--mask-loss-weight must be"),
    (["--backbone", "unet", "--mask-ratio", "0.5"], "--mask-ratio describes a DiT"),
    (["--text-encoder", "learned", "--captions", "digits", "--mask-ratio", "0.5"], "drop it for a text run"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(refuses, argv, needle):
    refuses(["train", *argv, "--steps", "2", "--out", "new"], needle)


def test_flops_bad_mask_ratio(capsys):
    assert main(["flops", "DiT-S/2", "--mask-ratio", "1.5"]) == 2
    assert "--mask-ratio must be in [0, 1)" in capsys.readouterr().err


def test_grad_checkpoint_gives_the_same_gradients_through_encoder_and_decoder():
    model = tiny(pos="rope").train()
    x, t, y = inputs()
    keep = draw_keep(3, 16, 8, torch.Generator().manual_seed(4))
    grads = []
    for recompute in (False, True):
        model.grad_checkpoint = recompute
        model.zero_grad()
        model(x, t, y, mask_keep=keep, force_drop_ids=torch.zeros(3, dtype=torch.bool)).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "mask_token" in grads[0]
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
