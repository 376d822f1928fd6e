"""The sampler benchmark and its CLI (tiny settings: a smoke test, not the measurement)."""
import pytest
import torch

from dits.cli import main
from dits.bench import samplers as benchmark
from dits.diffusion.oracle import gaussian_oracle


def test_wasserstein1_against_closed_forms():
    orc = gaussian_oracle(0.0, 0.5)
    q = benchmark.stratified_normal((1, 1, 128, 128), seed=0).double().flatten() * 0.5
    assert benchmark.wasserstein1(orc, q) < 3e-4              # the exact quantiles: O(1/n)
    assert benchmark.wasserstein1(orc, q + 0.01) == pytest.approx(0.01, rel=0.02)   # a shift costs |shift|
    assert benchmark.wasserstein1(orc, q * 1.1) == pytest.approx(0.1 * 0.5 * (2 / torch.pi) ** 0.5, rel=0.02)


def test_run_returns_a_table_per_dataset():
    lines = []
    res = benchmark.run(samples=2048, nfes=(5, 10), samplers=("ddim", "dpm++"), datasets=("mixture",),
                        out=lines.append)
    assert set(res) == {"mixture"} and set(res["mixture"]) == {"ddim", "dpm++"}
    assert set(res["mixture"]["dpm++"]) == {5, 10}
    assert res["mixture"]["dpm++"][10] < res["mixture"]["ddim"][10]
    assert any(line.lstrip().startswith("dpm++") for line in lines)


def test_cli_bench_samplers(capsys):
    assert main(["bench", "samplers", "--quick", "--samples", "2048"]) == 0
    out = capsys.readouterr().out
    assert "ddpm" in out and "dpm++" in out and "NFE" in out
    assert main(["bench", "samplers", "--samples", "10"]) == 2
    assert "--samples" in capsys.readouterr().err
