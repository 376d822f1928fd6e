"""Loading the reference implementation's checkpoint files, safely and strictly."""
import argparse

import pytest
import torch

from dits.checkpoint import infer_config, load_model
from dits.errors import UserError
from dits.models import create_model


@pytest.fixture(scope="module")
def reference_s8():
    torch.manual_seed(0)
    model = create_model("DiT-S/8", input_size=16, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def test_plain_state_dict_and_training_checkpoint_load_strictly(tmp_path, reference_s8):
    sd = reference_s8.state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    ema = {k: v + 1e-3 for k, v in sd.items()}
    torch.save({"model": sd, "ema": ema, "opt": {}, "args": argparse.Namespace(model="DiT-S/8", image_size=128)},
               tmp_path / "train.pt")
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 9])

    model, info = load_model(tmp_path / "plain.pt")  # DiT-S/8 inferred from the shapes
    assert (model.config.depth, model.config.hidden_size, model.config.num_heads) == (12, 384, 6)
    assert model.num_classes == 10 and model.learn_sigma
    assert torch.equal(model(x, t, y), reference_s8(x, t, y))

    model, info = load_model(tmp_path / "train.pt")  # {model, ema, opt, args}: the EMA weights
    assert info["weights"] == "ema"
    assert torch.equal(model.state_dict()["x_embedder.proj.weight"], ema["x_embedder.proj.weight"])


def test_code_executing_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"pos_embed": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing|not a"):
        load_model(tmp_path / "evil.pt")


def test_custom_size_needs_a_name():
    with torch.device("meta"):
        sd = create_model("DiT", depth=3, hidden_size=64, num_heads=4, input_size=8).state_dict()
    with pytest.raises(UserError, match="custom size"):
        infer_config(sd)
    with pytest.raises(UserError, match="not DiT-S/2"):
        infer_config(sd, "DiT-S/2")
