"""--objective flow end to end: presets, checkpoints that remember the objective, bad input."""
import json
import shutil

import numpy as np
import pytest
import torch

from dits.checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint, save_model
from dits.bench import flow as bench
from dits.cli import main
from dits.config import load_preset, resolve_config
from dits.objectives import objective_of
from dits.sample import generate
from dits.train import train

TINY = dict(objective="diffusion", model="DiT", depth=1, hidden_size=32, num_heads=2, patch_size=2, batch_size=16, lr=1e-3,
            warmup_steps=3, log_every=2, ckpt_every=4, sample_steps=2, samples_per_class=1, eval_samples=0, seed=3)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def test_preset_section_per_objective():
    """The digits preset trains flow with logit-normal t (issue 21's measured winner); its
    ``diffusion:`` section gives back the diffusion preset it had before, key for key."""
    preset = resolve_config("digits", {})
    fl = resolve_config("digits", {"objective": "flow"})
    diff = resolve_config("digits", {"objective": "diffusion"})
    assert (preset.objective, preset.t_sampling, preset.sampler, preset.sample_steps) == \
        ("flow", "logit-normal", "heun", 10)
    assert fl == preset
    assert (diff.objective, diff.t_sampling, diff.sampler, diff.sample_steps) == ("diffusion", "uniform", "dpm++", 20)
    section = {"objective", *load_preset("digits")["diffusion"]}   # what the diffusion section changes
    assert section == {"objective", "t_sampling", "sampler", "sample_steps", "steps", "sample_every", "cfg_scale",
                       "guidance_interval"}
    # flow guides only the less noisy half (measured, docs/convergence.md); diffusion as before, unguided interval
    assert (preset.steps, preset.cfg_scale, preset.guidance_interval) == (2500, 1.4, "0,0.5")
    assert (diff.steps, diff.cfg_scale, diff.guidance_interval) == (4000, 1.3, None)
    assert {k: v for k, v in diff.to_dict().items() if k not in section} \
        == {k: v for k, v in preset.to_dict().items() if k not in section}
    assert resolve_config("digits", {"objective": "flow", "sampler": "euler"}).sampler == "euler"  # flags win
    assert resolve_config("digits", {"t_sampling": "uniform"}).t_sampling == "uniform"
    assert diff.learn_sigma is None and fl.learn_sigma is None   # automatic: resolved per objective
    # the glyphs preset (the study testbed's) and the imagenet256 preset keep the paper's diffusion
    assert resolve_config("glyphs", {}).objective == "diffusion"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step run of each objective (shared: training is the slow part)."""
    root = tmp_path_factory.mktemp("runs")
    train(resolve_config("digits", {**TINY, "objective": "flow", "steps": 4, "out": str(root / "flow"),
                                    "guidance_interval": "0.1,0.9"}), progress=False)
    train(resolve_config("digits", {**TINY, "steps": 4, "out": str(root / "diff"), "sampler": "ddim"}),
          progress=False)
    return root


def test_flow_run_round_trips_and_samples(runs, tmp_path, capsys):
    run = runs / "flow"
    model, info = load_model(run)
    assert objective_of(info) == "flow" and not model.learn_sigma and model.out_channels == model.in_channels
    # an inference checkpoint keeps the objective at the top level
    save_model(tmp_path / "m.pt", model, objective="flow")
    again, info2 = load_model(tmp_path / "m.pt")
    assert objective_of(info2) == "flow"
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    a, _ = generate(model, 6, sampler="euler", steps=3, cfg_scale=2.0, seed=1, objective="flow",
                    guidance_interval=(0.2, 0.8))
    b, _ = generate(again, 6, sampler="euler", steps=3, cfg_scale=2.0, seed=1, objective="flow",
                    guidance_interval=(0.2, 0.8), batch_size=4)
    assert np.array_equal(a, b)
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(run), "--num-samples", "5", "--steps", "3", "--out", str(out),
                 "--guidance-interval", "0.3,0.7"]) == 0
    assert np.load(out)["arr_0"].shape == (5, 8, 8, 1)
    assert "flow heun" in capsys.readouterr().out        # the run's preview sampler is the default
    for argv, needle in [(["--sampler", "ddpm"], "diffusion sampler"), (["--sampler", "rk4"], "unknown"),
                         (["--guidance-interval", "0.8,0.2"], "LO <= HI"),
                         (["--guidance-interval", "0.5,1.5"], "0 <= LO")]:
        code, err = run_cli(capsys, "sample", "--ckpt", run, "--out", tmp_path / "x.npz", *argv)
        assert code == 2 and needle in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "x.npz").exists()
    code, err = run_cli(capsys, "convert", "--to", "diffusers", run, tmp_path / "pipe")
    assert code == 2 and "flow model" in err and not (tmp_path / "pipe").exists()


def test_old_checkpoints_are_diffusion(runs, tmp_path, capsys):
    run = tmp_path / "diff"
    shutil.copytree(runs / "diff", run)
    ck = load_checkpoint(latest_checkpoint(run))
    assert ck["train_config"]["objective"] == "diffusion"
    del ck["train_config"]["objective"], ck["train_config"]["learn_sigma"]   # as written before flow existed
    save_checkpoint(latest_checkpoint(run), ck)
    model, info = load_model(run)
    assert objective_of(info) == "diffusion" and model.learn_sigma
    code, err = run_cli(capsys, "sample", "--ckpt", run, "--sampler", "euler", "--out", tmp_path / "s.npz")
    assert code == 2 and "flow sampler" in err and "diffusion model" in err


@pytest.mark.parametrize("argv,needle", [
    (["--objective", "score"], "unknown objective"),
    (["--objective", "flow", "--learn-sigma", "true"], "--learn-sigma true"),
    (["--objective", "flow", "--sampler", "ddpm"], "diffusion sampler"),
    (["--objective", "diffusion", "--sampler", "sde"], "flow sampler"),
    (["--guidance-interval", "0.9,0.1"], "LO <= HI"),
])
def test_train_bad_objective_input(capsys, tmp_path, argv, needle):
    code, err = run_cli(capsys, "train", *argv, "--out", tmp_path / "r", "--no-progress")
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_bench_flow_smoke(runs, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "flow", "--diffusion", runs / "diff", "--flow", runs / "flow", "--out", out, "--samples", "100",
            "--nfe", "2,3", "--scales", "1,2", "--interval", "0.3,0.7"]
    assert main([str(a) for a in argv]) == 0
    res = json.loads((out / "results.json").read_text())
    # 3 samplers per objective at NFE 2 and 3, and (1, 2 constant, 2 interval) per objective
    assert len(res) == 12 + 6
    assert bench.plan({"diffusion": 1.3, "flow": 1.3, "diffusion_preview": ("dpm++", 20),
                       "flow_preview": ("heun", 10)}, (50, 250), (1.0,), ()).count(("flow", "euler", 250, 1.3, None)) == 0
    flow_heun = [r for r in res.values() if r["objective"] == "flow" and r["sampler"] == "heun" and r["cfg_scale"] == 2]
    nfe = sorted(r["nfe"] for r in flow_heun)  # heun, 2 steps: calls at t = 1, 0.5, 0.5; 2 inside [0.3, 0.7]
    assert nfe == [5, 6]
    for f in ("flow_bench.md", "flow_nfe.png", "flow_guidance.png"):
        assert (out / f).stat().st_size > 0
    assert "| 0.3–0.7 | 5 |" in (out / "flow_bench.md").read_text()
    code, err = run_cli(capsys, "bench", "flow", "--diffusion", runs / "flow", "--flow", runs / "flow", "--out", out)
    assert code == 2 and "holds a flow model" in err


def test_flow_run_resumes_on_the_same_trajectory(tmp_path):
    """Flow's t comes from the step's generator too: 3 steps + resume to 6 = 6 steps straight."""
    kw = {**TINY, "objective": "flow", "ckpt_every": 3, "sample_every": 100, "sampler": "euler"}
    train(resolve_config("digits", {**kw, "steps": 6, "out": str(tmp_path / "straight")}), progress=False)
    train(resolve_config("digits", {**kw, "steps": 3, "out": str(tmp_path / "split")}), progress=False)
    train(resolve_config(None, {"steps": 6}), resume=str(tmp_path / "split"), progress=False)
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("straight", "split"))
    assert a["step"] == b["step"] == 6 and b["train_config"]["objective"] == "flow"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k]), k


def test_bench_preset_times_the_diffusion_run():
    """`dits bench train --preset digits` times the official code's objective, so it plans for the
    run `dits train --preset digits --objective diffusion` starts (4,000 steps), not the flow
    preset's 2,500."""
    import argparse

    from dits.cli import bench
    p = argparse.ArgumentParser()
    bench.register(p.add_subparsers())
    s = bench._setup(p.parse_args(["bench", "train", "--preset", "digits"]))
    assert s.run_steps == resolve_config("digits", {"objective": "diffusion"}).steps == 4000
    assert resolve_config("digits", {}).steps == 2500
