"""diffusers interop: exact weight mapping both ways, the timestep-frequency fact, pipelines, CLI."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import json

import pytest
import torch

import diffusers  # noqa: E402  (a hard dependency: a broken install fails here, it is not skipped)

from dits.errors import UserError  # noqa: E402
from dits.interop.diffusers import (FREQ_SHIFT_WARNING, from_diffusers, load_exact_diffusers,  # noqa: E402
                                    load_exact_pipeline, make_exact, save_diffusers, to_diffusers)
from dits.models import create_model  # noqa: E402

TIMES = (0, 1, 10, 250, 999)



def tiny(**kw):
    args = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, in_channels=4, num_classes=10)
    args.update(kw)
    torch.manual_seed(0)  # the default init draws from the global RNG
    model = create_model("DiT", **args)
    # Trained-looking weights: the default init plus noise, so the zero-initialised
    # modulation and output layers are non-zero and every weight matters.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def inputs(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=g)
    top = model.y_embedder.embedding_table.num_embeddings if model.num_classes else 1  # incl. a null row
    y = torch.randint(0, top, (n,), generator=g)
    return x, y


def run_both(model, transformer, t):
    x, y = inputs(model)
    ts = torch.full((x.shape[0],), t)
    with torch.no_grad():
        ours = model(x, ts, y if model.num_classes else None)
        theirs = transformer(x, timestep=ts, class_labels=y).sample
    return ours, theirs


def tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                   norm_num_groups=8, layers_per_block=1)


VARIANTS = {
    "class-cond, learned sigma": {},
    "fixed sigma": dict(learn_sigma=False),
    "unconditional": dict(num_classes=0),
    "no null class": dict(class_dropout_prob=0.0),
    "patch 4": dict(patch_size=4),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_round_trip_is_bit_exact(overrides):
    model = tiny(**overrides)
    back = from_diffusers(to_diffusers(model))
    assert back.config == model.config
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_exact_loader_matches_at_every_t(overrides):
    model = tiny(**overrides)
    transformer = make_exact(to_diffusers(model))
    for t in TIMES:
        ours, theirs = run_both(model, transformer, t)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_stock_diffusers_equal_at_t0_only():
    model = tiny()
    transformer = to_diffusers(model)
    ours, theirs = run_both(model, transformer, 0)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # At t > 0 stock diffusers' frequencies 10000^(-k/127) differ from the reference's
    # 10000^(-k/128): on this model the max abs difference is ~1e-4 at t=1, ~1.3e-3 at t=10,
    # ~3e-2 at t=250 and ~8e-2 at t=999 (output std 0.39), far above float rounding. The
    # 256-d sinusoid itself differs by up to 0.003, 0.03, 0.70 and 1.94 at those t.
    diffs = {t: (lambda o, d: (o - d).abs().max().item())(*run_both(model, transformer, t)) for t in TIMES[1:]}
    assert all(d > 2e-5 for d in diffs.values()), diffs
    assert diffs[1] < diffs[10] < diffs[250] < diffs[999], diffs


def test_official_hub_config_eps_is_patched():
    # A config without norm_eps (older hub repos) gets diffusers' 1e-5; make_exact sets 1e-6.
    model = tiny()
    cfg = dict(to_diffusers(model).config)
    cfg["norm_eps"] = 1e-5
    hub_like = diffusers.DiTTransformer2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    hub_like.load_state_dict(to_diffusers(model).state_dict())
    hub_like.eval()  # no label dropout
    assert hub_like.transformer_blocks[0].norm3.eps == 1e-5
    make_exact(hub_like)
    assert hub_like.transformer_blocks[0].norm3.eps == 1e-6
    assert all(b.norm1.emb.time_proj.downscale_freq_shift == 0 for b in hub_like.transformer_blocks)
    ours, theirs = run_both(model, hub_like, 500)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_weight_layout_and_config():
    model = tiny()
    t = to_diffusers(model)
    assert t.config.norm_eps == 1e-6 and t.config.num_embeds_ada_norm == 10 and t.config.out_channels == 8
    sd = t.state_dict()
    qkv = model.blocks[1].attn.qkv.weight
    assert torch.equal(sd["transformer_blocks.1.attn1.to_k.weight"], qkv[64:128])
    for i in range(2):  # every block carries a copy of the shared embedders
        assert torch.equal(sd[f"transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_2.weight"],
                           model.t_embedder.mlp[2].weight)
    assert torch.equal(t.pos_embed.pos_embed, model.pos_embed)


def test_bf16_keeps_dtype_and_round_trips():
    model = tiny().to(torch.bfloat16)
    t = to_diffusers(model)
    assert t.dtype == torch.bfloat16
    back = from_diffusers(t)
    assert next(back.parameters()).dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_refuses_what_diffusers_cannot_represent():
    with pytest.raises(UserError, match="adaLN-Zero"):
        to_diffusers(create_model("DiT", depth=1, hidden_size=32, num_heads=4, input_size=8, block="adaln"))
    with pytest.raises(UserError, match="MLP ratio"):
        to_diffusers(create_model("DiT", depth=1, hidden_size=32, num_heads=4, input_size=8, mlp_ratio=2.0))
    t = to_diffusers(tiny())
    with torch.no_grad():
        t.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    with pytest.raises(UserError, match="block 1"):
        from_diffusers(t)


def test_save_diffusers_pipeline_loads_and_runs(tmp_path):
    model = tiny()
    names = [f"thing {i}" for i in range(10)]
    with pytest.warns(UserWarning, match="guidance_scale=1"):
        out = save_diffusers(model, tmp_path / "pipe", vae=tiny_vae(), scheduler="ddim", class_names=names)
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "transformer", "vae"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["id2label"]["3"] == "thing 3"
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"], sched["num_train_timesteps"]) == \
        (1e-4, 0.02, "linear", 1000)

    pipe = load_exact_pipeline(out)
    assert pipe.labels["thing 3"] == 3
    assert pipe.transformer.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 0
    images = pipe(class_labels=[1, 2], guidance_scale=1.0, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3)

    exact = load_exact_diffusers(out)  # a pipeline directory works as well as transformer/
    ours, theirs = run_both(model, exact, 700)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    back = from_diffusers(out / "transformer")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())

    with pytest.raises(UserError, match="already exists"):
        save_diffusers(model, out)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 chatter inside diffusers' DPM-Solver
def test_save_without_vae_and_other_schedulers(tmp_path):
    model = tiny(num_classes=1000, hidden_size=32)
    for name, cls in (("ddpm", "DDPMScheduler"), ("dpm", "DPMSolverMultistepScheduler")):
        out = save_diffusers(model, tmp_path / name, scheduler=name)
        index = json.loads((out / "model_index.json").read_text())
        assert index["vae"] == [None, None] and index["scheduler"] == ["diffusers", cls]
    pipe = diffusers.DiTPipeline.from_pretrained(tmp_path / "dpm", vae=tiny_vae())
    images = pipe(class_labels=[5], guidance_scale=4.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)
    with pytest.raises(UserError, match="scheduler"):
        save_diffusers(model, tmp_path / "x", scheduler="euler")
    assert not (tmp_path / "x").exists()


def test_loader_errors(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        load_exact_diffusers(tmp_path / "missing")
    with pytest.raises(UserError, match="config.json"):
        load_exact_diffusers(tmp_path)


def test_cli_convert_both_ways(tmp_path, capsys):
    from dits.checkpoint import load_model, save_model
    from dits.cli import main

    model = tiny()
    save_model(tmp_path / "model.pt", model)
    assert main(["convert", "--to", "diffusers", str(tmp_path / "model.pt"), str(tmp_path / "pipe")]) == 0
    err = capsys.readouterr().err
    assert "10000^(-k/127)" in err and "load_exact" in err
    assert main(["convert", "--from", "diffusers", str(tmp_path / "pipe"), str(tmp_path / "back.pt")]) == 0
    back, _ = load_model(tmp_path / "back.pt")
    assert back.config == model.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    # an existing output is refused with one line and exit code 2
    assert main(["convert", "--to", "diffusers", str(tmp_path / "model.pt"), str(tmp_path / "pipe")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert FREQ_SHIFT_WARNING.startswith("note:")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_on_cuda():
    model = tiny().cuda()
    transformer = make_exact(to_diffusers(model))
    assert transformer.device.type == "cuda"
    x, y = (v.cuda() for v in inputs(model))
    ts = torch.full((x.shape[0],), 400, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(transformer(x, timestep=ts, class_labels=y).sample, model(x, ts, y),
                                   rtol=0, atol=1e-3)
