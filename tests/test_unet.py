"""The U-Net backbone (issue 19): the model against diffusers itself, its null class, guidance,
training, exact resume, sampling, loading, evaluation; the one flop counter against hand counts,
against dits.flops on DiTs and against an independent count of the U-Net from its architecture;
bad input through the CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dits.cli import main
from dits.config import resolve_config
from dits.flop_counter import count_flops, count_macs
from dits.models.unet import UNet, UNetConfig, create_unet
from dits.train import train

UTINY = dict(objective="diffusion", backbone="unet", unet_channels="8,16", unet_layers=1, batch_size=16, lr=1e-3, warmup_steps=3,
             grad_clip=1.0, ema_decay=0.9, ema_warmup=True, log_every=2, ckpt_every=3, sampler="ddim",
             sample_steps=2, samples_per_class=1, eval_samples=0, seed=3)


def ucfg(out, **kw):
    return resolve_config("digits", {**UTINY, "out": str(out), **kw})


# ------------------------------------------------------------------ the model
def reference_unet(channels, layers, size, in_ch, out_ch, table_rows, groups, head_dim=8):
    """The ADM-style U-Net the docs describe, built here from diffusers' own constructor."""
    from diffusers import UNet2DModel

    n = len(channels)
    return UNet2DModel(sample_size=size, in_channels=in_ch, out_channels=out_ch, block_out_channels=tuple(channels),
                       layers_per_block=layers, down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1),
                       up_block_types=("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",), norm_num_groups=groups,
                       attention_head_dim=head_dim, resnet_time_scale_shift="scale_shift",
                       num_class_embeds=table_rows)


def test_wrapper_is_diffusers_unet_with_a_null_row_and_zero_output():
    torch.manual_seed(0)
    m = create_unet((8, 16), 2, input_size=16, in_channels=1, num_classes=10).eval()
    assert m.unet.class_embedding.weight.shape[0] == 11            # ten classes + the null row
    assert m.out_channels == 2                                      # learned sigma: eps and v
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 3, 9, 10])                                 # 10 is the null label
    assert torch.count_nonzero(m(x, t, y)) == 0                     # ADM's zero init: the output starts at 0
    for p in m.parameters():                                        # give every weight a value
        p.data.normal_(0, 0.2)
    ref = reference_unet((8, 16), 2, 16, 1, 2, 11, groups=2)
    ref.load_state_dict({k[len("unet."):]: v for k, v in m.state_dict().items()}, strict=True)
    with torch.no_grad():
        assert torch.allclose(m(x, t, y), ref(x, t, class_labels=y).sample, atol=1e-6)
        # force_drop_ids sends a label to the null row, the same as passing the null label
        dropped = m(x, t, torch.tensor([0, 3, 9, 2]), force_drop_ids=torch.tensor([False, False, False, True]))
        assert torch.allclose(dropped, ref(x, t, class_labels=y).sample, atol=1e-6)
        # an unrelated class gives another output (the class reaches the network)
        assert not torch.allclose(m(x, t, torch.tensor([1, 3, 9, 10])), ref(x, t, class_labels=y).sample)


def test_random_label_dropout_while_training_only():
    torch.manual_seed(0)
    m = create_unet((8, 16), 1, input_size=8, in_channels=1, num_classes=10, class_dropout_prob=0.5)
    for p in m.parameters():
        p.data.normal_(0, 0.2)
    x, t, y = torch.randn(64, 1, 8, 8), torch.full((64,), 300), torch.full((64,), 4)
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(x, t, y), m(x, t, y))                  # eval: deterministic, no dropout
        null = m(x, t, torch.full((64,), 10))
        m.train()
        out = m(x, t, y)
    per = [torch.allclose(out[i], null[i], atol=1e-6) for i in range(64)]
    assert 10 < sum(per) < 54                                       # about half dropped to the null row


def test_guidance_uses_the_null_row():
    from dits.diffusion.guidance import guided_model

    torch.manual_seed(1)
    m = create_unet((8, 16), 1, input_size=8, in_channels=1, num_classes=10).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.2)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        net = guided_model(m, 3.0, null_class=m.num_classes, eps_channels=1)
        cond, unc = m.unet(x, t, class_labels=y).sample, m.unet(x, t, class_labels=torch.full_like(y, 10)).sample
        want = torch.cat([unc[:, :1] + 3.0 * (cond[:, :1] - unc[:, :1]), cond[:, 1:]], dim=1)
        assert torch.allclose(net(x, t, y), want, atol=1e-5)
        both = m.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 3.0)
        assert torch.allclose(both[:3], want, atol=1e-5)


