"""Gflops in the paper's convention (fvcore: one MAC = one flop)."""
import json

import pytest
import torch

from dits.cli import main
from dits.flops import count_gflops, count_flops, flops_table
from dits.models import create_model

TABLE4 = {  # paper, Table 4: (/8, /4, /2)
    "S": (0.36, 1.41, 6.06), "B": (1.42, 5.56, 23.01),
    "L": (5.01, 19.70, 80.71), "XL": (7.39, 29.05, 118.64),
}


@pytest.fixture(scope="module")
def rows():
    return {r["model"]: r["gflops"] for r in flops_table()}


def test_table4_within_half_a_percent(rows):
    for size, values in TABLE4.items():
        for patch, ref in zip((8, 4, 2), values):
            got = rows[f"DiT-{size}/{patch}"]
            assert abs(got - ref) / ref < 0.005, (size, patch, got, ref)


@pytest.mark.parametrize("block,ref", [("adaln-zero", 118.6), ("adaln", 118.6),
                                       ("cross-attn", 137.6), ("in-context", 119.4)])
def test_block_design_gflops(block, ref):
    with torch.device("meta"):
        m = create_model("DiT-XL/2", block=block)
    assert abs(count_gflops(m) - ref) / ref < 0.005


def test_closed_form_for_a_tiny_model():
    m = create_model("DiT", depth=1, hidden_size=8, num_heads=2, patch_size=2, input_size=4, in_channels=1,
                     num_classes=3, learn_sigma=False)
    T, D, p, C = 4, 8, 2, 1
    expected = (T * p * p * C * D            # patch conv
                + 256 * D + D * D            # timestep MLP
                + 12 * T * D * D + 2 * T * T * D + 6 * D * D  # block: linears, attention matmuls, adaLN
                + 2 * 4 * T * D              # two LayerNorms, 4 flops/element (no affine)
                + 2 * D * D + T * D * p * p * C + 4 * T * D)  # final adaLN, linear, LayerNorm
    assert count_flops(m) == expected


def test_halving_patch_about_quadruples(rows):
    # T quadruples; the patch conv, final linear and embedders stay constant, so the
    # ratio is slightly under 4 for the smallest models (paper: S/8 -> S/4 is 0.36 -> 1.41).
    for s in "S B L XL".split():
        assert 3.9 < rows[f"DiT-{s}/4"] / rows[f"DiT-{s}/8"] and 3.9 < rows[f"DiT-{s}/2"] / rows[f"DiT-{s}/4"]


def test_input_size_override_leaves_model_untouched():
    with torch.device("meta"):
        m = create_model("DiT-XL/2")
    g64 = count_gflops(m, input_size=64)
    assert m.config.input_size == 32
    assert g64 > 4 * count_gflops(m)


def test_cli_flops_json_and_table(capsys):
    assert main(["flops", "DiT-XL/2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "DiT-XL/2" and out["params"] == 675_129_632 and abs(out["gflops"] - 118.64) < 0.6
    assert main(["flops", "--all"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 13 and "DiT-XL/8" in lines[-1]
    assert main(["flops", "DiT-Z/2"]) == 2
    assert "valid names" in capsys.readouterr().err
