"""Text conditioning (issue 22), the run side: training, resume, sampling with prompts, the latent
cache's caption embeddings, frozen CLIP / T5 encoders and bad input.

The pretrained path uses a tiny randomly initialised CLIP text model and T5 encoder, with a
word-level tokenizer, saved to a temp dir here (skipped with the reason when transformers is
not installed: it is the optional extra dits[text], and in the test extra).
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dits.checkpoint import latest_checkpoint, load_checkpoint
from dits.cli import main
from dits.config import resolve_config
from dits.train import train

TINY = dict(objective="diffusion", model="DiT", depth=1, hidden_size=32, num_heads=2, patch_size=2, batch_size=16, lr=1e-3,
            warmup_steps=3, grad_clip=1.0, ema_decay=0.9, ema_warmup=True, log_every=2, ckpt_every=4,
            sampler="ddim", sample_steps=2, samples_per_class=1, eval_samples=0, seed=3)
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()] + ["--no-progress"]
WORDS = ["[PAD]", "[UNK]", "[EOS]", "a", "the", "handwritten", "digit", "seven", "red", "blue", "square", "dot"]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def images(folder: Path, names, captions=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * i % 255, 200, 30)).save(folder / n)
    if captions is not None:
        (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": c}) + "\n"
                                                       for n, c in captions.items()))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny class-conditional run and a tiny in-context text run (learned encoder, digits captions)."""
    root = tmp_path_factory.mktemp("text-runs")
    train(resolve_config("digits", {**TINY, "steps": 1, "out": str(root / "class")}), progress=False)
    train(resolve_config("digits-text", {**TINY, "steps": 1, "block": "in-context", "out": str(root / "text")}),
          progress=False)
    return root


# ----------------------------------------------------------------------------- training, resume, sampling
def test_text_run_resumes_bit_exact(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", "--preset", "digits-text", *FLAGS, "--steps", "8", "--out", str(straight)]) == 0
    assert main(["train", "--preset", "digits-text", *FLAGS, "--steps", "4", "--out", str(stopped)]) == 0
    assert main(["train", "--resume", str(stopped), "--steps", "8", "--no-progress"]) == 0
    a, b = load_checkpoint(latest_checkpoint(straight)), load_checkpoint(latest_checkpoint(stopped))
    assert a["step"] == b["step"] == 8
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    first = load_checkpoint(straight / "checkpoints" / "0000004.pt")
    assert not torch.equal(first["model"]["text_embedder.encoder.token_embedding.weight"],
                           a["model"]["text_embedder.encoder.token_embedding.weight"])  # the encoder trains


def test_text_run_files_and_sampling_with_prompts(runs, tmp_path):
    ck = load_checkpoint(latest_checkpoint(runs / "text"))  # weights_only: the vocabulary is plain data
    mc = ck["model_config"]
    assert mc["text_encoder"] == "learned" and mc["num_classes"] == 0 and mc["text_tokens"] == 4
    assert "seven" in mc["text_vocab"] and "bold" in mc["text_vocab"] and all(isinstance(w, str) for w in mc["text_vocab"])
    assert ck["train_config"]["captions"] == "digits"
    assert not any(k.startswith("y_embedder") for k in ck["model"])
    grid = tmp_path / "g.png"
    prompts = tmp_path / "p.txt"
    prompts.write_text("the digit 3\n\nthe number seven\n")
    assert main(["sample", "--ckpt", str(runs / "text"), "--prompt", "a handwritten seven", "--prompts", str(prompts),
                 "--steps", "2", "--num-samples", "6", "--cfg-scale", "2", "--out", str(grid), "--no-progress"]) == 0
    with Image.open(grid) as im:
        w, h = im.size
    assert h == 3 * 68 + 4 and w > 2 * 68 + 4 + 40  # three prompt rows of two (4 px gaps), labels in a left margin
    npz = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(runs / "text"), "--prompt", "a thin handwritten one", "--prompt", "the digit 0",
                 "--steps", "2", "--num-samples", "5", "--out", str(npz), "--no-progress"]) == 0
    d = np.load(npz)  # no pickle needed
    assert d["arr_0"].shape == (5, 8, 8, 1) and d["arr_1"].tolist() == [0, 1, 0, 1, 0]
    assert d["prompts"].tolist() == ["a thin handwritten one", "the digit 0"]


