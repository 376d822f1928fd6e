"""Text conditioning (issue 22), the model side: checked against invariants and closed forms.

- class-conditional models are bit-identical to the code before text existed (the models package
  of the pinned commit, rebuilt from git, run side by side) and keep their state-dict keys;
- padding tokens change nothing; an empty caption is the null caption;
- caption dropout happens at its rate (binomial bounds); guidance at scale 1 is the conditional
  output and at scale s is u + s(c - u) of two separate forwards;
- the learned encoder's vocabulary and unknown words; the captions of the digits (by an
  independent ranking); the caption draw per step; caption files;
- Gflops of the text path against the per-token closed form.
"""
import hashlib
import json
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dits.errors import UserError
from dits.models import create_model

ROOT = Path(__file__).parents[1]
PRE_TEXT_COMMIT = "f35774b19c843b0590f75647be75de6f123e2483"  # the last commit before text conditioning
DESIGNS = ("adaln-zero", "adaln", "cross-attn", "in-context")
SMALL = dict(depth=2, hidden_size=32, num_heads=4, patch_size=2, input_size=8, in_channels=1)
# sha256 of "name:shape;..." of the state dict of create_model("DiT", **SMALL, num_classes=K, block=B),
# computed with the code of PRE_TEXT_COMMIT
KEYS_BEFORE = {("adaln-zero", 10): "52db5285e839b3cf", ("adaln-zero", 0): "ca77c335201aa965",
               ("adaln", 10): "fec21e000d20987d", ("adaln", 0): "94d28224909764c8",
               ("cross-attn", 10): "627104f7ded0eea3", ("cross-attn", 0): "720ef78667b79f4a",
               ("in-context", 10): "1475d215e2927089", ("in-context", 0): "20b304657aa9c679"}


def _keys_hash(model) -> str:
    keys = ";".join(f"{n}:{tuple(v.shape)}" for n, v in model.state_dict().items())
    return hashlib.sha256(keys.encode()).hexdigest()[:16]


def _old_models():
    """The models package of PRE_TEXT_COMMIT, loaded from git under another name (it still uses
    today's dits.speed kernels and dits.errors, so only the model code differs)."""
    name = "_dits_models_before_text"
    if name in sys.modules:
        return sys.modules[name]
    try:
        srcs = {f: subprocess.run(["git", "show", f"{PRE_TEXT_COMMIT}:src/dits/models/{f}.py"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout
                for f in ("__init__", "embeddings", "blocks", "configs", "dit")}
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs git and commit {PRE_TEXT_COMMIT[:8]} (a git checkout of dits)")
    pkg = types.ModuleType(name)
    pkg.__path__ = []
    sys.modules[name] = pkg
    for f in ("embeddings", "blocks", "configs", "dit", "__init__"):
        src = srcs[f].replace("from dits.models import", f"from {name} import").replace("dits.models.", f"{name}.")
        mod = pkg if f == "__init__" else types.ModuleType(f"{name}.{f}")
        sys.modules.setdefault(f"{name}.{f}", mod)
        exec(compile(src, f"{PRE_TEXT_COMMIT[:8]}:{f}.py", "exec"), mod.__dict__)
    return pkg


def _jitter(*models, seed=1):
    """The same random perturbation of every parameter (so the zero-initialised parts matter)."""
    g = torch.Generator().manual_seed(seed)
    sds = [m.state_dict() for m in models]
    for k in sds[0]:
        r = torch.randn(sds[0][k].shape, generator=g) * 0.1
        for sd in sds:
            sd[k] += r
    for m, sd in zip(models, sds):
        m.load_state_dict(sd)


# ----------------------------------------------------------------------------- class runs unchanged
@pytest.mark.parametrize("block", DESIGNS)
@pytest.mark.parametrize("num_classes", [10, 0])
def test_class_models_are_bit_identical_to_the_code_before_text(block, num_classes):
    old = _old_models()
    kw = dict(**SMALL, num_classes=num_classes, block=block)
    torch.manual_seed(0)
    before = old.create_model("DiT", **kw)
    torch.manual_seed(0)
    now = create_model("DiT", **kw)
    assert list(now.state_dict()) == list(before.state_dict())
    assert _keys_hash(now) == KEYS_BEFORE[(block, num_classes)]
    assert now.config.to_dict() == before.config.to_dict()  # the checkpoints' model_config, key for key
    for k, v in before.state_dict().items():  # the same initial weights from the same seed
        assert torch.equal(v, now.state_dict()[k]), k
    _jitter(before, now)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 1000, (5,), generator=g)
    y = torch.randint(0, 10, (5,), generator=g) if num_classes else None
    extra = {"force_drop_ids": torch.tensor([1, 0, 1, 0, 0], dtype=torch.bool)} if num_classes else {}
    for train in (False, True):
        before.train(train), now.train(train)
        assert torch.equal(now(x, t, y, **extra), before(x, t, y, **extra)), (block, num_classes, train)
    if num_classes:
        before.eval(), now.eval()
        xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])
        assert torch.equal(now.forward_with_cfg(xx, tt, yy, 3.0), before.forward_with_cfg(xx, tt, yy, 3.0))


