"""The sampling plan (dits.sample.sampling_plan -> dits.plan.choose_for_sampling): short runs stay
eager without timing anything; a long run times the candidates on one model call of its own shape,
caches them under their own key and says so in one line; a compiled plan draws the same images as
eager (its last, smaller batch padded) and leaves the caller's model uncompiled; bad input is one
line."""
import pytest
import torch

from dits import plan as P
from dits import speed
from dits.errors import UserError
from dits.models import create_model
from dits.sample import generate, sampling_plan

CPU = torch.device("cpu")


def _model():
    torch.manual_seed(0)
    m = create_model("DiT", depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=1,
                     num_classes=10)
    with torch.no_grad():  # adaLN-Zero starts at the identity: give the blocks something to do
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return m.eval()


def test_a_short_sampling_run_stays_eager_and_times_nothing(monkeypatch):
    timed, said = [], []
    monkeypatch.setattr(P, "measure", lambda plan, *a, **k: timed.append(plan.name))
    m = _model()
    images, _ = generate(m, 8, sampler="ddim", steps=3, cfg_scale=2.0, batch_size=4, say=said.append)
    assert timed == [] and said == [] and images.shape == (8, 8, 8, 1)
    choice = sampling_plan(m, 8, batch_size=4, sampler="ddim", steps=3)
    assert choice.plan == P.Plan("eager") and "too short to measure" in choice.line and "calls" in choice.line


def test_a_long_run_measures_once_per_key_and_says_so(monkeypatch):
    # eager candidates only (compiling is tested below): a 50,000-sample DDIM-50 run is 3,150 calls
    monkeypatch.setattr(P, "compile_candidates", lambda device, like: [])
    m = _model()
    first = sampling_plan(m, 50_000, batch_size=800, sampler="ddim", steps=50)
    assert first.probed and first.plan.mode == "eager" and first.key["objective"] == "sample"
    assert first.key["batch"] == 1600                       # the guided call's doubled batch is what is timed
    assert "ms/call" in first.line and "(for 3,150 calls)" in first.line and "cached" in first.line
    unguided = sampling_plan(m, 50_000, batch_size=800, sampler="ddim", steps=50, guided=False)
    assert unguided.key["batch"] == 800 and P.key_digest(unguided.key) != P.key_digest(first.key)
    timed = []
    monkeypatch.setattr(P, "measure", lambda plan, *a, **k: timed.append(plan.name))
    said = []
    generate(m, 4, sampler="ddim", steps=2, cfg_scale=2.0, batch_size=800, plan_samples=50_000 * 25,
             say=said.append)                                # another length, the same key: from the cache
    assert timed == [] and len(said) == 1 and "from the plan cache" in said[0]


@pytest.mark.skipif(speed.compiler_missing(CPU) is not None, reason="no C++ compiler for inductor")
def test_a_compiled_plan_draws_the_eager_images_and_leaves_the_model_as_it_was():
    m = _model()
    kw = dict(sampler="ddim", steps=3, cfg_scale=2.0, seed=7, batch_size=4)
    eager, labs = generate(m, 10, plan="eager", **kw)        # 10 = 4 + 4 + 2: the last batch is padded
    said = []
    compiled, labs2 = generate(m, 10, plan="compile-blocks", say=said.append, **kw)
    assert said == ["plan compile-blocks (--plan)"] and (labs == labs2).all()
    assert abs(eager.astype(int) - compiled.astype(int)).max() <= 1   # uint8 levels: float rounding only
    assert all(blk._compiled_call_impl is None for blk in m.blocks)


def test_bad_plan_and_compile_values_are_one_line_errors(refuses, tmp_path):
    m = _model()
    with pytest.raises(UserError, match="unknown plan"):
        generate(m, 2, sampler="ddim", steps=2, plan="eager+fast")
    with pytest.raises(UserError, match="compile must be one of"):
        generate(m, 2, sampler="ddim", steps=2, compile="sometimes")
    with pytest.raises(UserError, match="contradicts --compile off"):
        generate(m, 2, sampler="ddim", steps=2, plan="compile-model", compile="off")
    refuses(["sample", "--ckpt", str(tmp_path / "missing"), "--plan", "turbo", "--out", "x.png"], "unknown plan")
