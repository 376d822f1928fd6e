"""The trainer's arithmetic against its formulas: the EMA update and its warm-up, the linear
learning-rate warm-up, gradient clipping, AdamW's step, fp16's grad scaler; each alone and
read back from a real run's checkpoints and log. Also: retention milestones through the
trainer, and pixel-folder training through a VAE with --vae-scale (no latent cache)."""
import json
import math

import numpy as np
import pytest
import torch

from dits.checkpoint import load_checkpoint
from dits.config import TrainConfig, resolve_config
from dits.train import train
from dits.train.loop import clip_grads, ema_decay_at, grad_norm, lr_at, update_ema
from test_train import TINY


def tiny_net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))


# ------------------------------------------------------------------ the formulas alone
def test_ema_decay_warm_up_is_min_of_decay_and_one_plus_s_over_ten_plus_s():
    cfg = TrainConfig(ema_decay=0.999, ema_warmup=True)
    for s, want in ((0, 0.1), (1, 2 / 11), (8, 0.5), (90, 0.91), (990, 0.991)):
        assert ema_decay_at(cfg, s) == pytest.approx(want, rel=1e-12), s
    assert ema_decay_at(cfg, 10_000) == 0.999  # (1 + s) / (10 + s) = 0.9991 > 0.999: capped
    assert all(ema_decay_at(TrainConfig(ema_decay=0.999), s) == 0.999 for s in (0, 1, 10, 10_000))


def test_update_ema_is_decay_times_ema_plus_one_minus_decay_times_model():
    ema, model = tiny_net(0), tiny_net(1)
    before = {k: v.double().clone() for k, v in ema.state_dict().items()}
    src = {k: v.double() for k, v in model.state_dict().items()}
    update_ema(ema, model, 0.75)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v.double(), 0.75 * before[k] + 0.25 * src[k], rtol=1e-6, atol=1e-7, msg=k)
        assert (v.double() - before[k]).abs().max() > 1e-3, k  # the weights did move
    update_ema(ema, model, 0.0)  # decay 0: a copy of the model
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=1e-7)


def test_learning_rate_warms_up_linearly_then_stays():
    cfg = TrainConfig(lr=2e-3, warmup_steps=4, steps=100)
    assert [lr_at(cfg, s) for s in range(6)] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3], rel=1e-12)
    assert lr_at(cfg, 99) == 2e-3
    assert lr_at(TrainConfig(lr=2e-3, warmup_steps=0, steps=100), 0) == 2e-3


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 100.0])
def test_clip_grads_returns_the_total_norm_and_scales_to_max_norm(max_norm):
    net = tiny_net(2)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in net.parameters()]
    for p, gr in zip(net.parameters(), grads):
        p.grad = gr.clone()
    norm = math.sqrt(sum(float((gr.double() ** 2).sum()) for gr in grads))
    got = grad_norm(net)
    assert float(got) == pytest.approx(norm, rel=1e-6)
    assert clip_grads(net, max_norm, got) == (0 < max_norm < norm)
    factor = max_norm / (norm + 1e-6) if 0 < max_norm < norm else 1.0
    for p, gr in zip(net.parameters(), grads):
        torch.testing.assert_close(p.grad, gr * factor, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("max_norm", [0.5, 2.0, 100.0])
def test_clip_grads_gives_clip_grad_norm_s_bits_and_skips_only_a_factor_of_one(max_norm):
    """torch's clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)) on every step; the
    trainer's clip multiplies only when that factor is under 1. Both must leave the same bits."""
    torch.manual_seed(0)
    ours, theirs = tiny_net(2), tiny_net(2)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        a.grad = torch.randn(a.shape)
        b.grad = a.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    clipped = clip_grads(ours, max_norm, grad_norm(ours))
    assert clipped == (float(norm) > max_norm)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad)


# ------------------------------------------------------------------ the same, read back from a run
STEPS, WARMUP, CLIP, DECAY, LR = 7, 5, 1.45, 0.3, 1e-3
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch's AdamW defaults, which the trainer uses


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("math-run")
    cfg = resolve_config("digits", {**TINY, "out": str(out), "steps": STEPS, "ckpt_every": 1, "log_every": 1,
                                    "warmup_steps": WARMUP, "grad_clip": CLIP, "ema_decay": DECAY, "lr": LR,
                                    "ema_warmup": True, "sample_every": 1000})
    train(cfg, progress=False)
    cks = {k: load_checkpoint(out / "checkpoints" / f"{k:07d}.pt") for k in range(1, STEPS + 1)}
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return cks, {r["step"]: r for r in log}


def _lr(s):
    return LR * (s + 1) / WARMUP if s < WARMUP else LR


