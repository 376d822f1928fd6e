"""Samplers, guidance, determinism and the sample() entry point.

Ground truth: for Gaussian data N(μ, σ²) the exact ε is linear in x_t
(:mod:`dits.diffusion.oracle`), and the probability-flow ODE maps x at ᾱ to
√ᾱ'·μ + v'·(x − √ᾱ·μ)/v with v = √(ᾱσ² + 1 − ᾱ): every standardised value is preserved.
"""
import math

import pytest
import torch

import dits.diffusion as D
from dits.diffusion import Schedule, create_diffusion, sample, space_timesteps, timesteps_for
from dits.diffusion.guidance import combine_guided, guided_model
from dits.diffusion.oracle import GaussianMixtureOracle, gaussian_oracle
from dits.errors import UserError

MU, SD = 0.3, 0.5
AB = Schedule.named().alphas_cumprod



def _flow(x, ab_from, ab_to, mu=MU, sd=SD):
    v_from = math.sqrt(ab_from * sd ** 2 + 1 - ab_from)
    v_to = math.sqrt(ab_to * sd ** 2 + 1 - ab_to)
    return math.sqrt(ab_to) * mu + v_to * (x - math.sqrt(ab_from) * mu) / v_from


def _xt(n=512, seed=0):
    return torch.randn(n, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the oracle itself
def test_oracle_eps_is_the_gaussian_closed_form_and_the_score_of_the_mixture():
    orc = gaussian_oracle(MU, SD, learn_sigma=False)
    x = _xt(4)
    t = torch.tensor([0, 100, 500, 999])
    ab = AB[t].view(-1, 1, 1, 1)
    want = (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * SD ** 2 + 1 - ab)
    torch.testing.assert_close(orc(x, t), want)
    # For a mixture, ε = −√(1−ᾱ) ∇ log p_t(x): check against autograd of the marginal density.
    mix = GaussianMixtureOracle([0.3, 0.7], [-0.5, 0.4], [0.1, 0.3], learn_sigma=False)
    x = torch.linspace(-2, 2, 41, dtype=torch.float64).view(41, 1, 1, 1).requires_grad_(True)
    tt = torch.full((41,), 300)
    a, s2 = AB[300].sqrt().item(), 1 - AB[300].item()
    dens = sum(w * torch.exp(-(x - a * m) ** 2 / (2 * (a * a * sd * sd + s2))) / math.sqrt(a * a * sd * sd + s2)
               for w, m, sd in [(0.3, -0.5, 0.1), (0.7, 0.4, 0.3)])
    score, = torch.autograd.grad(dens.log().sum(), x)
    torch.testing.assert_close(mix(x.detach(), tt), -math.sqrt(s2) * score)


# ----------------------------------------------------------------------------- convergence
@pytest.mark.parametrize("sampler,steps,tol", [("ddim", (10, 40, 160), 0.02), ("dpm++", (5, 20, 80), 1e-3),
                                               ("heun", (5, 20, 80), 1e-3)])
def test_deterministic_samplers_converge_to_the_exact_flow(sampler, steps, tol):
    orc = gaussian_oracle(MU, SD)
    x_t = _xt()
    errs = []
    for k in steps:
        ts = timesteps_for(sampler, k)
        out = sample(orc, x_t.shape, sampler=sampler, steps=k, noise=x_t)
        end = 1.0 if sampler == "ddim" else AB[ts[0]].item()   # DDIM returns x̂₀, the ODE solvers x at t=0
        errs.append((out - _flow(x_t, AB[ts[-1]].item(), end)).abs().mean().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < tol, errs
    if sampler != "ddim":  # second order: 4x the steps, ≥ ~10x less error in the asymptotic range
        assert errs[2] < errs[1] / 8, errs


# DDPM uses the oracle's (ideal) learned variance; DDIM with η = 1 is DDPM with the fixed small
# variance β̃, which needs many more steps (IDDPM's observation).
@pytest.mark.parametrize("sampler,kwargs,steps", [("ddpm", {}, (5, 100)), ("ddim", {"eta": 1.0}, (20, 500))])
def test_stochastic_samplers_converge_to_the_data_mean_and_std(sampler, kwargs, steps):
    orc = gaussian_oracle(MU, SD)
    shape = (64, 1, 16, 16)   # 16384 values: the std of the estimates is ~0.003
    errs = []
    for k in steps:
        x = sample(orc, shape, sampler=sampler, steps=k, seed=1, **kwargs)
        errs.append(abs(x.mean().item() - MU) + abs(x.std().item() - SD))
    assert errs[1] < 0.015 and errs[0] > 2 * errs[1], errs


def test_ddim_eta0_is_deterministic_and_inverts():
    orc = gaussian_oracle(MU, SD)
    x_t = _xt(64)
    d = create_diffusion("ddim50")
    torch.manual_seed(0)
    a = d.ddim_sample_loop(orc, x_t.shape, noise=x_t)
    torch.manual_seed(1)
    assert torch.equal(a, d.ddim_sample_loop(orc, x_t.shape, noise=x_t))
    errs = []
    for spacing in ("ddim25", "ddim100", "ddim500"):
        d = create_diffusion(spacing)
        x0 = d.ddim_sample_loop(orc, x_t.shape, noise=x_t, clip_denoised=False)
        back = d.ddim_reverse_sample_loop(orc, x0)
        errs.append((back - x_t).abs().max().item())
        # and the other way round: data -> latent -> data
        data = MU + SD * _xt(64, seed=5)
        again = d.ddim_sample_loop(orc, data.shape, noise=d.ddim_reverse_sample_loop(orc, data), clip_denoised=False)
        errs[-1] = max(errs[-1], (again - data).abs().max().item())
    # Explicit Euler both ways: the round trip is first order in the step (×20 steps, ≥ ×15 less error).
    assert errs[0] > errs[1] > errs[2] and errs[2] < min(0.05, errs[0] / 15), errs


# ----------------------------------------------------------------------------- timesteps and NFE
def _recording(channels=2):
    def model(x, t, y=None):
        model.seen.append(t.tolist())
        assert t.dtype == torch.long
        return torch.zeros(x.shape[0], channels, *x.shape[2:], dtype=x.dtype)
    model.seen = []
    return model


def test_loops_call_the_model_with_original_timesteps():
    d = create_diffusion("10")
    kept = sorted(space_timesteps(1000, "10"))
    for loop in (d.p_sample_loop, d.ddim_sample_loop):
        m = _recording()
        loop(m, (2, 1, 2, 2))
        assert [s[0] for s in m.seen] == kept[::-1] and all(s[0] == s[1] for s in m.seen)
    m = _recording()
    d.dpm_solver_sample_loop(m, (2, 1, 2, 2))
    assert [s[0] for s in m.seen] == kept[::-1][:-1]


@pytest.mark.parametrize("sampler", D.SAMPLERS)
@pytest.mark.parametrize("steps", [1, 7])
def test_sample_calls_the_model_on_its_grid_with_the_stated_nfe(sampler, steps):
    m = _recording()
    sample(m, (3, 1, 2, 2), sampler=sampler, steps=steps, seed=0)
    ts = timesteps_for(sampler, steps)
    assert len(m.seen) == D.nfe(sampler, steps)
    order = [s[0] for s in m.seen]
    if sampler in ("ddpm", "ddim"):
        assert order == ts[::-1]
    elif sampler == "dpm++":
        assert order == ts[::-1][:-1]
    else:
        assert order == [t for i in range(len(ts) - 1, 0, -1) for t in (ts[i], ts[i - 1])]


def test_sampler_grids():
    assert timesteps_for("ddpm", 250) == sorted(space_timesteps(1000, "250"))
    assert timesteps_for("ddim", 50) == list(range(0, 1000, 20))
    assert timesteps_for("ddim", 300) == sorted(space_timesteps(1000, "300"))   # no integer stride gives 300
    assert len(timesteps_for("dpm++", 10)) == 11 and len(timesteps_for("heun", 10)) == 11


# ----------------------------------------------------------------------------- guidance
class _Conditional:
    """A tiny class-conditional model: output depends on x, t and the label."""
    num_classes = 10

    def __init__(self, learn_sigma=True):
        self.calls, self.learn_sigma = [], learn_sigma

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.tolist()))
        bias = (y.double() / 10 + t.double() / 1000).view(-1, 1, 1, 1).to(x.dtype)
        eps = 0.3 * x + bias
        return torch.cat([eps, torch.tanh(x + bias)], dim=1) if self.learn_sigma else eps


