"""Schedules, respacing, posterior, densities and the training loss, against closed forms."""
import math

import pytest
import torch

from dits.diffusion import (GaussianDiffusion, Schedule, create_diffusion, discretized_gaussian_log_likelihood,
                            get_named_beta_schedule, logsnr_timesteps, normal_kl, quadratic_timesteps,
                            space_timesteps)
from dits.errors import UserError



# ----------------------------------------------------------------------------- schedules
def test_linear_schedule_endpoints_scale_with_T():
    b = get_named_beta_schedule("linear", 1000)
    assert len(b) == 1000 and b[0] == pytest.approx(1e-4, abs=1e-15) and b[-1] == pytest.approx(0.02, abs=1e-15)
    b = get_named_beta_schedule("linear", 500)
    assert b[0] == pytest.approx(2e-4, abs=1e-15) and b[-1] == pytest.approx(0.04, abs=1e-15)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alphas_cumprod_is_the_product_of_one_minus_beta(name):
    s = Schedule.named(name, 1000)
    betas = s.betas.tolist()
    for t in (0, 1, 10, 500, 999):
        assert s.alphas_cumprod[t].item() == pytest.approx(math.prod(1 - b for b in betas[: t + 1]), rel=1e-12)
    assert s.alphas_cumprod_prev[0].item() == 1.0


def test_cosine_schedule_follows_its_closed_form():
    f = lambda tau: math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    s = Schedule.named("cosine", 1000)
    for t in (0, 100, 500, 900):  # β is capped at 0.999 only at the very end
        assert s.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert Schedule.named("squaredcos_cap_v2").betas.equal(s.betas)


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(UserError, match="noise schedule"):
        create_diffusion("", noise_schedule="quadratic")


# ----------------------------------------------------------------------------- respacing
def test_space_timesteps_follows_adm():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1") == {0}
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and {0, 4, 8, 995, 999} <= kept
    assert space_timesteps(1000, "") == space_timesteps(1000, None) == set(range(1000))
    assert space_timesteps(30, "10,10,10") == set(range(30))
    # Two sections of 50; the second takes 5 steps at 50 + round(k·49/4), round half to even:
    # 0, 12.25, 24.5, 36.75, 49 -> 0, 12, 24, 37, 49.
    expect = {round(k * 49 / 9) for k in range(10)} | {50, 62, 74, 87, 99}
    assert space_timesteps(100, "10,5") == expect
    assert space_timesteps(100, [10, 5]) == expect


@pytest.mark.parametrize("bad", ["ddimx", "abc", "ddim300", "2000", "10,0", "5,,5"])
def test_bad_respacing_is_a_user_error(bad):
    with pytest.raises(UserError):
        create_diffusion(bad)


@pytest.mark.parametrize("spacing", ["ddim50", "250", "10,15,20", "7"])
def test_respaced_alphas_cumprod_equal_the_original_at_kept_steps(spacing):
    base = Schedule.named("linear", 1000)
    d = create_diffusion(spacing)
    kept = sorted(space_timesteps(1000, spacing))
    assert d.timestep_map == kept and d.num_timesteps == len(kept)
    torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)


def test_ode_grids_are_distinct_and_span_the_schedule():
    ac = Schedule.named().alphas_cumprod
    for count in (2, 6, 21, 200, 1000):
        for ts in (logsnr_timesteps(ac, count), quadratic_timesteps(1000, count)):
            assert len(ts) == count and ts[0] == 0 and ts[-1] == 999 and ts == sorted(set(ts))
    lam = 0.5 * torch.log(ac / (1 - ac))
    ts = logsnr_timesteps(ac, 11)
    steps = (lam[ts[:-1]] - lam[ts[1:]]).tolist()
    assert max(steps) - min(steps) < 0.15 * (sum(steps) / len(steps))   # evenly spaced in λ


# ----------------------------------------------------------------------------- forward process
def test_q_sample_and_q_mean_variance():
    d = create_diffusion("")
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 400, 999])
    ab = torch.tensor([Schedule.named().alphas_cumprod[i].item() for i in (0, 400, 999)], dtype=torch.float64)
    want = ab.sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(d.q_sample(x0, t, noise=eps), want)
    mean, var, log_var = d.q_mean_variance(x0, t)
    torch.testing.assert_close(var[:, 0, 0, 0], 1 - ab)
    torch.testing.assert_close(log_var, var.log())