def test_image_folder_with_metadata_and_several_captions_per_image(tmp_path):
    caps = {"a.png": ["a red square", "the red square"], "sub/b.png": "a blue dot", "c.png": ""}
    folder = images(tmp_path / "imgs", ["a.png", "sub/b.png", "c.png"], caps)
    summary = train(resolve_config(None, {**TINY, "data": str(folder), "image_size": 8, "text_encoder": "learned",
                                          "batch_size": 4, "steps": 2, "block": "cross-attn",
                                          "out": str(tmp_path / "run")}), progress=False)
    assert Path(summary["samples"]).is_file()
    ck = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ck["model_config"]["text_vocab"] == ["a", "blue", "dot", "red", "square", "the"]
    # the draw of one caption per image per step, from the step's generator
    from dits.text.training import build_text
    from dits.train.distributed import setup_distributed
    from dits.train.sources import build_data

    cfg = resolve_config(None, {**TINY, "data": str(folder), "image_size": 8, "text_encoder": "learned",
                                "batch_size": 4})
    src, text = build_text(cfg, build_data(cfg, setup_distributed("cpu"))[0], setup_distributed("cpu"))
    names = [p.relative_to(folder).as_posix() for p in src.dataset.files]
    a = names.index("a.png")
    seen = {tuple(text.kwargs(torch.tensor([a]), s, 0, 1, "cpu")["text"][0].tolist()) for s in range(40)}
    assert len(seen) == 2  # both captions of a.png turn up
    empty = names.index("c.png")
    assert not text.kwargs(torch.tensor([empty]), 0, 0, 1, "cpu")["text_mask"].any()  # the null caption


# ----------------------------------------------------------------------------- frozen CLIP / T5
@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="the pretrained text encoders need transformers "
                                                              "(pip install 'dits[text]')")
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("encoders")
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="[EOS]")
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=2))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
        eos_token_id=2, decoder_start_token_id=0))
    for name, model in (("clip", clip), ("t5", t5)):
        model.save_pretrained(root / name)
        fast.save_pretrained(root / name)
    (root / "notenc").mkdir()
    return root


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_pretrained_encoder_features_and_the_empty_caption(encoders, kind):
    import transformers

    from dits.text.pretrained import PretrainedTextEncoder

    enc = PretrainedTextEncoder(str(encoders / kind))
    feats, mask = enc.encode(["a red square", "", "the blue dot dot"], 6)
    assert feats.shape == (3, 6, 16) and mask.tolist() == [[1, 1, 1, 0, 0, 0], [0] * 6, [1, 1, 1, 1, 0, 0]]
    assert not feats[1].any()  # the empty caption: no real token, zero features
    cls = transformers.CLIPTextModel if kind == "clip" else transformers.T5EncoderModel
    ref = cls.from_pretrained(encoders / kind).eval()
    ids = torch.tensor([[WORDS.index(w) for w in "a red square".split()] + [0] * 3])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    torch.testing.assert_close(feats[0, :3], want[0, :3], rtol=0, atol=1e-6)


def test_cached_caption_embeddings_equal_on_the_fly_ones(encoders, tmp_path, monkeypatch):
    from dits.text import pretrained
    from dits.text.cache import cached_embeddings, read_cache_text
    from dits.text.training import build_text
    from dits.train.distributed import setup_distributed
    from dits.train.sources import build_data

    caps = {"a.png": ["a red square", "the red square"], "b.png": "a blue dot", "c.png": "the seven"}
    folder = images(tmp_path / "imgs", ["a.png", "b.png", "c.png"], caps)
    cache, enc_dir = tmp_path / "cache", str(encoders / "clip")
    argv = ["extract-latents", "--data", str(folder), "--vae", "pixel", "--image-size", "8", "--out", str(cache),
            "--num-workers", "0", "--store-dtype", "float32", "--captions", "--text-encoder", enc_dir,
            "--max-text-tokens", "5"]
    assert main(argv) == 0
    meta = read_cache_text(cache)
    assert meta["texts"] == ["a red square", "the red square", "a blue dot", "the seven"] and meta["max_tokens"] == 5
    feats, mask = cached_embeddings(cache, meta)
    fly_f, fly_m = pretrained.PretrainedTextEncoder(enc_dir).encode(meta["texts"], 5)
    torch.testing.assert_close(feats[:4], fly_f, rtol=0, atol=1e-6)
    assert torch.equal(mask[:4], fly_m) and not mask[4].any()  # + the null row
    ctx = setup_distributed("cpu")
    on_fly = resolve_config(None, {**TINY, "data": str(folder), "image_size": 8, "text_encoder": enc_dir,
                                   "max_text_tokens": 5, "batch_size": 3})
    from_cache = resolve_config(None, {**TINY, "latents": str(cache), "text_encoder": enc_dir, "batch_size": 3})
    _, fly = build_text(on_fly, build_data(on_fly, ctx)[0], ctx)
    monkeypatch.setattr(pretrained.PretrainedTextEncoder, "__init__",
                        lambda *a, **k: pytest.fail("training from the cache loaded the encoder"))
    _, cached = build_text(from_cache, build_data(from_cache, ctx)[0], ctx)
    assert fly.model_fields == cached.model_fields
    for step in range(6):
        idx = torch.tensor([0, 1, 2])
        a, b = fly.kwargs(idx, step, 0, 3, "cpu"), cached.kwargs(idx, step, 0, 3, "cpu")
        torch.testing.assert_close(a["text"], b["text"], rtol=0, atol=1e-6)
        assert torch.equal(a["text_mask"], b["text_mask"])
    assert main(["train", *FLAGS, "--latents", str(cache), "--text-encoder", enc_dir, "--batch-size", "3",
                 "--steps", "2", "--out", str(tmp_path / "run")]) == 0
    monkeypatch.undo()
    assert main(["extract-latents", *argv[1:]]) == 0  # rerun: nothing to do, nothing changed
    assert read_cache_text(cache) == meta