def test_logged_lr_is_the_warm_up_formula(run):
    _, log = run
    assert [log[k]["lr"] for k in range(1, STEPS + 1)] == pytest.approx([_lr(k - 1) for k in range(1, STEPS + 1)])


def test_each_adamw_step_used_the_warm_up_lr(run):
    """theta_k - theta_(k-1) = -lr_(k-1) * m_hat / (sqrt(v_hat) + eps), with m_hat = m / (1 - b1^k),
    v_hat = v / (1 - b2^k) read from checkpoint k (weight decay 0): each step's lr, and the
    off-by-one alternative lr_k visibly does not fit during the warm-up."""
    cks, _ = run
    for k in range(2, STEPS + 1):
        prev, cur = cks[k - 1], cks[k]
        for name, st in cur["opt"]["state"].items():
            assert int(st["step"]) == k
            m_hat = st["exp_avg"].double() / (1 - BETA1 ** k)
            v_hat = st["exp_avg_sq"].double() / (1 - BETA2 ** k)
            direction = m_hat / (v_hat.sqrt() + EPS)
            delta = cur["model"][name].double() - prev["model"][name].double()
            torch.testing.assert_close(delta, -_lr(k - 1) * direction, rtol=2e-3, atol=2e-8, msg=f"{name} step {k}")
            if name == "final_layer.linear.weight" and k < WARMUP:  # lr_(k-1) < lr_k
                wrong = -_lr(k) * direction
                assert (delta - wrong).abs().max() > 1e-5, k


def test_gradients_were_clipped_to_the_max_norm(run):
    """The clipped gradient g_k = (m_k - b1 m_(k-1)) / (1 - b1) from the AdamW state has norm
    min(|g|, max_norm), |g| the logged (pre-clipping) norm; this run has steps on both sides."""
    cks, log = run
    clipped = []
    for k in range(1, STEPS + 1):
        norm2 = 0.0
        for name, st in cks[k]["opt"]["state"].items():
            m_prev = cks[k - 1]["opt"]["state"][name]["exp_avg"].double() if k > 1 else 0.0
            norm2 += float((((st["exp_avg"].double() - BETA1 * m_prev) / (1 - BETA1)) ** 2).sum())
        raw = log[k]["grad_norm"]
        assert math.sqrt(norm2) == pytest.approx(min(raw, CLIP), rel=2e-3), (k, raw)
        clipped.append(raw > CLIP)
    assert any(clipped) and not all(clipped), [log[k]["grad_norm"] for k in log]


def test_ema_follows_its_warm_up_recursion(run):
    """ema_k = d * ema_(k-1) + (1 - d) * theta_k with d = min(0.3, (1 + s) / (10 + s)) at step s = k - 1:
    warm-up values at s = 1, 2 (2/11, 3/12), the cap after. The constant decay 0.3 does not fit."""
    cks, _ = run
    for k in range(2, STEPS + 1):
        s = k - 1
        d = min(DECAY, (1 + s) / (10 + s))
        for name, e in cks[k]["ema"].items():
            want = d * cks[k - 1]["ema"][name].double() + (1 - d) * cks[k]["model"][name].double()
            torch.testing.assert_close(e.double(), want, rtol=1e-5, atol=1e-7, msg=f"{name} step {k}")
            if name == "final_layer.linear.weight" and d < DECAY:
                wrong = DECAY * cks[k - 1]["ema"][name].double() + (1 - DECAY) * cks[k]["model"][name].double()
                assert (e.double() - wrong).abs().max() > 1e-6, k


# ------------------------------------------------------------------ fp16 with its grad scaler
def test_fp16_training_unscales_before_clipping_and_keeps_the_scaler(tmp_path):
    """--precision fp16: the logged gradient norm is the true one (the grad scaler's factor 2^16
    divided out before clipping), close to the fp32 run's on the same first batch; the scaler's
    state is checkpointed (initial scale 2^16, one growth-tracker count per finite step)."""
    common = {**TINY, "steps": 2, "ckpt_every": 2, "log_every": 1, "sample_every": 1000}
    train(resolve_config("digits", {**common, "out": str(tmp_path / "fp32")}), progress=False)
    train(resolve_config("digits", {**common, "out": str(tmp_path / "fp16"), "precision": "fp16"}), progress=False)
    logs = {p: [json.loads(x) for x in (tmp_path / p / "metrics.jsonl").read_text().splitlines()]
            for p in ("fp32", "fp16")}
    a, b = logs["fp32"][0], logs["fp16"][0]
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=0.02)
    assert b["loss"] == pytest.approx(a["loss"], rel=0.01)
    ck = load_checkpoint(tmp_path / "fp16" / "checkpoints" / "0000002.pt")
    assert ck["scaler"]["scale"] == 2.0 ** 16 and ck["scaler"]["_growth_tracker"] == 2
    assert load_checkpoint(tmp_path / "fp32" / "checkpoints" / "0000002.pt")["scaler"] is None
    for v in ck["model"].values():
        assert v.dtype == torch.float32  # master weights stay fp32 under autocast