@pytest.mark.parametrize("spacing", ["", "25"])
def test_posterior_matches_a_direct_gaussian_computation(spacing):
    # q(x_{t-1} | x_t, x_0) ∝ N(x_t; √α_t x_{t-1}, β_t) · N(x_{t-1}; √ᾱ_{t-1} x_0, 1 − ᾱ_{t-1})
    d = create_diffusion(spacing)
    x0 = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    xt = torch.randn_like(x0)
    t = torch.tensor([1, 5, d.num_timesteps // 2, d.num_timesteps - 1])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    ab = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    ab_prev = d.alphas_cumprod[t - 1].view(-1, 1, 1, 1)
    alpha = ab / ab_prev
    beta = 1 - alpha
    precision = alpha / beta + 1 / (1 - ab_prev)
    want_var = 1 / precision
    want_mean = want_var * (alpha.sqrt() * xt / beta + ab_prev.sqrt() * x0 / (1 - ab_prev))
    torch.testing.assert_close(mean, want_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(var, want_var.expand_as(var), rtol=1e-9, atol=0)
    torch.testing.assert_close(log_var, var.log(), rtol=1e-9, atol=0)


# ----------------------------------------------------------------------------- densities
def test_normal_kl_closed_form():
    m1, m2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want)
    torch.testing.assert_close(normal_kl(m1, lv1, 0.0, 0.0), normal_kl(m1, lv1, torch.zeros(50, dtype=torch.float64),
                                                                       torch.zeros(50, dtype=torch.float64)))


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.3, -5.0), (-0.99, -2.0), (1.0, 0.0), (0.2, -7.0)])
def test_discretized_likelihood_sums_to_one_over_all_bins(mean, log_scale):
    bins = -1 + 2 * torch.arange(256, dtype=torch.float64) / 255
    logp = discretized_gaussian_log_likelihood(bins, means=torch.full_like(bins, mean),
                                               log_scales=torch.full_like(bins, log_scale))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # ... and each interior bin near the mean (within 2 std) holds the Gaussian mass of its width,
    # to 1 % (the CDF is ADM's tanh fit), at bins where that mass is not ~0.
    std = math.exp(log_scale)
    cdf = lambda v: 0.5 * (1 + math.erf((v - mean) / (std * math.sqrt(2))))  # noqa: E731
    checked = 0
    for k in range(1, 255):
        centre = bins[k].item()
        want = cdf(centre + 1 / 255) - cdf(centre - 1 / 255)
        if abs(centre - mean) <= 2 * std + 1 / 255 and want > 1e-3:
            assert logp[k].exp().item() == pytest.approx(want, rel=1e-2), k
            checked += 1
    assert checked >= 1
    # of the interior bins, the one nearest the mean carries the most mass (the two edge bins also
    # hold the tails beyond them)
    assert 1 + int(logp[1:255].argmax()) == min(range(1, 255), key=lambda k: abs(bins[k].item() - mean))


# ----------------------------------------------------------------------------- the model's variance
def _const_model(eps, v=None):
    """A model returning fixed ε (and v) channels; records the timesteps it was called with."""
    def model(x, t, **kwargs):
        model.seen.append(t.clone())
        out = eps.expand_as(x) if v is None else torch.cat([eps.expand_as(x), v.expand_as(x)], dim=1)
        return out.clone()
    model.seen = []
    return model


@pytest.mark.parametrize("spacing", ["", "50"])
def test_learned_range_endpoints_are_log_beta_and_clipped_log_posterior_variance(spacing):
    d = create_diffusion(spacing)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, d.num_timesteps - 1])
    zero = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    hi = d.p_mean_variance(_const_model(zero, zero + 1), x, t)["log_variance"]
    lo = d.p_mean_variance(_const_model(zero, zero - 1), x, t)["log_variance"]
    torch.testing.assert_close(hi[:, 0, 0, 0], d.betas[t].log())
    post = d.posterior_variance
    torch.testing.assert_close(lo[:, 0, 0, 0], torch.stack([post[1], post[1], post[-1]]).log())
    mid = d.p_mean_variance(_const_model(zero, zero), x, t)["log_variance"]
    torch.testing.assert_close(mid, (hi + lo) / 2)


def test_fixed_variances():
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 7])
    eps = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    small = create_diffusion("", learn_sigma=False, sigma_small=True)
    out = small.p_mean_variance(_const_model(eps), x, t)
    torch.testing.assert_close(out["variance"][:, 0, 0, 0], torch.stack([small.posterior_variance[0],
                                                                          small.posterior_variance[7]]))
    large = create_diffusion("", learn_sigma=False)
    out = large.p_mean_variance(_const_model(eps), x, t)
    torch.testing.assert_close(out["variance"][:, 0, 0, 0], torch.stack([large.posterior_variance[1], large.betas[7]]))


def test_wrong_channel_count_is_a_user_error():
    d = create_diffusion("")
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(UserError, match="channels"):
        d.p_mean_variance(_const_model(torch.zeros(1, 3, 1, 1)), x, torch.tensor([1, 2]))


# ----------------------------------------------------------------------------- training loss
def _grid_data(shape, seed=0):
    """x_0 on the 8-bit grid of [-1, 1] (bin centres), as the decoder likelihood expects."""
    g = torch.Generator().manual_seed(seed)
    return -1 + 2 * torch.randint(0, 256, shape, generator=g).double() / 255


