"""Weights from anywhere (issue 12 #5, #6): one resolver for run dirs, .pt, .safetensors,
diffusers pipeline/transformer dirs and Hub ids; an exported pipeline samples like its run."""
import numpy as np
import pytest
import torch

from dits.checkpoint import load_model, resolve_weights
from dits.cli import main
from dits.config import resolve_config
from dits.errors import UserError
from dits.models import create_model
from dits.train import train
from test_train import TINY


@pytest.fixture(scope="module")
def run_and_pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    train(resolve_config("digits", {**TINY, "steps": 2, "ckpt_every": 2, "sample_every": 100,
                                    "out": str(root / "run")}), progress=False)
    assert main(["convert", "--to", "diffusers", str(root / "run"), str(root / "pipe")]) == 0
    return root / "run", root / "pipe"


def sample(ckpt, out):
    assert main(["sample", "--ckpt", str(ckpt), "--num-samples", "6", "--no-progress", "--out", str(out)]) == 0
    return np.load(out)["arr_0"]


def test_an_exported_pipeline_samples_like_its_run(run_and_pipe, tmp_path, monkeypatch, capsys):
    run, pipe = run_and_pipe
    want = sample(run, tmp_path / "run.npz")
    assert "ddim, 2 steps, cfg 1.3" in capsys.readouterr().out  # the run's settings, from dits.json too
    for i, src in enumerate([pipe, pipe / "transformer", pipe / "transformer/diffusion_pytorch_model.safetensors"]):
        assert np.array_equal(sample(src, tmp_path / f"{i}.npz"), want), src
        assert "ddim, 2 steps, cfg 1.3" in capsys.readouterr().out
    # a Hub id goes through huggingface_hub (the cache, or a download): here a stand-in for it
    import huggingface_hub
    asked = {}

    def snapshot_download(repo_id, **kw):
        asked.update(repo_id=repo_id, **kw)
        return str(pipe)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert np.array_equal(sample("someone/tiny-dit", tmp_path / "hub.npz"), want)
    assert asked["repo_id"] == "someone/tiny-dit" and asked["local_files_only"] is True


def test_convert_back_from_a_pipeline_keeps_the_weights(run_and_pipe, tmp_path):
    run, pipe = run_and_pipe
    assert main(["convert", "--from", "diffusers", str(pipe), str(tmp_path / "back.pt")]) == 0
    a, info = load_model(tmp_path / "back.pt")
    b, _ = load_model(run)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert info["train_config"]["sampler"] == "ddim"  # provenance travels along


def test_safetensors_state_dict_in_reference_layout(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_model("DiT-S/8", input_size=16, num_classes=10).eval()
    save_file(model.state_dict(), tmp_path / "s8.safetensors")
    w = resolve_weights(tmp_path / "s8.safetensors")
    assert (w.config.depth, w.config.hidden_size, w.config.patch_size) == (12, 384, 8)
    loaded, info = load_model(tmp_path / "s8.safetensors")
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 9])
    assert torch.equal(loaded(x, t, y), model(x, t, y)) and info["weights"] == "model"
    with pytest.raises(UserError, match="not DiT-B/8"):
        resolve_weights(tmp_path / "s8.safetensors", model_name="DiT-B/8")
