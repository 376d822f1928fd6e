"""Samplers: one short function each, all driven by the same denoiser.

Every sampler here has the form ``sample_xxx(denoise, x, alphas_cumprod, ...) -> x``:

- ``alphas_cumprod``: ᾱ of the K kept timesteps (a float64 tensor, increasing noise with the
  index), e.g. ``diffusion.alphas_cumprod`` of a respaced diffusion;
- ``x``: the starting point, treated as x at the last kept index K−1 (noise, for sampling);
- ``denoise(x, t)``: t is a long tensor (N,) of kept indices; returns a dict with
  ``pred_xstart`` (x̂₀), ``eps`` (ε̂ re-derived from x̂₀, so clipping is honoured), and, for
  ancestral sampling, the model's p(x_{t−1} | x_t) ``mean`` and ``log_variance``.
  :meth:`GaussianDiffusion.p_mean_variance` is exactly such a function once the model is bound.

Classifier-free guidance happens inside the model (see :mod:`dits.diffusion.guidance`), so it is
available to every sampler. Randomness comes from ``noise_fn(like) -> tensor`` (default
``torch.randn_like``); :func:`per_sample_noise` makes each sample's stream independent of the
batch it is in.

Where the samplers end:
- DDPM and DDIM step from each kept timestep to the previous one and from index 0 to ᾱ = 1,
  returning x̂₀ of the last evaluation (the reference's convention): K kept steps, K NFE.
- The ODE solvers (DPM-Solver++, Heun) integrate from index K−1 down to index 0 (t = 0, where
  √(1−ᾱ) = 0.01 for the linear schedule) and return x there, as DPM-Solver does: K kept steps,
  K−1 intervals. Their last evaluation is not spent on a near-identity denoising step.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

from dits.errors import UserError

Denoiser = Callable[[torch.Tensor, torch.Tensor], dict]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------- noise
def _randn_dtype(like: torch.Tensor) -> torch.dtype:
    # Draw half-precision noise in float32: the numbers then do not depend on the dtype.
    return like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32


def generator_noise(generator: torch.Generator) -> NoiseFn:
    """Noise from one ``torch.Generator`` (drawn on the generator's device)."""
    def noise(like: torch.Tensor) -> torch.Tensor:
        z = torch.randn(like.shape, generator=generator, device=generator.device, dtype=_randn_dtype(like))
        return z.to(device=like.device, dtype=like.dtype)
    return noise


def per_sample_noise(seeds: Sequence[int]) -> NoiseFn:
    """One CPU generator per sample, seeded ``seeds[i]``: sample i's noise (x_T and every
    stochastic step) depends only on its own seed, not on the batch size or the device."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def noise(like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(gens):
            raise UserError(f"per-sample noise has {len(gens)} generators but the batch has {like.shape[0]} samples")
        dtype = _randn_dtype(like)
        z = torch.stack([torch.randn(like.shape[1:], generator=g, dtype=dtype) for g in gens])
        return z.to(device=like.device, dtype=like.dtype)
    return noise


# ----------------------------------------------------------------------------------- helpers
def _indices(seq: Iterable[int], progress: bool, desc: str):
    if not progress:
        return seq
    from tqdm.auto import tqdm
    seq = list(seq)
    return tqdm(seq, desc=desc, total=len(seq))


def _t(i: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


def _ab(alphas_cumprod) -> list[float]:
    # Python floats keep float64 precision in the scalar coefficients below.
    return [float(a) for a in alphas_cumprod]


# ----------------------------------------------------------------------------------- samplers
def sample_ddpm(denoise: Denoiser, x: torch.Tensor, alphas_cumprod, *, noise_fn: NoiseFn | None = None,
                progress: bool = False) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020): x_{t−1} ~ N(μ_θ(x_t), Σ_θ(x_t)), with the model's
    variance (learned range for DiT). K kept steps, K NFE; no noise is added at the last step."""
    noise_fn = noise_fn or torch.randn_like
    for i in _indices(reversed(range(len(alphas_cumprod))), progress, "ddpm"):
        out = denoise(x, _t(i, x))
        # Drawn at every step, the last included, so the global RNG advances as in the reference.
        z = noise_fn(x)
        x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z if i > 0 else out["mean"]
    return x


def sample_ddim(denoise: Denoiser, x: torch.Tensor, alphas_cumprod, *, eta: float = 0.0,
                noise_fn: NoiseFn | None = None, progress: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12). η = 0 is deterministic: Euler's method on the probability
    flow ODE in the variables (x/√ᾱ, σ = √((1−ᾱ)/ᾱ)); η = 1 matches DDPM's marginals."""
    noise_fn = noise_fn or torch.randn_like
    ab = _ab(alphas_cumprod)
    for i in _indices(reversed(range(len(ab))), progress, "ddim"):
        out = denoise(x, _t(i, x))
        a, a_prev = ab[i], (ab[i - 1] if i > 0 else 1.0)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        z = noise_fn(x)
        x = out["pred_xstart"] * math.sqrt(a_prev) + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * out["eps"]
        if i > 0 and sigma > 0:
            x = x + sigma * z
    return x


def sample_ddim_reverse(denoise: Denoiser, x: torch.Tensor, alphas_cumprod, *, progress: bool = False) -> torch.Tensor:
    """DDIM inversion: run the η = 0 ODE forwards, from clean data x (ᾱ = 1) to kept index K−1.

    The mirror image of :func:`sample_ddim`: each interval uses ε̂ at its start point (explicit
    Euler), the first one at the clean point with the model at index 0. So
    ``sample_ddim(denoise, sample_ddim_reverse(denoise, x0, ab), ab) ≈ x0`` up to O(1/K).
    """
    ab = _ab(alphas_cumprod)
    for j in _indices(range(len(ab)), progress, "ddim-inverse"):
        out = denoise(x, _t(max(j - 1, 0), x))
        # From the clean start, x itself is x₀; afterwards use the model's x̂₀.
        x0 = x if j == 0 else out["pred_xstart"]
        x = x0 * math.sqrt(ab[j]) + math.sqrt(1 - ab[j]) * out["eps"]
    return x


def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, alphas_cumprod, *, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the probability flow
    ODE written for the data prediction x̂₀, in log-SNR time λ = log(√ᾱ/√(1−ᾱ)).

    Exact integration of the linear part gives x_s = (σ_s/σ_t)·x_t − α_s·(e^{−h} − 1)·D with
    h = λ_s − λ_t; D = x̂₀ is first order (used on the first step), and the linear extrapolation
    D = (1 + 1/2r)·x̂₀(t) − (1/2r)·x̂₀(prev), r = h_prev/h, reuses the previous evaluation to reach
    second order at one evaluation per step. K kept steps, K−1 NFE; returns x at index 0.
    """
    ab = _ab(alphas_cumprod)
    alpha = [math.sqrt(a) for a in ab]
    sigma = [math.sqrt(1 - a) for a in ab]
    lam = [math.log(al) - math.log(s) for al, s in zip(alpha, sigma)]
    prev_x0, prev_h = None, None
    for i in _indices(reversed(range(1, len(ab))), progress, "dpm++"):
        x0 = denoise(x, _t(i, x))["pred_xstart"]
        h = lam[i - 1] - lam[i]
        if prev_x0 is None:
            d = x0
        else:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (sigma[i - 1] / sigma[i]) * x - alpha[i - 1] * math.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x


def sample_heun(denoise: Denoiser, x: torch.Tensor, alphas_cumprod, *, progress: bool = False) -> torch.Tensor:
    """Heun's second-order method on the probability flow ODE (Karras et al. 2022).

    In x̃ = x/√ᾱ and σ = √((1−ᾱ)/ᾱ) the ODE is dx̃/dσ = ε̂(x, t), the form in which DDIM is
    Euler. Heun averages the slope at both ends of each interval: 2 NFE per interval, K kept
    steps give 2(K−1) NFE; returns x at index 0.
    """
    ab = _ab(alphas_cumprod)
    scale = [math.sqrt(a) for a in ab]
    sig = [math.sqrt((1 - a) / a) for a in ab]
    for i in _indices(reversed(range(1, len(ab))), progress, "heun"):
        d = denoise(x, _t(i, x))["eps"]
        xs = x / scale[i]
        dsig = sig[i - 1] - sig[i]
        x_euler = (xs + dsig * d) * scale[i - 1]
        d2 = denoise(x_euler, _t(i - 1, x))["eps"]
        x = (xs + dsig * 0.5 * (d + d2)) * scale[i - 1]
    return x