def test_training_losses_perfect_model_has_zero_mse_and_zero_kl():
    d = create_diffusion("")
    x0 = _grid_data((4, 2, 4, 4))
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 10, 500, 999])

    def model(x, tt, y=None):
        return torch.cat([noise, -torch.ones_like(noise)], dim=1)   # exact ε, Σ = β̃_t
    terms = d.training_losses(model, x0, t, model_kwargs={"y": None}, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"} and all(v.shape == (4,) for v in terms.values())
    assert terms["mse"].abs().max() < 1e-20
    assert terms["vb"].abs().max() < 1e-9
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_term_is_the_closed_form_kl_in_bits():
    # ε off by δ everywhere: the mean is off by coef1·√(1/ᾱ−1)·δ, the variance is right (v = −1),
    # so KL = (Δμ)² / (2 β̃_t) nats per dimension.
    d = create_diffusion("")
    x0 = _grid_data((3, 1, 4, 4))
    noise = torch.randn_like(x0)
    t = torch.tensor([3, 200, 800])
    delta = 0.05
    model = lambda x, tt: torch.cat([noise + delta, -torch.ones_like(noise)], dim=1)  # noqa: E731
    vb = d.training_losses(model, x0, t, noise=noise)["vb"]
    s = Schedule.named()
    dmu = s.posterior_mean_coef1[t] * s.sqrt_recipm1_alphas_cumprod[t] * delta
    torch.testing.assert_close(vb, dmu ** 2 / (2 * s.posterior_variance[t]) / math.log(2), rtol=1e-6, atol=0)


def test_vb_at_t0_is_the_decoder_nll():
    d = create_diffusion("")
    x0 = _grid_data((2, 1, 4, 4))
    noise = torch.randn_like(x0)
    model = lambda x, tt: torch.cat([noise, torch.zeros_like(noise)], dim=1)  # noqa: E731
    vb = d.training_losses(model, x0, torch.tensor([0, 0]), noise=noise)["vb"]
    xt = d.q_sample(x0, torch.tensor([0, 0]), noise=noise)
    out = d.p_mean_variance(model, xt, torch.tensor([0, 0]), clip_denoised=False)
    nll = -discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
    torch.testing.assert_close(vb, nll.mean(dim=(1, 2, 3)) / math.log(2))


def test_vb_trains_only_the_variance_channels():
    d = create_diffusion("")
    x0 = _grid_data((2, 1, 4, 4))
    out = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    terms = d.training_losses(lambda x, t: out * 1.0, x0, torch.tensor([5, 300]))
    g_vb, = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert g_vb[:, :1].abs().max() == 0 and g_vb[:, 1:].abs().max() > 0
    g_mse, = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_mse[:, 1:].abs().max() == 0 and g_mse[:, :1].abs().max() > 0


def test_loss_rescaling_options():
    x0 = _grid_data((2, 1, 4, 4))
    noise = torch.randn_like(x0)
    t = torch.tensor([2, 100])
    model = lambda x, tt: torch.cat([noise + 0.1, 0.3 * torch.ones_like(noise)], dim=1)  # noqa: E731
    plain = create_diffusion("", diffusion_steps=500).training_losses(model, x0, t, noise=noise)
    scaled = create_diffusion("", diffusion_steps=500, rescale_learned_sigmas=True)
    scaled = scaled.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(scaled["vb"], plain["vb"] * 0.5)   # λ = T/1000
    torch.testing.assert_close(scaled["mse"], plain["mse"])
    kl = create_diffusion("", diffusion_steps=500, use_kl=True).training_losses(model, x0, t, noise=noise)
    assert set(kl) == {"loss"}
    torch.testing.assert_close(kl["loss"], plain["vb"] * 500)


def test_x_start_model_regresses_x0():
    d = create_diffusion("", predict_xstart=True, learn_sigma=False)
    x0 = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    terms = d.training_losses(lambda x, t: x0 + 0.5, x0, torch.tensor([3, 4]))
    torch.testing.assert_close(terms["mse"], torch.full((2,), 0.25, dtype=torch.float64))
    assert set(terms) == {"loss", "mse"}


def test_training_calls_the_model_with_original_timesteps():
    d = create_diffusion("10")
    model = _const_model(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    d.training_losses(model, torch.zeros(3, 1, 2, 2), torch.tensor([0, 5, 9]))
    kept = sorted(space_timesteps(1000, "10"))
    assert model.seen[0].tolist() == [kept[0], kept[5], kept[9]] and model.seen[0].dtype == torch.long


def test_float32_data_get_float32_outputs_and_reference_defaults():
    d = create_diffusion("")
    assert d.num_timesteps == 1000 and d.model_var_type == "learned_range" and d.loss_type == "mse"
    x0 = torch.randn(2, 4, 8, 8)
    model = lambda x, t, y=None: torch.zeros(x.shape[0], 8, 8, 8)  # noqa: E731
    t = torch.randint(0, d.num_timesteps, (2,))
    terms = d.training_losses(model, x0, t, model_kwargs={"y": torch.tensor([1, 2])})
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in terms.values())
    d = GaussianDiffusion(betas=Schedule.named().betas.numpy())
    torch.testing.assert_close(d.alphas_cumprod, Schedule.named().alphas_cumprod)