def test_t5_text_run_and_prompted_sampling(encoders, tmp_path):
    folder = images(tmp_path / "imgs", ["a.png", "b.png"], {"a.png": "a red square", "b.png": "a blue dot"})
    enc = str(encoders / "t5")
    assert main(["train", *FLAGS, "--data", str(folder), "--image-size", "8", "--text-encoder", enc,
                 "--batch-size", "2", "--steps", "2", "--block", "adaln-zero", "--out", str(tmp_path / "run")]) == 0
    mc = load_checkpoint(latest_checkpoint(tmp_path / "run"))["model_config"]
    assert mc["text_encoder"] == str(Path(enc).resolve()) and mc["text_dim"] == 16 and mc["text_tokens"] == 77
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(tmp_path / "run"), "--prompt", "a red dot", "--steps", "2",
                 "--num-samples", "2", "--max-text-tokens", "8", "--out", str(out), "--no-progress"]) == 0
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 3)


# ----------------------------------------------------------------------------- bad input
BAD = [
    (["sample", "--ckpt", "class", "--prompt", "a handwritten seven", "--out", "s.png"], "needs a text-conditional"),
    (["sample", "--ckpt", "text", "--class", "3", "--out", "s.png"], "text-conditional: pass --prompt"),
    (["sample", "--ckpt", "text", "--out", "s.png"], "text-conditional: pass --prompt"),
    (["sample", "--ckpt", "text", "--prompt", "a", "--max-text-tokens", "9", "--out", "s.png"],
     "in-context model was trained with at most 4 text tokens"),
    (["sample", "--ckpt", "text", "--prompt", "a", "--max-text-tokens", "0", "--out", "s.png"], ">= 1"),
    (["sample", "--ckpt", "text", "--prompts", "nope.txt", "--out", "s.png"], "does not exist"),
    (["train", "--data", "imgs", "--image-size", "8", "--text-encoder", "learned", "--captions", "missing.jsonl",
      "--out", "new"], "names 1 image(s) that are not in"),
    (["train", "--data", "bare", "--image-size", "8", "--text-encoder", "learned", "--out", "new"],
     "has no metadata.jsonl"),
    (["train", "--text-encoder", "notenc", "--out", "new"], "not a text encoder directory"),
    (["train", "--text-encoder", "afile", "--out", "new"], "is a file"),
    (["train", "--text-encoder", "learned", "--max-text-tokens", "0", "--out", "new"], "--max-text-tokens must be >= 1"),
    (["train", "--captions", "missing.jsonl", "--out", "new"], "--captions needs a text encoder"),
    (["train", "--data", "glyphs", "--text-encoder", "learned", "--out", "new"], "no captions"),
    (["extract-latents", "--data", "imgs", "--vae", "pixel", "--image-size", "8", "--out", "cache",
      "--captions", "missing.jsonl"], "names 1 image(s) that are not in"),
    (["extract-latents", "--data", "imgs", "--vae", "pixel", "--image-size", "8", "--out", "cache", "--captions",
      "--text-encoder", "notenc"], "not a text encoder directory"),
    (["flops", "DiT-S/2", "--text-tokens", "0"], "--text-tokens must be >= 1"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[:4]) + f" #{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_text_input_is_one_line_exit_2_and_creates_nothing(runs, tmp_path, monkeypatch, capsys, argv, message):
    pytest.importorskip("transformers", reason="the encoder-directory checks need transformers")
    ws = tmp_path / "ws"
    shutil.copytree(runs, ws)
    images(ws / "imgs", ["a.png", "b.png"], {"a.png": "a red square", "b.png": ""})
    images(ws / "bare", ["a.png"])
    (ws / "missing.jsonl").write_text('{"file_name": "c.png", "text": "a blue dot"}\n')
    (ws / "notenc").mkdir()
    (ws / "afile").write_text("not an encoder\n")
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert snapshot(ws) == before
