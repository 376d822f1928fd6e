"""Model cards and --push-to-hub (issue 23 #2, #5): `dits convert --to diffusers RUN OUT` writes
OUT/README.md in the Hub's format; `--push-to-hub REPO_ID` uploads OUT through huggingface_hub
(mocked here: no network), and when it cannot, nothing is exported."""
import json
import re
from pathlib import Path

import pytest
import yaml

from dits.cli import main
from dits.config import resolve_config
from dits.flops import count_gflops, count_params
from dits.interop.model_card import model_card
from dits.models import create_model
from dits.train import train

# a 1-block, width-32 DiT on the built-in digits: each run takes about a second
TINY = dict(objective="diffusion", model="DiT", depth=1, hidden_size=32, num_heads=2, patch_size=2, batch_size=16, lr=1e-3,
            warmup_steps=3, grad_clip=1.0, ema_decay=0.9, ema_warmup=True, log_every=5, ckpt_every=10,
            sampler="ddim", sample_steps=2, samples_per_class=1, eval_samples=0, seed=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny class-conditional run on the digits, evaluated at its last step."""
    out = tmp_path_factory.mktemp("card") / "tiny-digits"
    train(resolve_config("digits", {**TINY, "steps": 4, "log_every": 2, "ckpt_every": 4, "sample_every": 4,
                                    "eval_samples": 20, "out": str(out)}), progress=False)
    return out


def front_matter(text: str) -> dict:
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1))


def python_block(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def convert(src, dst, *extra):
    return main(["convert", "--to", "diffusers", str(src), str(dst), *extra])


def test_card_front_matter_and_numbers_from_the_run(run, tmp_path):
    out = tmp_path / "pipe"
    assert convert(run, out) == 0
    text = (out / "README.md").read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert {"dit", "dits", "class-conditional", "pixel-space", "digits"} <= set(meta["tags"])
    assert "license" not in meta and "\n# license: " in text.split("\n---\n")[0]  # left for the user

    from dits.checkpoint import load_model
    model, _ = load_model(run)
    assert f"| parameters | {count_params(model):,} |" in text
    assert f"| Gflops (one forward pass, one image) | {count_gflops(model):.4g} |" in text
    assert "| steps | 4 (of 4 planned) |" in text and "| global batch | 16 |" in text
    assert "| precision | fp32 |" in text and "| data | digits |" in text and "wall time" in text
    ev = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert f"| class accuracy (MLP classifier) | {100 * ev['accuracy']:.1f} % |" in text
    assert f"({ev['fd_heldout'] / ev['fd_heldout_floor']:.2f}x)" in text
    assert f"| held-out denoising loss | {ev['heldout_mse']:.4f}" in text
    # the run's sample grid travels with the card
    assert "![samples](samples.png)" in text
    assert (out / "samples.png").read_bytes() == (run / "samples_0000004.png").read_bytes()


def test_card_python_lines_load_and_sample_with_diffusers(run, tmp_path):
    out = tmp_path / "pipe"
    assert convert(run, out) == 0
    code = python_block((out / "README.md").read_text())
    assert f'from_pretrained("{out}"' in code and "DiTPipeline" in code
    scope = {}
    exec(code.replace("num_inference_steps=50", "num_inference_steps=3"), scope)
    images = scope["images"]
    assert len(images) == 4 and images[0].size == (8, 8)


def test_card_of_an_unconditional_model_without_a_run(tmp_path):
    model = create_model("DiT", depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4,
                         num_classes=0)
    text, files = model_card(model, {"source": "/somewhere/private/model.pt", "weights": "model"},
                             where="me/latent-dit", has_vae=False, vae_spec="stabilityai/sd-vae-ft-ema")
    meta = front_matter(text)
    assert {"dit", "dits", "unconditional", "latent-diffusion"} <= set(meta["tags"]) and files == {}
    assert "no training configuration" in text and "No evaluation was recorded" in text
    assert "/somewhere/private" not in text  # local paths by their name only
    code = python_block(text)
    assert 'AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema")' in code and "me/latent-dit" in code
    assert "class_labels=[0] * 4" in code


# --------------------------------------------------------------------------- --push-to-hub
class FakeHub:
    """Stands in for huggingface_hub.HfApi; records what would have been uploaded."""
    calls: list = []
    fail = False

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeHub.calls.append(("create_repo", repo_id, kw, self.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        FakeHub.calls.append(("upload_folder", repo_id, kw, files, (folder / "README.md").read_text()))
        if FakeHub.fail:
            raise ConnectionError("Max retries exceeded with url: /api/repos/create")


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub
    FakeHub.calls, FakeHub.fail = [], False
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    return FakeHub


def test_push_to_hub_uploads_the_export_folder(run, tmp_path, hub, capsys):
    out = tmp_path / "pipe"
    assert convert(run, out, "--push-to-hub", "someone/tiny-dit") == 0
    assert "pushed to https://huggingface.co/someone/tiny-dit" in capsys.readouterr().out
    (_, repo, kw, token), (_, repo2, kw2, files, card) = hub.calls
    assert repo == repo2 == "someone/tiny-dit" and kw["repo_type"] == kw2["repo_type"] == "model"
    assert token == "hf_test_token" and kw["exist_ok"] is True
    want = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == want  # the whole export, as it then lands in OUT
    assert {"README.md", "model_index.json", "dits.json", "samples.png"} <= set(files)
    assert any(f.startswith("transformer/") and f.endswith(".safetensors") for f in files)
    assert card == (out / "README.md").read_text()
    assert 'from_pretrained("someone/tiny-dit"' in python_block(card)


def no_export(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize("case,needle", [
    ("offline", "HF_HUB_OFFLINE is set"),
    ("no token", "needs a Hugging Face token"),
    ("bad id", "is not a Hub repository id"),
    ("upload fails", "the upload failed (Max retries exceeded"),
])
def test_push_to_hub_that_cannot_push_leaves_nothing(run, tmp_path, hub, monkeypatch, capsys, case, needle):
    import huggingface_hub
    repo = "someone/tiny-dit"
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif case == "no token":
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    elif case == "bad id":
        repo = "not a/valid id"
    else:
        hub.fail = True
    out = tmp_path / "pipe"
    assert convert(run, out, "--push-to-hub", repo) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert no_export(out)
    assert [c[0] for c in hub.calls] == (["create_repo", "upload_folder"] if case == "upload fails" else [])


def test_push_to_hub_needs_to_diffusers(run, tmp_path, hub, capsys):
    assert main(["convert", "--from", "diffusers", str(run), str(tmp_path / "x.pt"), "--push-to-hub", "a/b"]) == 2
    assert "--push-to-hub uploads a diffusers export" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