# ------------------------------------------------------------------ retention through the trainer
def test_keep_last_and_keep_every_through_the_trainer(tmp_path):
    """--keep-last 2 --keep-every 4 over 9 steps, a checkpoint every step: the two newest and the
    multiples of 4 remain."""
    train(resolve_config("digits", {**TINY, "out": str(tmp_path), "steps": 9, "ckpt_every": 1, "keep_last": 2,
                                    "keep_every": 4, "sample_every": 1000}), progress=False)
    want = sorted({8, 9} | {s for s in range(1, 10) if s % 4 == 0})
    assert sorted(int(p.stem) for p in (tmp_path / "checkpoints").glob("*.pt")) == want
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


# ------------------------------------------------------------------ pixels through a VAE, no cache
def test_folder_through_a_vae_with_vae_scale(tmp_path, monkeypatch):
    """`dits train --data FOLDER --vae DIR --vae-scale 0.5`: the model's inputs are 0.5 x a
    posterior draw of the AutoencoderKL (diffusers, loaded here on its own) for each image;
    the checkpoint records the VAE and the scale; `dits sample` decodes with them."""
    import diffusers
    from PIL import Image

    from dits.cli import main
    from dits.train import loop

    colours = {"a": (200, 40, 30), "b": (20, 90, 220)}  # one flat colour per class: the image is known from y
    for cls, rgb in colours.items():
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), rgb).save(tmp_path / "imgs" / cls / f"{i}.png")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                  norm_num_groups=8, layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")

    seen = []
    real_create = loop.create_objective

    def recording(*a, **k):
        obj = real_create(*a, **k)
        inner = obj.training_losses

        def losses(model, x, t, model_kwargs=None, **kw):
            seen.append((x.detach().clone(), model_kwargs["y"].clone()))
            return inner(model, x, t, model_kwargs=model_kwargs, **kw)
        obj.training_losses = losses
        return obj
    monkeypatch.setattr(loop, "create_objective", recording)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["train", *flags, "--data", str(tmp_path / "imgs"), "--vae", str(tmp_path / "vae"),
                 "--vae-scale", "0.5", "--image-size", "16", "--batch-size", "4", "--steps", "2",
                 "--ckpt-every", "2", "--flip", "false", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert len(seen) == 2
    with torch.no_grad():
        moments = {}
        for c, (cls, rgb) in enumerate(colours.items()):
            img = (torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1).view(1, 3, 1, 1).expand(1, 3, 16, 16)
            dist = vae.eval().encode(img).latent_dist
            moments[c] = (dist.mean[0], dist.std[0])
    z = torch.cat([(x[i] / 0.5 - moments[int(y[i])][0]) / moments[int(y[i])][1]
                   for x, y in seen for i in range(len(y))])
    assert seen[0][0].shape == (4, 4, 8, 8)
    assert z.abs().max() < 6 and abs(float(z.mean())) < 0.2 and 0.85 < float(z.std()) < 1.15  # N(0, 1) draws
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "0000002.pt")
    assert ck["train_config"]["vae_scale"] == 0.5 and ck["vae_spec"] == str(tmp_path / "vae")
    assert ck["model_config"]["in_channels"] == 4 and ck["model_config"]["input_size"] == 8

    # dits sample decodes with the recorded VAE and scale: x = decode(z / 0.5)
    decoded = []
    real_decode = diffusers.AutoencoderKL.decode

    def spy(self, z, *a, **k):
        decoded.append(z.detach().clone())
        return real_decode(self, z, *a, **k)
    monkeypatch.setattr(diffusers.AutoencoderKL, "decode", spy)
    from dits.sample import to_uint8
    monkeypatch.setattr("dits.sample.to_uint8", lambda x: (decoded.append(x.detach().clone()), to_uint8(x))[1])
    generated = []
    real_sample = __import__("dits.objectives", fromlist=["sample"]).sample

    def sample_spy(*a, **k):
        out = real_sample(*a, **k)
        generated.append(out.detach().clone())
        return out
    monkeypatch.setattr("dits.objectives.sample", sample_spy)
    assert main(["sample", "--ckpt", str(tmp_path / "run"), "--num-samples", "2", "--sampler", "ddim", "--steps", "2",
                 "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    assert len(generated) == 1 and len(decoded) == 2
    torch.testing.assert_close(decoded[0], generated[0] / 0.5)
    with torch.no_grad():
        want = real_decode(vae, generated[0] / 0.5).sample
    torch.testing.assert_close(decoded[1], want, rtol=1e-4, atol=1e-5)
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (2, 16, 16, 3)
