"""``dits.diffusion.sample``: the one call the trainer and ``dits sample`` use."""
from __future__ import annotations

import torch

from dits.errors import UserError
from dits.diffusion.gaussian_diffusion import GaussianDiffusion
from dits.diffusion.guidance import diffusion_noise_level, guided_model, parse_interval
from dits.diffusion.samplers import generator_noise, per_sample_noise
from dits.diffusion.schedule import Schedule, logsnr_timesteps, quadratic_timesteps, space_timesteps

SAMPLERS = ("ddpm", "ddim", "dpm++", "heun")


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations ``sample(sampler=..., steps=...)`` costs (×2 batch with guidance)."""
    return 2 * steps if sampler == "heun" else steps


def evaluation_timesteps(sampler: str, steps: int, noise_schedule: str = "linear",
                         diffusion_steps: int = 1000) -> list[int]:
    """The original timesteps at which ``sample(sampler=..., steps=...)`` calls the model, in order."""
    kept = timesteps_for(sampler, steps, noise_schedule, diffusion_steps)
    if sampler in ("ddpm", "ddim"):
        return kept[::-1]
    if sampler == "dpm++":
        return kept[:0:-1]
    return [t for i in range(len(kept) - 1, 0, -1) for t in (kept[i], kept[i - 1])]


def timesteps_for(sampler: str, steps: int, noise_schedule: str = "linear", diffusion_steps: int = 1000) -> list[int]:
    """The original timesteps each sampler keeps for ``steps`` steps (sorted ascending).

    - ddpm: respacing ``str(steps)``: evenly spaced, 0 and T−1 kept (DiT's ``"250"``);
    - ddim: respacing ``"ddim{steps}"`` (the DDIM paper's integer stride), or ``str(steps)`` when
      no integer stride gives exactly ``steps`` (e.g. 300 of 1000);
    - dpm++: ``steps + 1`` timesteps evenly spaced in log-SNR (DPM-Solver's grid for its λ-time
      steps); ``steps`` intervals, one evaluation each;
    - heun: ``steps + 1`` timesteps on DDIM's quadratic grid, dense near the data;
      ``steps`` intervals, two evaluations each.
    The two ODE grids were picked by the sampler benchmark (docs/diffusion.md): on the linear
    schedule an evenly spaced grid leaves a final step from t≈T/K to 0 that spans most of the
    log-SNR range, where second-order extrapolation goes wrong.
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; use one of: {', '.join(SAMPLERS)}")
    most = diffusion_steps if sampler in ("ddpm", "ddim") else diffusion_steps - 1
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most:
        raise UserError(f"steps for {sampler} must be an integer in 1..{most}, got {steps!r}")
    if sampler == "ddpm":
        return sorted(space_timesteps(diffusion_steps, str(steps)))
    if sampler == "ddim":
        try:
            return sorted(space_timesteps(diffusion_steps, f"ddim{steps}"))
        except UserError:
            return sorted(space_timesteps(diffusion_steps, str(steps)))
    if sampler == "dpm++":
        return logsnr_timesteps(Schedule.named(noise_schedule, diffusion_steps).alphas_cumprod, steps + 1)
    return quadratic_timesteps(diffusion_steps, steps + 1)


# ----------------------------------------------------------------- shared by both objectives' samplers
def check_shape(shape) -> None:
    if not (isinstance(shape, (tuple, list)) and len(shape) >= 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise UserError(f"shape must be a tuple of positive ints like (N, C, H, W), got {shape!r}")


def sampling_inputs(model, shape, y, noise, device):
    """Check ``shape`` and ``y``; the device is ``device``, else the noise's, else the model's."""
    check_shape(shape)
    if device is None:
        if noise is not None:
            device = noise.device
        else:
            p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
            device = p.device if p is not None else torch.device("cpu")
    if y is not None:
        y = torch.as_tensor(y, device=device).long().reshape(-1)
        if y.shape[0] != shape[0]:
            raise UserError(f"y has {y.shape[0]} labels for {shape[0]} samples")
    return device, y


def guided_net(model, shape, y, cfg_scale, null_class, guided_channels, interval, noise_level):
    """``model`` itself for ``cfg_scale`` 1, else its guided wrapper (see :mod:`dits.diffusion.guidance`)."""
    if cfg_scale == 1:
        return model
    if y is None:
        raise UserError(f"cfg_scale={cfg_scale} needs class labels y "
                        "(or use cfg_scale=1 for unconditional sampling)")
    if null_class is None:
        null_class = getattr(model, "num_classes", None)
        if null_class is None:
            raise UserError("cfg_scale != 1 needs null_class (the label of the unconditional row), "
                            "or a model with a num_classes attribute")
    return guided_model(model, cfg_scale, null_class, eps_channels=shape[1], guided_channels=guided_channels,
                        interval=interval, noise_level=noise_level)


def noise_source(n: int, seed=None, generator=None):
    """Per-sample generators seeded seed + i, else one generator, else None (the global RNG)."""
    if seed is not None:
        return per_sample_noise([int(seed) + i for i in range(n)])
    if generator is not None:
        return generator_noise(generator)
    return None  # global RNG, as the reference


def sample(model, shape, *, y=None, sampler="ddpm", steps=250, cfg_scale=1.0, guided_channels=None,
           null_class=None, guidance_interval=None, learn_sigma=True, noise_schedule="linear", diffusion_steps=1000,
           predict_xstart=False, clip_denoised=False, eta=0.0, generator=None, seed=None, noise=None,
           device=None, progress=False) -> torch.Tensor:
    """Draw x₀ samples of shape ``shape`` (N, C, H, W) from a DiT-style ``model(x, t, y)``.

    ``model`` gets t on the original 0..T−1 scale and returns 2C channels (ε, v) if
    ``learn_sigma`` else C. ``sampler`` is one of :data:`SAMPLERS`; ``steps`` is the number of
    steps (one network evaluation each; two for "heun"), on the grid :func:`timesteps_for` gives.
    ``eta`` applies to "ddim" only. ``clip_denoised`` clips x̂₀ to [−1, 1] (pixel models; leave it
    off for latents, as DiT does).

    Guidance: with ``cfg_scale != 1`` and labels ``y`` the batch is doubled with the null class
    (``null_class``, default ``model.num_classes``) and combined by
    :func:`dits.diffusion.guidance.combine_guided` (all ε channels, or the first
    ``guided_channels``); the variance channels are never guided. ``guidance_interval=(lo, hi)``
    guides only the steps whose noise level σ/(α + σ) lies in [lo, hi] (see
    :mod:`dits.diffusion.guidance`); the others run the model once, unguided.

    Randomness, in order of precedence: ``noise`` is x_T (later stochastic steps still need an
    RNG, taken as below); ``seed``: sample i uses its own CPU generator seeded ``seed + i`` for
    x_T and every stochastic step, so it is the same whatever the batch size or device;
    ``generator``: one ``torch.Generator`` for the whole batch; otherwise the global RNG.
    """
    kept = timesteps_for(sampler, steps, noise_schedule, diffusion_steps)
    interval = parse_interval(guidance_interval)
    check_shape(shape)
    if eta and sampler != "ddim":
        raise UserError(f"eta applies to the ddim sampler only (got eta={eta} with sampler {sampler!r})")
    # The same model conventions as create_diffusion(..., learn_sigma, predict_xstart).
    diffusion = GaussianDiffusion(Schedule.named(noise_schedule, diffusion_steps).respace(kept),
                                  model_mean_type="x_start" if predict_xstart else "epsilon",
                                  model_var_type="learned_range" if learn_sigma else "fixed_large")

    device, y = sampling_inputs(model, shape, y, noise, device)
    level = diffusion_noise_level(Schedule.named(noise_schedule, diffusion_steps).alphas_cumprod)
    net = guided_net(model, shape, y, cfg_scale, null_class, guided_channels, interval, level)
    noise_fn = noise_source(shape[0], seed, generator)
    if noise is not None:
        noise = noise.to(device)

    loop = {"ddpm": diffusion.p_sample_loop, "ddim": diffusion.ddim_sample_loop,
            "dpm++": diffusion.dpm_solver_sample_loop, "heun": diffusion.heun_sample_loop}[sampler]
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    return loop(net, tuple(shape), noise=noise, clip_denoised=clip_denoised, model_kwargs={"y": y},
                device=device, progress=progress, noise_fn=noise_fn, **kwargs)
