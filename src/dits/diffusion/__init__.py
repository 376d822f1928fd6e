"""Gaussian diffusion as DiT uses it (IDDPM/ADM), plus fast samplers.

- :func:`create_diffusion` / :class:`GaussianDiffusion`: the reference's entry points, same
  names and arguments (``training_losses``, ``p_sample_loop``, ``ddim_sample_loop``, ...).
- :func:`sample`: one call for every sampler in :data:`SAMPLERS`, with classifier-free guidance
  and per-sample seeds.
- ``sample_ddpm``, ``sample_ddim``, ``sample_dpmpp_2m``, ``sample_heun``: the samplers as plain
  functions of a denoiser (see :mod:`dits.diffusion.samplers`).
- :class:`Schedule`, :func:`get_named_beta_schedule`, :func:`space_timesteps`: schedules and
  respacing.

See docs/diffusion.md.
"""
from dits.diffusion.gaussian_diffusion import GaussianDiffusion, create_diffusion
from dits.diffusion.guidance import combine_guided, guided_model
from dits.diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from dits.diffusion.samplers import (generator_noise, per_sample_noise, sample_ddim, sample_ddim_reverse, sample_ddpm,
                                     sample_dpmpp_2m, sample_heun)
from dits.diffusion.sampling import SAMPLERS, nfe, sample, timesteps_for
from dits.diffusion.schedule import (SCHEDULES, Schedule, betas_for_alpha_bar, cosine_betas, extract,
                                     get_named_beta_schedule, linear_betas, logsnr_timesteps,
                                     quadratic_timesteps, space_timesteps)

__all__ = [
    "GaussianDiffusion", "create_diffusion", "sample", "SAMPLERS", "nfe", "timesteps_for",
    "sample_ddpm", "sample_ddim", "sample_ddim_reverse", "sample_dpmpp_2m", "sample_heun",
    "generator_noise", "per_sample_noise", "combine_guided", "guided_model",
    "Schedule", "SCHEDULES", "get_named_beta_schedule", "linear_betas", "cosine_betas", "betas_for_alpha_bar",
    "space_timesteps", "logsnr_timesteps", "quadratic_timesteps", "extract",
    "normal_kl", "discretized_gaussian_log_likelihood", "approx_standard_normal_cdf",
    "mean_flat",
]