def test_guided_model_with_scale_one_equals_the_conditional_model():
    m = _Conditional()
    x = torch.randn(3, 4, 2, 2)
    t = torch.tensor([5, 6, 7])
    y = torch.tensor([1, 2, 3])
    torch.testing.assert_close(guided_model(m, 1.0, 10, eps_channels=4)(x, t, y), m(x, t, y))
    out = guided_model(m, 4.0, 10, eps_channels=4, guided_channels=3)(x, t, y)
    assert m.calls[-1] == (6, [1, 2, 3, 10, 10, 10])   # one forward: conditional then null labels
    cond, uncond = m(x, t, y), m(x, t, torch.full_like(y, 10))
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])   # 4th ε channel and all variance channels unguided
    torch.testing.assert_close(combine_guided(torch.cat([cond, uncond]), 4.0, 4, 3)[:3], out)


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_guided_sampling_with_scale_one_equals_unguided(sampler):
    y = torch.tensor([1, 7])
    noise = torch.randn(2, 4, 2, 2)
    m = _Conditional()
    plain = sample(m, noise.shape, y=y, sampler=sampler, steps=4, noise=noise, seed=3)
    assert all(n == 2 for n, _ in m.calls)   # no doubled batch at scale 1
    forced = sample(guided_model(m, 1.0, 10, eps_channels=4), noise.shape, y=y, sampler=sampler, steps=4,
                    noise=noise, seed=3)
    torch.testing.assert_close(plain, forced)
    m.calls.clear()
    guided = sample(m, noise.shape, y=y, sampler=sampler, steps=4, noise=noise, seed=3, cfg_scale=4.0)
    assert all(n == 4 and labels[2:] == [10, 10] for n, labels in m.calls)
    assert not torch.allclose(guided, plain)