# ----------------------------------------------------------------------------- text models
def text_model(block, encoder="learned", text_adaln="both", dropout=0.1, seed=0, **kw):
    cfg = dict(**SMALL, num_classes=0, block=block, text_encoder=encoder, text_tokens=6,
               text_dim=32 if encoder == "learned" else 12, text_vocab=["a", "b", "c", "d"],
               text_adaln=text_adaln, class_dropout_prob=dropout)
    torch.manual_seed(seed)
    m = create_model("DiT", **{**cfg, **kw})
    _jitter(m)
    return m.eval()


def captions(encoder, g):
    """(text, mask) of three captions: two tokens, one token, empty (L = 4)."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    if encoder == "learned":
        text = torch.where(mask, torch.randint(2, 6, (3, 4), generator=g), torch.zeros(3, 4, dtype=torch.long))
    else:
        text = torch.randn(3, 4, 12, generator=g)
    return text, mask


def repad(text, mask, g, extra=0):
    """The same captions with other content in (and ``extra`` more of) the padded positions."""
    if text.dtype.is_floating_point:
        fill = torch.randn(text.shape[0], text.shape[1] + extra, text.shape[2], generator=g)
        t = torch.cat([text, fill[:, text.shape[1]:]], 1)
        m = torch.cat([mask, torch.zeros(len(mask), extra, dtype=torch.bool)], 1)
        return torch.where(m[..., None], t, fill), m
    fill = torch.randint(2, 6, (text.shape[0], text.shape[1] + extra), generator=g)
    t = torch.cat([text, fill[:, text.shape[1]:]], 1)
    m = torch.cat([mask, torch.zeros(len(mask), extra, dtype=torch.bool)], 1)
    return torch.where(m, t, fill), m


@pytest.mark.parametrize("block", DESIGNS)
@pytest.mark.parametrize("encoder", ["learned", "frozen"])
def test_padding_tokens_change_nothing(block, encoder):
    m = text_model(block, encoder)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(3, 1, 8, 8, generator=g), torch.randint(0, 1000, (3,), generator=g)
    text, mask = captions(encoder, g)
    same_length, _ = repad(text, mask, g)
    longer, longer_mask = repad(text, mask, g, extra=2)
    with torch.no_grad():
        ref = m(x, t, text=text, text_mask=mask)
        other = m(x, t, text=same_length, text_mask=mask)
        longer = m(x, t, text=longer, text_mask=longer_mask)
        null = m(x, t, text=text, text_mask=mask, force_drop_ids=torch.ones(3, dtype=torch.bool))
    assert torch.equal(ref, other)  # what sits in a padded position is never read
    torch.testing.assert_close(longer, ref, rtol=0, atol=1e-5)  # more padding: the same up to float order
    assert torch.equal(ref[2], null[2])  # the empty caption is the null caption
    assert (ref[:2] - null[:2]).abs().max() > 1e-3  # and real captions are not


@pytest.mark.parametrize("block", DESIGNS)
def test_text_models_train_with_finite_gradients_and_reject_labels(block):
    m = text_model(block).train()
    g = torch.Generator().manual_seed(4)
    text, mask = captions("learned", g)
    out = m(torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 500, 999]), text=text, text_mask=mask)
    out.square().mean().backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    with pytest.raises(UserError, match="text-conditional"):
        m(torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(UserError, match="at most 6"):
        m(torch.zeros(1, 1, 8, 8), torch.zeros(1), text=torch.full((1, 7), 2))


def test_pixart_cross_attention_starts_as_a_zero_residual():
    """adaLN-Zero with PixArt's cross-attention: zero-initialised output projection, so the fresh text
    model's blocks compute exactly what the same blocks without it (text_adaln pooled) compute."""
    torch.manual_seed(0)
    both = create_model("DiT", **SMALL, num_classes=0, block="adaln", text_encoder="frozen", text_dim=12,
                        text_tokens=4, text_adaln="both")
    pooled = create_model("DiT", **SMALL, num_classes=0, block="adaln", text_encoder="frozen", text_dim=12,
                          text_tokens=4, text_adaln="pooled")
    for blk in both.blocks:
        assert blk.cross_attn.proj.weight.abs().max() == 0 and blk.cross_attn.proj.bias.abs().max() == 0
    sd = {k: v for k, v in both.state_dict().items() if ".cross_attn." not in k}
    pooled.load_state_dict(sd)
    g = torch.Generator().manual_seed(5)
    text, mask = captions("frozen", g)
    x = torch.randn(3, 1, 8, 8, generator=g)
    h1 = h2 = None
    with torch.no_grad():  # compare block outputs (the final layer is zero, so outputs alone say nothing)
        tokens = both.x_embedder(x) + both.pos_embed
        emb = both.text_embedder(text, mask, False)
        c = both.t_embedder(torch.tensor([3, 30, 300])) + emb.vector
        h1, h2 = tokens, tokens
        for b1, b2 in zip(both.blocks, pooled.blocks):
            h1, h2 = b1(h1, c, emb.tokens, emb.mask), b2(h2, c, emb.tokens, emb.mask)
    assert torch.equal(h1, h2)


