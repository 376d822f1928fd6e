"""The exact denoiser for data with a known distribution: ground truth for samplers.

If every element of x₀ is drawn independently from a 1-D Gaussian mixture Σ_k w_k N(m_k, v_k),
then x_t = a·x₀ + s·ε (a = √ᾱ_t, s = √(1−ᾱ_t)) is again a mixture, Σ_k w_k N(a m_k, a²v_k + s²),
and the posterior of x₀ given x_t is a mixture of Gaussians with responsibilities
r_k ∝ w_k N(x_t; a m_k, a²v_k + s²) and, per component,

    mean M_k = m_k + a v_k (x_t − a m_k) / (a²v_k + s²),   variance V_k = v_k s² / (a²v_k + s²).

So E[x₀|x_t] = Σ r_k M_k, and the ε a perfectly trained network predicts is
(x_t − a E[x₀|x_t]) / s. For a single Gaussian everything is linear in x_t.

With learned variances, the ideal v is the one that makes exp(log Σ) the true variance of the
one-step reverse process, β̃_t + coef1_t² Var[x₀|x_t] (law of total variance; exact for a
Gaussian), on the schedule the network is "trained" on; under respacing it is reused as is, as a
trained DiT's output is.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from dits.diffusion.schedule import Schedule


class GaussianMixtureOracle:
    """A DiT-style ``model(x, t, y)`` that returns the exact ε (and ideal v) for mixture data.

    ``t`` is on the original 0..T−1 scale of ``Schedule.named(noise_schedule, diffusion_steps)``;
    ``y`` is ignored (the data are unconditional). Computes in ``x``'s dtype (use float64 for
    closed-form comparisons).
    """

    def __init__(self, weights: Sequence[float], means: Sequence[float], stds: Sequence[float], *,
                 learn_sigma: bool = True, noise_schedule: str = "linear", diffusion_steps: int = 1000):
        w = torch.tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.means = torch.tensor(means, dtype=torch.float64)
        self.vars = torch.tensor(stds, dtype=torch.float64) ** 2
        if not (len(self.weights) == len(self.means) == len(self.vars)) or (self.vars <= 0).any():
            raise ValueError("weights, means and stds must have one positive entry per component")
        self.learn_sigma = learn_sigma
        self.schedule = Schedule.named(noise_schedule, diffusion_steps)
        self.calls = 0  # network evaluations so far (a batch counts once)

    # -------------------------------------------------------------- the data distribution
    @property
    def mean(self) -> float:
        return float((self.weights * self.means).sum())

    @property
    def std(self) -> float:
        second = (self.weights * (self.vars + self.means ** 2)).sum()
        return float((second - self.mean ** 2).sqrt())

    def sample_data(self, shape, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x₀ (float64) of the given shape."""
        n = math.prod(shape)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.vars[k].sqrt() * z).reshape(shape)

    def cdf(self, x: torch.Tensor, alpha_bar: float = 1.0) -> torch.Tensor:
        """CDF of the marginal of x_t at ᾱ = ``alpha_bar`` (1 is the data itself)."""
        a, s2 = math.sqrt(alpha_bar), 1.0 - alpha_bar
        x = x.double().unsqueeze(-1)
        std = (a * a * self.vars + s2).sqrt()
        return (self.weights * 0.5 * (1 + torch.erf((x - a * self.means) / (std * math.sqrt(2))))).sum(-1)

    # -------------------------------------------------------------- the optimal network
    def posterior(self, x: torch.Tensor, alpha_bar: torch.Tensor):
        """E[x₀ | x_t] and Var[x₀ | x_t] elementwise, in x's dtype; ``alpha_bar`` broadcasts against x."""
        ab = alpha_bar.to(x.dtype)
        a, s2 = ab.sqrt(), 1.0 - ab
        # A loop over the (few) components keeps every tensor the size of x: broadcasting a
        # trailing component axis is several times slower on CPU.
        comps = []
        for w, m, v in zip(self.weights.tolist(), self.means.tolist(), self.vars.tolist()):
            tot = ab * v + s2                               # variance of x_t within the component
            d = x - a * m
            log_r = math.log(w) - 0.5 * torch.log(tot) - 0.5 * d * d / tot
            comps.append((log_r, m + a * v * d / tot, v * s2 / tot))
        top = comps[0][0]
        for c in comps[1:]:
            top = torch.maximum(top, c[0])
        # The clamp keeps exp out of the denormal range, where CPUs are ~100x slower.
        r = [torch.exp((c[0] - top).clamp(min=-60.0)) for c in comps]
        total = sum(r)
        r = [ri / total for ri in r]
        mean = sum(ri * c[1] for ri, c in zip(r, comps))
        # Σ r V + Σ r (M − E)²: the law of total variance without cancellation.
        var = sum(ri * (c[2] + (c[1] - mean) ** 2) for ri, c in zip(r, comps))
        return mean, var

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        self.calls += 1
        s = self.schedule
        t = t.long().cpu()
        shape = (-1,) + (1,) * (x.dim() - 1)

        def at(arr):  # per-sample schedule values, in x's dtype (float64 math, then cast)
            return arr[t].reshape(shape).to(device=x.device, dtype=x.dtype)

        ab = at(s.alphas_cumprod)
        mean0, var0 = self.posterior(x, ab)
        eps = (x - ab.sqrt() * mean0) / at(s.sqrt_one_minus_alphas_cumprod)
        if not self.learn_sigma:
            return eps
        true_var = at(s.posterior_variance) + at(s.posterior_mean_coef1) ** 2 * var0
        lo, hi = at(s.posterior_log_variance_clipped), at(s.log_betas)
        v = (2 * (torch.log(true_var) - lo) / (hi - lo) - 1).clamp(-1, 1)
        return torch.cat([eps, v], dim=1)


def gaussian_oracle(mean: float, std: float, **kwargs) -> GaussianMixtureOracle:
    """Exact denoiser for N(mean, std²) data."""
    return GaussianMixtureOracle([1.0], [mean], [std], **kwargs)
