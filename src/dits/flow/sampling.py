"""``dits.flow.sample``: the flow counterpart of :func:`dits.diffusion.sample`."""
from __future__ import annotations

import torch

from dits.diffusion.guidance import parse_interval
from dits.diffusion.sampling import guided_net, noise_source, sampling_inputs
from dits.errors import UserError
from dits.flow.interpolant import TIME_SCALE, model_time
from dits.flow.samplers import FLOW_SAMPLERS, LOOPS, time_grid


def noise_level(t_model: torch.Tensor) -> torch.Tensor:
    """The guidance-interval scale of a flow model's timestep: the flow time t itself."""
    return t_model.double() / TIME_SCALE


def check_steps(sampler: str, steps) -> None:
    if sampler not in FLOW_SAMPLERS:
        raise UserError(f"unknown flow sampler {sampler!r}; use one of: {', '.join(FLOW_SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 10_000:
        raise UserError(f"steps for {sampler} must be an integer in 1..10000, got {steps!r}")


def sample(model, shape, *, y=None, sampler="heun", steps=50, cfg_scale=1.0, guided_channels=None,
           null_class=None, guidance_interval=None, clip_denoised=False, generator=None, seed=None, noise=None,
           device=None, progress=False) -> torch.Tensor:
    """Draw x₀ of shape (N, C, H, W) from a velocity-predicting ``model(x, t, y)`` (t = 999·flow time).

    ``sampler``: "euler", "heun" or "sde" (see :mod:`dits.flow.samplers`), on ``steps`` evenly
    spaced intervals from t = 1 to 0. Guidance extrapolates the velocity,
    v = v_u + s·(v_c − v_u), and with ``guidance_interval=(lo, hi)`` only at times t in
    [lo, hi] (elsewhere the model runs once, on the conditional labels). ``clip_denoised``
    clips x̂₀ = x − t·v̂ to [−1, 1] and re-derives v̂ (pixel models, as diffusion does).
    Randomness (x_1 and the SDE's noise): ``noise``, ``seed`` (sample i uses seed + i),
    ``generator`` or the global RNG, as :func:`dits.diffusion.sample`.
    """
    check_steps(sampler, steps)
    interval = parse_interval(guidance_interval)
    device, y = sampling_inputs(model, shape, y, noise, device)
    net = guided_net(model, shape, y, cfg_scale, null_class, guided_channels, interval, noise_level)
    noise_fn = noise_source(shape[0], seed, generator)
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise UserError(f"noise has shape {tuple(noise.shape)} but shape is {tuple(shape)}")
        x = noise.to(device)
    else:
        like = torch.empty(tuple(shape), device=device)
        x = noise_fn(like) if noise_fn is not None else torch.randn_like(like)

    def velocity(x, t: float):
        tt = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        v = net(x, model_time(tt), y=y)
        if v.shape != x.shape:
            raise UserError(f"the model returns {v.shape[1]} channels; a flow model predicts the "
                            f"{x.shape[1]}-channel velocity (is this a diffusion checkpoint?)")
        if clip_denoised and t > 0:
            v = (x - (x - t * v).clamp(-1, 1)) / t
        return v

    kwargs = {"noise_fn": noise_fn} if sampler == "sde" else {}
    with torch.no_grad():
        return LOOPS[sampler](velocity, x, time_grid(steps), progress=progress, **kwargs)