def test_caption_dropout_rate_is_within_binomial_bounds():
    from dits.models.conditioning import TextEmbedder

    torch.manual_seed(0)
    emb = TextEmbedder(8, 4, dropout_prob=0.1).train()
    n = 20_000
    text, mask = torch.randn(n, 3, 4), torch.ones(n, 3, dtype=torch.bool)
    out = emb(text, mask, train=True)
    null = (out.mask.sum(1) == 1) & (out.tokens[:, 0] == emb.null_token[0]).all(1) & (out.tokens[:, 1:] == 0).all((1, 2))
    k, p = int(null.sum()), 0.1
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(k - n * p) < 5 * sd, k  # 5 sigma: fails by chance with probability < 1e-6
    assert int(emb(text, mask, train=False).mask.sum(1).eq(1).sum()) == 0  # no dropout at eval
    forced = torch.zeros(n, dtype=torch.bool)
    forced[:7] = True
    assert int(emb(text, mask, train=True, force_drop_ids=forced).mask.sum(1).eq(1).sum()) == 7  # the given mask


def test_guidance_with_text_reduces_to_the_conditional_output_at_scale_one():
    from dits.diffusion.guidance import guided_model
    from dits.text.prompts import PromptConditioned

    m = text_model("cross-attn")
    prompts = ["a b", "c", "d a c"]
    net = PromptConditioned(m, prompts)
    g = torch.Generator().manual_seed(6)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([10, 400, 900]), torch.tensor([0, 1, 2])
    from dits.text.vocab import Vocabulary
    ids, _ = Vocabulary(["a", "b", "c", "d"]).encode(prompts, 6)
    with torch.no_grad():
        cond = m(x, t, text=ids, text_mask=ids != 0)
        uncond = m(x, t, text=torch.zeros_like(ids), text_mask=torch.zeros_like(ids, dtype=torch.bool))  # empty
        assert torch.equal(net(x, t, y), cond)
        at1 = guided_model(net, 1.0, null_class=3, eps_channels=1)(x, t, y)
        at3 = guided_model(net, 3.0, null_class=3, eps_channels=1)(x, t, y)
    torch.testing.assert_close(at1, cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(at3[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(at3[:, 1:], cond[:, 1:], rtol=0, atol=1e-6)  # the variance channels: unguided


def test_generate_with_prompts_at_cfg_one_samples_the_conditional_model():
    from dits.diffusion import sample
    from dits.sample import generate, to_uint8

    m = text_model("in-context")
    images, labels = generate(m, 4, prompts=["a", "b c"], sampler="ddim", steps=3, cfg_scale=1.0, seed=7)
    assert labels.tolist() == [0, 1, 0, 1]
    ids = torch.tensor([[2, 0, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0]] * 2)  # "a", "b c" in the model's 6 positions

    def direct(x, t, y=None):
        return m(x, t, text=ids[: len(x)], text_mask=ids[: len(x)] != 0)
    x = sample(direct, (4, 1, 8, 8), sampler="ddim", steps=3, seed=7, clip_denoised=True)
    np.testing.assert_array_equal(images, to_uint8(x))
    with pytest.raises(UserError, match="text-conditional"):
        generate(m, 2, sampler="ddim", steps=2)
    with pytest.raises(UserError, match="not text-conditional"):
        generate(create_model("DiT", **SMALL, num_classes=10), 2, prompts=["a"], sampler="ddim", steps=2)


# ----------------------------------------------------------------------------- vocabulary, captions
def test_vocabulary_is_the_sorted_caption_words_with_padding_and_unknown():
    from dits.text.vocab import PAD, UNK, Vocabulary, words

    assert words("A bold, handwritten 7!") == ["a", "bold", "handwritten", "7"]
    v = Vocabulary.build(["the digit 7", "A handwritten seven", "", "the digit 7"])
    assert v.to_list() == ["7", "a", "digit", "handwritten", "seven", "the"]
    assert len(v) == 8  # + <pad>, <unk>
    ids, rep = v.encode(["the digit 7", "the number seven", "", "a a a a a"], 4)
    assert ids.tolist() == [[7, 4, 2, PAD], [7, UNK, 6, PAD], [PAD] * 4, [3, 3, 3, 3]]
    assert rep == {"unknown": ["number"], "truncated": 1}
    assert Vocabulary(v.to_list()).index == v.index  # the stored list gives the same ids
    with pytest.raises(ValueError):
        Vocabulary(["<unk>"])
    m = text_model("adaln-zero")
    from dits.text.prompts import encode_prompts
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ids, mask = encode_prompts(m.config, ["a zebra b"])
    assert ids.tolist() == [[2, UNK, 3, 0, 0, 0]] and mask.sum() == 3 and "zebra" in str(w[0].message)


def test_digits_captions_follow_the_templates_and_the_ink_thirds():
    from dits.data.captions import NUMBER_WORDS, digits_captions
    from dits.data.digits import digits_split

    x, y = digits_split("train")
    cs = digits_captions(x, y)
    ink = ((x.numpy() + 1) / 2).reshape(len(x), -1).sum(1)
    for c in range(10):
        idx = np.nonzero(y.numpy() == c)[0]
        ranked = idx[np.argsort(ink[idx], kind="stable")]
        third = len(ranked) // 3
        word = NUMBER_WORDS[c]
        for pos, i in enumerate(ranked):
            caps = [cs.texts[j] for j in cs.per_example[i]]
            assert caps[:2] == [f"a handwritten {word}", f"the digit {c}"]
            want = [f"a thin handwritten {word}"] if pos < third else \
                [f"a bold handwritten {word}"] if pos >= len(ranked) - third else []
            assert caps[2:] == want


def test_one_caption_per_image_is_drawn_uniformly():
    from dits.data.captions import CaptionSet

    cs = CaptionSet(["a", "b", "c"], [[0, 1, 2], [1], []], "test")
    n = 30_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(8))
    drawn = cs.choose(torch.zeros(n, dtype=torch.long), u)
    sd = (n * (1 / 3) * (2 / 3)) ** 0.5
    for c in range(3):
        assert abs(int((drawn == c).sum()) - n / 3) < 5 * sd
    assert cs.choose(torch.tensor([1, 2]), torch.tensor([0.99, 0.5])).tolist() == [1, -1]  # -1: the null caption
    assert cs.most_common(2) == ["b", "a"]


def test_caption_files(tmp_path):
    from dits.data.captions import match_captions, read_caption_file

    f = tmp_path / "metadata.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"file_name": "a.png", "text": "a cat"}, {"file_name": "./b.png", "text": ["a dog", "a puppy"]},
        {"file_name": "a.png", "text": "a kitten"}, {"file_name": "sub/c.png", "text": ""},
        {"file_name": "d.png", "text": None}]) + "\n")
    caps = read_caption_file(f)
    assert caps == {"a.png": ["a cat", "a kitten"], "b.png": ["a dog", "a puppy"], "sub/c.png": [""], "d.png": []}
    cs = match_captions(["a.png", "b.png", "sub/c.png", "d.png", "e.png"], caps, "here", "f")
    assert cs.texts == ["a cat", "a kitten", "a dog", "a puppy"]
    assert cs.per_example == [[0, 1], [2, 3], [], [], []]  # empty, none and missing: the null caption
    with pytest.raises(UserError, match=r"names 1 image\(s\) that are not in here: d.png"):
        match_captions(["a.png", "b.png", "sub/c.png"], caps, "here", "f")
    (tmp_path / "bad.jsonl").write_text('{"file_name": "a.png"}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_caption_file(tmp_path / "bad.jsonl")


# ----------------------------------------------------------------------------- Gflops
def _macs(block, encoder, n_text, text_adaln="both", d=32, e=12, depth=2, tokens=16):
    from dits.flops import count_flops

    with torch.device("meta"):
        m = create_model("DiT", **{**SMALL, "depth": depth, "hidden_size": d}, num_classes=0, block=block,
                         text_encoder=encoder, text_dim=d if encoder == "learned" else e, text_tokens=12,
                         text_vocab=["a"], text_adaln=text_adaln)
    return count_flops(m, text_tokens=n_text)


@pytest.mark.parametrize("block,text_adaln", [("cross-attn", "both"), ("in-context", "both"),
                                              ("adaln-zero", "both"), ("adaln-zero", "pooled"),
                                              ("adaln", "cross-attn")])
def test_gflops_of_one_more_caption_token(block, text_adaln):
    """What one more caption token costs, from the shapes (fvcore's convention: one MAC per
    multiply-add, LayerNorm 5 per element with an affine), for a frozen encoder's e-wide features."""
    d, e, depth, t = 32, 12, 2, 16  # width, feature width, blocks, image tokens
    proj = e * d + d * d  # the caption projection, per token
    if block == "cross-attn":  # per block: keys/values of the token, and one more key in q k^T and attn v
        per_block = 2 * d * d + 2 * t * d
    elif block == "in-context":
        s = t + 1 + 5  # the sequence at 5 caption tokens: image, timestep, caption
        per_block = 2 * 5 * d + 3 * d * d + d * d + 8 * d * d + 2 * ((s + 1) ** 2 - s ** 2) * d
    elif text_adaln == "pooled":
        per_block = 0  # only the pooled vector sees the caption
    else:  # PixArt's cross-attention in the adaLN block
        per_block = 2 * d * d + 2 * t * d
    assert _macs(block, "frozen", 6, text_adaln) - _macs(block, "frozen", 5, text_adaln) == proj + depth * per_block


def test_learned_encoder_gflops_per_token():
    d, depth_enc = 32, 2
    # per token and encoder layer: 2 LayerNorms (affine), qkv, proj, MLP; attention grows by 2*(2L+1)*d
    at = lambda n: _macs("adaln-zero", "learned", n, "pooled")  # noqa: E731
    enc = lambda n: depth_enc * (n * (2 * 5 * d + 4 * d * d + 8 * d * d) + 2 * n * n * d) + 5 * n * d  # noqa: E731
    proj = lambda n: n * 2 * d * d  # noqa: E731
    assert at(7) - at(4) == enc(7) - enc(4) + proj(7) - proj(4)


def test_flops_cli_counts_text_models(capsys):
    from dits.cli import main

    assert main(["flops", "DiT-XL/2", "--block", "cross-attn", "--text-tokens", "120", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    # 137.73 with the class token; + the 4096-d T5 projection of 120 tokens and 119 more keys per block
    d, t, depth = 1152, 256, 28
    extra = 120 * (4096 * d + d * d) + d * d + depth * (119 * (2 * d * d) + 2 * t * 119 * d)
    with torch.device("meta"):
        from dits.flops import count_flops
        base = count_flops(create_model("DiT-XL/2", block="cross-attn"))
    # the class model's embedding lookup is free; the text model adds the pooled vector's Linear (d*d)
    assert row["gflops"] * 1e9 == pytest.approx(base + extra, abs=0.5)
    assert main(["flops", "DiT-XL/2", "--text-dim", "768"]) == 2
