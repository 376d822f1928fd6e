"""`dits study backbones` (issue 19 #3, #5): the grid pairs DiTs and U-Nets within 25 % in Gflops
(checked with counts independent of the study's counter), and the report, written from run
directories with synthetic numbers, gives the verdict the numbers imply, with the seed spread."""
import csv
import io
import json
import math

import pytest
import torch
import yaml

from dits.cli import main
from dits.study import backbones as bb
from dits.study.grid import DATA_SETS, SIZES
from dits.study.runner import prepare_out, run_dir
from test_unet import independent_unet_macs


def _independent_gflops(cell) -> float:
    """DiTs by dits.flops (module hooks, fvcore's convention), U-Nets from their architecture."""
    side = DATA_SETS[cell.data]["image_size"]
    if cell.family == "unet":
        return independent_unet_macs(cell.channels, cell.layers, side, 1, 2) / 1e9
    from dits.flops import count_gflops
    from dits.models import create_model

    d, w, h = SIZES[cell.size]
    with torch.device("meta"):
        m = create_model("DiT", depth=d, hidden_size=w, num_heads=h, patch_size=cell.patch, input_size=side,
                         in_channels=1, num_classes=10)
    return count_gflops(m)


@pytest.mark.parametrize("data", ["glyphs", "digits"])
@pytest.mark.parametrize("budget", ["quick", "full"])
def test_grid_pairs_the_families_within_25_percent(data, budget):
    cells = bb.build_grid(budget, data)
    ps = bb.pairs(cells)
    assert len(ps) >= 3 and len({c.name for c in cells}) == len(cells)
    for fam in ("dit", "unet"):  # >= 3 distinct Gflops points per family, each pair a separate level
        g = sorted(c.gflops for c in cells if c.family == fam and not c.seed)
        assert len(g) >= 3 and all(b > a * 1.2 for a, b in zip(g, g[1:])), g
    for d, u in ps:
        assert d.family == "dit" and u.family == "unet"
        gd, gu = _independent_gflops(d), _independent_gflops(u)
        assert max(gd, gu) / min(gd, gu) <= 1.25, (d.label, gd, u.label, gu)
        assert max(d.gflops, u.gflops) / min(d.gflops, u.gflops) <= bb.TOLERANCE
        assert u.gflops == gu                          # the study's counter: the independent U-Net count
        assert abs(d.gflops / gd - 1) < 0.015          # DiT: dits.flops up to its LayerNorm term
    assert {c.family for c in cells if c.seed} == {"dit", "unet"}   # one seed repeat per family
    for c in cells:
        args = c.train_args("R")
        assert ("--backbone" in args) == (c.family == "unet") and args[args.index("--out") + 1] == "R"
        assert ("--patch-size" in args) == (c.family == "dit") and args[args.index("--data") + 1] == data


def test_check_pairs_refuses_a_grid_outside_the_tolerance():
    cells = bb.build_grid("quick", "glyphs")
    a = next(c for c in cells if c.pair == 0 and c.family == "unet" and not c.seed)
    d = next(c for c in cells if c.pair == 0 and c.family == "dit")
    a.gflops = d.gflops * 1.3
    with pytest.raises(ValueError, match="more than the study's 25 %"):
        bb.check_pairs(cells)


# ------------------------------------------------------------------ the report from run dirs
def _fake_study(out, dit_factor, unet_factor, repeat_factor=1.03):
    """Run dirs with what `dits train` writes there (config.yaml, eval.jsonl, a checkpoint name,
    summary.json, a sample grid); metric = level base x family factor (x seed factor)."""
    from PIL import Image

    cells = bb.build_grid("quick", "glyphs")
    prepare_out(out, "backbones", "quick", cells, "glyphs")
    for c in cells:
        d = run_dir(out, c)
        (d / "checkpoints").mkdir(parents=True)
        if c.family == "dit":
            depth, width, heads = SIZES[c.size]
            cfg = {"backbone": "dit", "depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": c.patch,
                   "block": "adaln-zero", "steps": c.steps, "learn_sigma": None, "objective": "diffusion"}
        else:
            cfg = {"backbone": "unet", "unet_channels": ",".join(map(str, c.channels)), "unet_layers": c.layers,
                   "depth": None, "steps": c.steps, "learn_sigma": None, "objective": "diffusion"}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        factor = (dit_factor if c.family == "dit" else unet_factor) * (repeat_factor if c.seed else 1.0)
        base = [40.0, 20.0, 10.0][c.pair]
        with open(d / "eval.jsonl", "w") as f:
            for step in (500, 1000, 1500):
                v = base * factor * 1500 / step
                f.write(json.dumps({"step": step, "fd": v, "fd_heldout": v, "fd_heldout_floor": 1.6, "accuracy": 0.5,
                                    "heldout_mse": v / 100, "train_mse": v / 101, "loss_gap": 0.01}) + "\n")
        (d / "checkpoints" / "0001500.pt").write_bytes(b"")
        (d / "summary.json").write_text("{}")
        Image.new("L", (20, 20), 128).save(d / "samples_0001500.png")
    return cells


