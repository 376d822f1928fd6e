"""Loading the reference implementation's checkpoint files, safely and strictly.

The "official" files here come from an independent re-implementation of the reference DiT
(tests/_reference_dit.py: its own key layout and forward, no dits code), so a drift of dits'
layout or forward from the reference's shows up as a failed strict load or different outputs."""
import argparse

import pytest
import torch

import _reference_dit as official
from dits.checkpoint import infer_config, load_model
from dits.errors import UserError
from dits.models import create_model


@pytest.fixture(scope="module")
def reference_s8():
    """DiT-S/8 (depth 12, width 384, 6 heads) at 16x16 latents, 10 classes, random weights."""
    model = official.DiT(input_size=16, patch_size=8, in_channels=4, hidden_size=384, depth=12, num_heads=6,
                         num_classes=10)
    return official.randomised(model, seed=0).eval()


def test_dits_layout_is_the_reference_layout():
    """A fresh dits DiT-S/8 has the reference's keys, shapes and fixed position embedding."""
    ref = official.DiT(input_size=16, patch_size=8, in_channels=4, hidden_size=384, depth=12, num_heads=6,
                       num_classes=10).state_dict()
    with torch.no_grad():
        own = create_model("DiT-S/8", input_size=16, num_classes=10).state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    torch.testing.assert_close(own["pos_embed"], ref["pos_embed"], rtol=0, atol=1e-6)


def test_plain_state_dict_and_training_checkpoint_load_strictly(tmp_path, reference_s8):
    sd = reference_s8.state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    ema = official.randomised(official.DiT(input_size=16, patch_size=8, in_channels=4, hidden_size=384, depth=12,
                                           num_heads=6, num_classes=10), seed=1).eval()
    torch.save({"model": sd, "ema": ema.state_dict(), "opt": {},
                "args": argparse.Namespace(model="DiT-S/8", image_size=128)}, tmp_path / "train.pt")
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 10])  # 10: the null label

    model, info = load_model(tmp_path / "plain.pt")  # DiT-S/8 inferred from the shapes
    assert (model.config.depth, model.config.hidden_size, model.config.num_heads) == (12, 384, 6)
    assert model.num_classes == 10 and model.learn_sigma
    with torch.no_grad():
        want = reference_s8(x, t, y)
        torch.testing.assert_close(model(x, t, y), want, rtol=1e-4, atol=1e-5)
        assert want.abs().max() > 0.1  # the outputs compared are not all ~0
        xx, tt, yy = torch.cat([x[:1], x[:1]]), torch.tensor([500, 500]), torch.tensor([4, 10])
        torch.testing.assert_close(model.forward_with_cfg(xx, tt, yy, 4.0, guided_channels=3),
                                   reference_s8.forward_with_cfg(xx, tt, yy, 4.0), rtol=1e-4, atol=1e-4)

    model, info = load_model(tmp_path / "train.pt")  # {model, ema, opt, args}: the EMA weights
    assert info["weights"] == "ema"
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ema(x, t, y), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(x, t, y), want, atol=1e-3)  # not the non-EMA weights


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