# ----------------------------------------------------------------------------- randomness
def test_per_sample_seeds_do_not_depend_on_the_batch():
    orc = gaussian_oracle(MU, SD, learn_sigma=True)
    four = sample(orc, (4, 1, 3, 3), sampler="ddpm", steps=5, seed=10)
    two = sample(orc, (2, 1, 3, 3), sampler="ddpm", steps=5, seed=12)
    torch.testing.assert_close(four[2:], two)
    assert torch.equal(four, sample(orc, (4, 1, 3, 3), sampler="ddpm", steps=5, seed=10))
    assert not torch.allclose(four, sample(orc, (4, 1, 3, 3), sampler="ddpm", steps=5, seed=11))


def test_generator_and_global_rng_are_reproducible():
    orc = gaussian_oracle(MU, SD)
    a = sample(orc, (2, 1, 3, 3), sampler="ddim", steps=5, eta=1.0, generator=torch.Generator().manual_seed(4))
    b = sample(orc, (2, 1, 3, 3), sampler="ddim", steps=5, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    torch.manual_seed(0)
    a = create_diffusion("5").p_sample_loop(orc, (2, 1, 3, 3))
    torch.manual_seed(0)
    assert torch.equal(a, create_diffusion("5").p_sample_loop(orc, (2, 1, 3, 3)))


# ----------------------------------------------------------------------------- odds and ends
def test_x_start_models_and_clipping():
    orc = gaussian_oracle(MU, SD, learn_sigma=False)
    ab = lambda t: AB[t].view(-1, 1, 1, 1)  # noqa: E731

    def x0_model(x, t, y=None):   # the same oracle, predicting x₀ instead of ε
        return (x - (1 - ab(t)).sqrt() * orc(x, t)) / ab(t).sqrt()
    x_t = _xt(8)
    a = sample(orc, x_t.shape, sampler="dpm++", steps=10, noise=x_t, learn_sigma=False)
    b = sample(x0_model, x_t.shape, sampler="dpm++", steps=10, noise=x_t, learn_sigma=False, predict_xstart=True)
    torch.testing.assert_close(a, b)
    c = sample(orc, x_t.shape, sampler="ddim", steps=10, noise=4 * x_t, learn_sigma=False, clip_denoised=True)
    assert c.abs().max() <= 1.0


def test_progress_bar(capsys):
    sample(gaussian_oracle(MU, SD), (1, 1, 2, 2), sampler="ddpm", steps=3, progress=True)
    assert "ddpm" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="euler"), "unknown sampler"),
    (dict(steps=0), "steps"),
    (dict(sampler="dpm++", steps=1000), "steps"),
    (dict(cfg_scale=2.0), "needs class labels"),
    (dict(sampler="dpm++", eta=0.5), "eta"),
    (dict(noise_schedule="sqrt"), "noise schedule"),
    (dict(shape=(2, 1, 4)), "noise has shape"),
])
def test_bad_arguments_are_user_errors(kwargs, match):
    shape = kwargs.pop("shape", (2, 1, 2, 2))
    with pytest.raises(UserError, match=match):
        sample(gaussian_oracle(MU, SD), shape, noise=torch.zeros(2, 1, 2, 2), **kwargs)


def test_guidance_without_null_class_is_a_user_error():
    model = lambda x, t, y: torch.zeros(x.shape[0], 2, *x.shape[2:])  # noqa: E731
    with pytest.raises(UserError, match="null_class"):
        sample(model, (1, 1, 2, 2), y=torch.tensor([0]), cfg_scale=2.0, steps=2)
    out = sample(model, (1, 1, 2, 2), y=torch.tensor([0]), cfg_scale=2.0, steps=2, null_class=5)
    assert out.shape == (1, 1, 2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    orc = gaussian_oracle(MU, SD)
    cpu = sample(orc, (4, 1, 4, 4), sampler="ddpm", steps=20, seed=0, device="cpu")
    gpu = sample(orc, (4, 1, 4, 4), sampler="ddpm", steps=20, seed=0, device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    d = create_diffusion("")
    x0 = torch.randn(2, 1, 4, 4, device="cuda")
    terms = d.training_losses(orc, x0, torch.randint(0, 1000, (2,), device="cuda"))
    assert terms["loss"].device.type == "cuda" and torch.isfinite(terms["loss"]).all()
