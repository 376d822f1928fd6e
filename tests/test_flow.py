"""Flow matching: the interpolant, the loss, the samplers against exact solutions, NFE bookkeeping."""
import math

import pytest
import torch

from dits import flow
from dits.bench.samplers import stratified_normal, wasserstein1
from dits.flow import FlowMixtureOracle
from dits.objectives import count_nfe, create_objective

M, S = 0.3, 0.5   # a Gaussian N(M, S²): its probability-flow map is x₀ = M + S·x₁ exactly
MIX = dict(weights=[0.3, 0.4, 0.3], means=[-0.6, 0.05, 0.7], stds=[0.15, 0.2, 0.15])


def test_interpolant_and_velocity_closed_forms():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 1, 3, 3, generator=g,
                                                                                       dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    xt = flow.interpolate(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[3], eps[3])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    # the target is dx_t/dt (central difference of the interpolant)
    h = 1e-4
    fd = (flow.interpolate(x0, eps, t.clamp(h, 1 - h) + h) - flow.interpolate(x0, eps, t.clamp(h, 1 - h) - h)) / (2 * h)
    assert torch.allclose(fd, flow.velocity_target(x0, eps), atol=1e-8)
    assert torch.equal(flow.velocity_target(x0, eps), eps - x0)
    v = eps - x0  # the true velocity gives back the true ε and x₀
    assert torch.allclose(flow.eps_from_velocity(xt, v, t), eps) and torch.allclose(flow.x0_from_velocity(xt, v, t), x0)


def test_training_loss_is_velocity_mse_with_time_scaled_to_999():
    seen = {}

    def zero_model(x, t, y=None):
        seen["t"], seen["x"] = t, x
        return torch.zeros_like(x)

    x0 = torch.full((3, 1, 2, 2), 0.5)
    noise = torch.tensor([1.0, -1.0, 2.0]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    t = torch.tensor([0.0, 0.5, 1.0])
    out = flow.training_losses(zero_model, x0, t, noise=noise)
    # prediction 0: loss = (ε − x₀)² = (0.5, 1.5, 1.5)² per sample
    assert torch.allclose(out["loss"], torch.tensor([0.25, 2.25, 2.25])) and torch.equal(out["loss"], out["mse"])
    assert torch.allclose(seen["t"], torch.tensor([0.0, 499.5, 999.0]))
    assert torch.allclose(seen["x"][1], 0.5 * x0[1] + 0.5 * noise[1])
    exact = flow.training_losses(lambda x, t, y=None: noise - x0, x0, t, noise=noise)
    assert torch.equal(exact["loss"], torch.zeros(3))
    with pytest.raises(ValueError, match="velocity"):
        flow.training_losses(lambda x, t, y=None: torch.cat([x, x], 1), x0, t, noise=noise)


def test_flow_objective_draws_uniform_continuous_t():
    obj = create_objective("flow")
    t = obj.draw_t(20000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and 0 <= t.min() and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.var().item() - 1 / 12) < 0.003
    assert len(set(t.tolist())) > 19000    # continuous, not a grid


def test_oracle_velocity_matches_the_gaussian_closed_form():
    orc = FlowMixtureOracle([1.0], [M], [S])
    x = torch.linspace(-3, 3, 61, dtype=torch.float64).reshape(-1, 1, 1, 1)
    for t in (0.05, 0.3, 0.7, 1.0):
        # E[x₀|x_t] = M + Cov(x₀, x_t)/Var(x_t)·(x_t − (1−t)M), then v = (x_t − E[x₀|x_t])/t
        var_t = (1 - t) ** 2 * S ** 2 + t ** 2
        e0 = M + (1 - t) * S ** 2 / var_t * (x - (1 - t) * M)
        v = orc(x, torch.full((61,), 999.0 * t, dtype=torch.float64))
        assert torch.allclose(v, (x - e0) / t, atol=1e-10), t


def _x1(n=4096, seed=0):
    return stratified_normal((n // 64, 1, 8, 8), seed).double()


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2)])
def test_ode_samplers_converge_at_their_order_to_the_exact_flow_map(sampler, order):
    orc = FlowMixtureOracle([1.0], [M], [S])
    x1 = _x1()
    errs = []
    for steps in (8, 16, 32):
        x0 = flow.sample(orc, x1.shape, sampler=sampler, steps=steps, noise=x1)
        errs.append((x0 - (M + S * x1)).abs().mean().item())
    slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(abs(s - order) < 0.3 for s in slopes), (errs, slopes)


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2)])
def test_ode_samplers_converge_at_their_order_on_the_mixture(sampler, order):
    orc = FlowMixtureOracle(**MIX)
    x1 = _x1()
    ref = flow.sample(orc, x1.shape, sampler="heun", steps=512, noise=x1)   # error ~1e-6, far below the rest
    errs = [(flow.sample(orc, x1.shape, sampler=sampler, steps=k, noise=x1) - ref).abs().mean().item()
            for k in (16, 32, 64)]
    slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(abs(s - order) < 0.25 for s in slopes), (errs, slopes)


def test_ode_and_sde_samplers_reach_the_mixture():
    orc = FlowMixtureOracle(**MIX)
    x1 = _x1(16384).float()
    heun = flow.sample(orc, x1.shape, sampler="heun", steps=50, noise=x1)
    assert wasserstein1(orc.mixture, heun) < 2e-3      # deterministic: only the solver's error
    sde = flow.sample(orc, x1.shape, sampler="sde", steps=250, seed=0)
    exact = [wasserstein1(orc.mixture, orc.sample_data((16384,), torch.Generator().manual_seed(k))) for k in range(3)]
    assert wasserstein1(orc.mixture, sde) < 3 * max(exact), exact   # within iid sampling noise
    few = flow.sample(orc, x1.shape, sampler="sde", steps=5, seed=0)
    assert wasserstein1(orc.mixture, few) > wasserstein1(orc.mixture, sde)


def test_per_sample_seeds_do_not_depend_on_the_batch():
    orc = FlowMixtureOracle(**MIX)
    both = flow.sample(orc, (4, 1, 4, 4), sampler="sde", steps=6, seed=10)
    part = flow.sample(orc, (2, 1, 4, 4), sampler="sde", steps=6, seed=12)
    assert torch.equal(both[2:], part)


@pytest.mark.parametrize("sampler,steps,expected", [("euler", 10, 10), ("sde", 7, 7), ("heun", 10, 19),
                                                    ("heun", 1, 1)])
def test_nfe_counts_match_the_calls(sampler, steps, expected):
    orc = FlowMixtureOracle(**MIX)
    flow.sample(orc, (2, 1, 2, 2), sampler=sampler, steps=steps, seed=0)
    assert orc.calls == flow.nfe(sampler, steps) == expected == count_nfe("flow", sampler, steps)