def test_config_round_trips_and_names_its_backbone():
    from dits.models.registry import backbone_of, build, config_from_dict

    cfg = UNetConfig(input_size=16, in_channels=1, channels="4,8,8", layers=3, num_classes=10)
    d = cfg.to_dict()
    assert d["backbone"] == "unet" and d["channels"] == [4, 8, 8] and d["norm_groups"] == 1
    back = config_from_dict(d)
    assert back == cfg and isinstance(build(back), UNet) and backbone_of(d) == "unet"
    dit = {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2, "input_size": 8, "in_channels": 1,
           "num_classes": 10}
    assert backbone_of(dit) == "dit" and type(build(config_from_dict(dit))).__name__ == "DiT"


def test_dit_path_unchanged_by_the_registry():
    """A DiT run builds exactly the model create_model builds, and its config names no backbone."""
    from dits.models import create_model
    from dits.train.loop import build_model

    cfg = resolve_config("digits", {"objective": "diffusion", "model": "DiT", "depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2})
    torch.manual_seed(5)
    a = build_model(cfg, 1, 8, 10)
    torch.manual_seed(5)
    b = create_model("DiT", depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=1,
                     num_classes=10)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert "backbone" not in a.config.to_dict() and cfg.backbone == "dit"


# ------------------------------------------------------------------ training, resume, sampling
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet")
    train(ucfg(root / "straight", steps=6), progress=False)
    train(ucfg(root / "resumed", steps=3), progress=False)
    train(resolve_config(None, {"steps": 6}), resume=str(root / "resumed"), progress=False, typed={"steps"})
    return root


def _flat(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}/{i}")


def test_unet_resumes_bit_exactly(runs):
    a = torch.load(runs / "straight/checkpoints/0000006.pt", weights_only=True)   # code-free
    b = torch.load(runs / "resumed/checkpoints/0000006.pt", weights_only=True)
    assert a["model_config"]["backbone"] == "unet" and a["train_config"]["backbone"] == "unet"
    ta, tb = dict(_flat({k: a[k] for k in ("model", "ema", "opt")})), dict(_flat({k: b[k] for k in ("model", "ema", "opt")}))
    assert ta.keys() == tb.keys() and len(ta) > 50
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])][:3]
    start = torch.load(runs / "straight/checkpoints/0000003.pt", weights_only=True)
    assert not torch.equal(start["model"]["unet.conv_out.weight"], a["model"]["unet.conv_out.weight"])  # it trained
    assert not torch.equal(a["model"]["unet.conv_out.weight"], a["ema"]["unet.conv_out.weight"])        # EMA apart
    log = [json.loads(ln) for ln in (runs / "straight/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in log)


def test_load_model_returns_the_unet_and_every_sampler_runs(runs):
    from dits.checkpoint import load_model
    from dits.sample import generate

    model, info = load_model(runs / "straight")
    assert isinstance(model, UNet) and info["weights"] == "ema" and info["step"] == 6
    ema = torch.load(runs / "straight/checkpoints/0000006.pt", weights_only=True)["ema"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    for sampler in ("ddpm", "ddim", "dpm++", "heun"):
        for extra in ({"cfg_scale": 1.0}, {"cfg_scale": 2.0}, {"cfg_scale": 2.0, "guidance_interval": (0.2, 0.8)}):
            imgs, labels = generate(model, 10, sampler=sampler, steps=3, seed=0, **extra)
            assert imgs.shape == (10, 8, 8, 1) and imgs.dtype == np.uint8 and list(labels) == list(range(10))
    again, _ = generate(model, 10, sampler="ddim", steps=3, seed=0, cfg_scale=2.0)
    assert np.array_equal(again, generate(model, 10, sampler="ddim", steps=3, seed=0, cfg_scale=2.0, batch_size=3)[0])


def test_sample_and_evaluate_cli(runs, tmp_path, capsys):
    npz = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(runs / "straight"), "--num-samples", "20", "--sampler", "dpm++", "--steps", "3",
                 "--out", str(npz), "--no-progress"]) == 0
    arr = np.load(npz)
    assert arr["arr_0"].shape == (20, 8, 8, 1) and sorted(set(arr["arr_1"].tolist())) == list(range(10))
    assert main(["evaluate", str(npz), "--ref", "digits"]) == 0
    assert "accuracy" in capsys.readouterr().out.lower()


def test_flow_objective_trains_a_unet_and_samples(tmp_path):
    from dits.checkpoint import load_model
    from dits.sample import generate

    train(ucfg(tmp_path / "flow", steps=2, objective="flow", sampler="heun"), progress=False)
    model, info = load_model(tmp_path / "flow")
    assert isinstance(model, UNet) and model.out_channels == 1       # no learned variance under flow
    for sampler in ("euler", "heun", "sde"):
        imgs, _ = generate(model, 4, sampler=sampler, steps=3, seed=0, objective="flow", cfg_scale=1.5)
        assert imgs.shape == (4, 8, 8, 1)


def test_grad_checkpoint_gives_the_same_step(tmp_path):
    train(ucfg(tmp_path / "plain", steps=2), progress=False)
    train(ucfg(tmp_path / "ckpt", steps=2, grad_checkpoint=True), progress=False)
    a = torch.load(tmp_path / "plain/checkpoints/0000002.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ckpt/checkpoints/0000002.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ------------------------------------------------------------------ the flop counter
@pytest.mark.parametrize("cin,cout,k,stride,pad,size,groups", [(3, 8, 3, 1, 1, 10, 1), (4, 6, 5, 2, 0, 13, 1),
                                                                (8, 8, 3, 1, 1, 6, 4), (1, 2, 1, 1, 0, 7, 1)])
def test_flop_counter_on_one_conv_by_hand(cin, cout, k, stride, pad, size, groups):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups, bias=True)
    out_side = (size + 2 * pad - k) // stride + 1
    hand = out_side * out_side * cout * k * k * (cin // groups)     # one MAC per weight per output position
    assert count_macs(conv, torch.zeros(2, cin, size, size)) == 2 * hand   # a batch of 2
    assert count_macs(conv.to("meta"), torch.zeros(1, cin, size, size, device="meta")) == hand


def test_flop_counter_sees_cpu_attention_and_onednn_linear():
    from dits import speed

    q = torch.randn(1, 3, 16, 8)
    att = type("A", (nn.Module,), {"forward": lambda self, a: torch.nn.functional.scaled_dot_product_attention(a, a, a)})()
    assert count_macs(att, q) == 2 * 3 * 16 * 16 * 8                 # q k^T and attn v, per head
    if hasattr(speed, "_onednn") and speed.onednn_available():
        lin = type("L", (nn.Module,), {"forward": lambda self, a: speed._onednn(a, torch.ones(5, 7), None)})()
        assert count_macs(lin, torch.ones(4, 7)) == 4 * 5 * 7


def _layernorm_macs(cfg) -> int:
    """fvcore's LayerNorm term of an adaLN-Zero DiT (what dits.flops adds and FlopCounterMode leaves
    out): two LayerNorms per block and one in the final layer, T x D elements each, no affine: 4 each."""
    tokens = (cfg.input_size // cfg.patch_size) ** 2
    return (2 * cfg.depth + 1) * tokens * cfg.hidden_size * 4


@pytest.mark.parametrize("name,over", [("DiT-S/2", {}), ("DiT-B/4", {}), ("DiT-L/8", {}), ("DiT-XL/2", {}),
                                       ("DiT", dict(depth=3, hidden_size=48, num_heads=6, patch_size=4, input_size=16,
                                                    in_channels=1, num_classes=10))])
def test_flop_counter_agrees_with_dits_flops_on_dit(name, over):
    from dits.flops import count_flops as module_count
    from dits.models import create_model

    with torch.device("meta"):
        model = create_model(name, **over)
    torch_count, hooks = count_flops(model), module_count(model)
    if name != "DiT":
        assert abs(torch_count / hooks - 1) < 0.01                  # the issue's +-1 % on the paper's models
    assert hooks - torch_count == _layernorm_macs(model.config)     # and the whole difference is LayerNorm


def independent_unet_macs(channels, layers, size, in_ch, out_ch) -> int:
    """MACs of one image through the ADM-style U-Net, from its architecture (not from torch):
    3x3 convolutions (H^2 * 9 * in * out), 1x1 shortcuts where widths change, the time MLP
    (c0 -> 4c0 -> 4c0), each residual block's scale-shift projection (4c0 -> 2 * out), and per
    attention at N positions of width c: q, k, v, out projections (4 N c^2) and the two products (2 N^2 c)."""
    c0, emb, n = channels[0], 4 * channels[0], len(channels)
    total = c0 * emb + emb * emb

    def conv(h, cin, cout, k=3):
        return h * h * k * k * cin * cout

    def res(h, cin, cout):
        return conv(h, cin, cout) + emb * 2 * cout + conv(h, cout, cout) + (conv(h, cin, cout, 1) if cin != cout else 0)

    def attn(h, c):
        return 4 * h * h * c * c + 2 * (h * h) ** 2 * c

    total += conv(size, in_ch, c0)
    skips, cin, h = [c0], c0, size
    for i, c in enumerate(channels):
        for _ in range(layers):
            total += res(h, cin, c) + (attn(h, c) if i > 0 else 0)
            cin = c
            skips.append(c)
        if i < n - 1:
            total += conv(h // 2, c, c)
            h //= 2
            skips.append(c)
    total += 2 * res(h, cin, cin) + attn(h, cin)
    for i, c in enumerate(reversed(channels)):
        for _ in range(layers + 1):
            total += res(h, cin + skips.pop(), c) + (attn(h, c) if i < n - 1 else 0)
            cin = c
        if i < n - 1:
            total += conv(2 * h, c, c)
            h *= 2
    return total + conv(size, c0, out_ch)


@pytest.mark.parametrize("channels,layers,size,classes", [((4, 8), 2, 16, 10), ((8, 16), 2, 16, 10),
                                                          ((16, 32), 2, 16, 10), ((8, 16, 32), 1, 32, 0),
                                                          ((16,), 3, 8, 10), ((32, 64), 2, 8, 10)])
def test_flop_counter_on_unets_equals_an_independent_count(channels, layers, size, classes):
    cfg = UNetConfig(input_size=size, in_channels=1, channels=channels, layers=layers, num_classes=classes)
    assert count_flops(cfg) == independent_unet_macs(channels, layers, size, 1, 2)
    # counted on a live CPU model (SDPA's CPU kernel, diffusers' default processor): the same
    live = UNet(cfg)
    y = torch.zeros(1, dtype=torch.long) if classes else None
    assert count_macs(live, torch.zeros(1, 1, size, size), torch.zeros(1), y) == count_flops(cfg)


def test_flops_cli_for_unets(capsys):
    assert main(["flops", "--backbone", "unet", "--unet-channels", "8,16", "--unet-layers", "2", "--input-size", "16",
                 "--in-channels", "1", "--num-classes", "10", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    ref = reference_unet((8, 16), 2, 16, 1, 2, 11, groups=2)
    assert row["gflops"] == independent_unet_macs((8, 16), 2, 16, 1, 2) / 1e9
    assert row["params"] == sum(p.numel() for p in ref.parameters())
    assert main(["flops", "DiT-XL/2", "--counter", "torch", "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["gflops"] - 118.69) / 118.69 < 0.01


# ------------------------------------------------------------------ bad input
def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


BAD = [
    (["train", "--backbone", "unet", "--block", "adaln", "--out", "new"], "--block describes a DiT"),
    (["train", "--backbone", "unet", "--patch-size", "2", "--out", "new"], "--patch-size describes a DiT"),
    (["train", "--backbone", "unet", "--depth", "3", "--out", "new"], "--depth describes a DiT"),
    (["train", "--backbone", "unet", "--model", "DiT-S/2", "--out", "new"], "--model describes a DiT"),
    (["train", "--backbone", "unet", "--unet-channels", "8,16,16,16,16", "--out", "new"], "does not divide the image size 8"),
    (["train", "--data", "glyphs", "--backbone", "unet", "--unet-channels", "4,8,8,8,8,8", "--out", "new"],
     "does not divide the image size 16"),
    (["train", "--backbone", "unet", "--unet-channels", "8,12", "--out", "new"], "multiples of the head width 8"),
    (["train", "--backbone", "unet", "--unet-channels", "a,b", "--out", "new"], "comma-separated positive integers"),
    (["train", "--backbone", "unet", "--unet-layers", "0", "--out", "new"], "--unet-layers must be >= 1"),
    (["train", "--backbone", "transformer", "--out", "new"], "unknown backbone 'transformer'; choose one of: dit, unet"),
    (["train", "--unet-channels", "8,16", "--out", "new"], "add --backbone unet"),
    (["train", "--backbone", "unet", "--init", "somewhere", "--out", "new"], "--init fine-tunes DiT weights"),
    (["train", "--backbone", "unet", "--fsdp", "true", "--out", "new"], "--fsdp shards a DiT block by block"),
    (["flops", "--backbone", "unet", "--block", "adaln"], "--block describes a DiT"),
    (["flops", "--backbone", "unet", "--unet-channels", "8,16,16,16,16,16", "--input-size", "16"], "downsamples by 32"),
    (["flops", "--backbone", "cnn"], "unknown backbone"),
    (["flops", "DiT-B/4", "--unet-layers", "2"], "add --backbone unet"),
    (["study", "backbones", "--budget", "huge", "--out", "new"], "unknown budget"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a[1:4]) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").write_text("x")
    before = _snapshot(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert _snapshot(tmp_path) == before