@pytest.mark.parametrize("dit,unet,verdict,side,compute", [(0.7, 1.0, "reproduced", "dit", "reproduced"),
                                                           (1.0, 0.7, "reversed", "unet", "reversed"),
                                                           # equal final values, but each U-Net costs more per step:
                                                           # at equal training compute it is less trained, so behind
                                                           (1.0, 1.01, "not reproduced", "neither", "reproduced")])
def test_report_verdict_follows_the_numbers(tmp_path, dit, unet, verdict, side, compute):
    cells = _fake_study(tmp_path, dit, unet)
    rep = bb.write_report(tmp_path, "quick", "glyphs")
    a = rep["verdicts"][0]
    assert a["finding"] == "A" and a["verdict"] == verdict and a["side"] == side
    assert math.isclose(rep["spread"]["fd_heldout"], math.log(1.03), rel_tol=1e-9)   # the repeats' spread
    n = {"dit": (3, 0, 0), "unet": (0, 0, 3), "neither": (0, 3, 0)}[side]            # 1 % is within 3 %
    assert (a["wins"], a["ties"], a["losses"]) == n
    b = rep["verdicts"][1]
    assert b["finding"] == "B" and b["verdict"] == compute and b["wins"] + b["ties"] + b["losses"] == 3
    assert {"dit": "holds here", "unet": "reversed", "neither": "not reproduced"}[side] in rep["claim"]
    assert "seed spread 3.0 %" in rep["claim"]
    table = list(csv.DictReader(io.StringIO((tmp_path / "study.csv").read_text())))
    assert {"run", "family", "gflops"} <= set(table[0]) and len(table) == len(cells)
    by_run = {r["run"]: r for r in table}
    for c in cells:
        assert by_run[c.name]["family"] == c.family and float(by_run[c.name]["gflops"]) == pytest.approx(c.gflops)
    for f in rep["files"]:
        assert (tmp_path / f).is_file(), f
    assert {"backbones_vs_gflops.png", "backbones_vs_compute.png", "backbones_samples.png"} <= set(rep["files"])
    md = (tmp_path / "study.md").read_text()
    assert rep["claim"] in md and "| 0 | DiT-S/4 |" in md


def test_a_failed_or_missing_cell_is_reported_not_scored(tmp_path):
    cells = _fake_study(tmp_path, 0.7, 1.0)
    top = next(c for c in cells if c.pair == 2 and c.family == "unet")
    (run_dir(tmp_path, top) / "summary.json").unlink()
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "logs" / f"{top.name}.failed").write_text("exit code 1: boom\n")
    rep = bb.write_report(tmp_path, "quick", "glyphs")
    row = next(r for r in rep["rows"] if r["run"] == top.name)
    assert row["status"].startswith("failed") and "boom" in row["status"]
    assert rep["verdicts"][0]["wins"] + rep["verdicts"][0]["ties"] + rep["verdicts"][0]["losses"] == 2


def test_study_cli_report_only_and_print_commands(tmp_path, capsys):
    _fake_study(tmp_path / "s", 0.7, 1.0)
    assert main(["study", "backbones", "--report-only", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "finding A: reproduced" in out and "The paper's claim holds here" in out
    assert main(["study", "backbones", "--print-commands", "--out", str(tmp_path / "p")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8 and sum("--backbone unet" in ln for ln in lines) == 4
    assert not (tmp_path / "p").exists()
