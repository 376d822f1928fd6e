"""The linear interpolant of flow matching (SiT's choice; SPEC section 8).

    x_t = (1 − t)·x₀ + t·ε,   t ∈ [0, 1],  t = 0 data, t = 1 noise,
    velocity target v = dx_t/dt = ε − x₀,  loss = mean over dimensions of (v_θ − v)².

The network is the unchanged DiT: its timestep input is t on the 0..999 scale
(:func:`model_time`, ``999·t``), the range its sinusoidal embedding sees under Gaussian
diffusion, so t = 1 (pure noise) looks like diffusion's noisiest step. From a velocity
prediction the other parametrisations follow in closed form (linear case):
ε̂ = x_t + (1 − t)·v, x̂₀ = x_t − t·v.
"""
from __future__ import annotations

import torch

TIME_SCALE = 999.0  # model timestep = TIME_SCALE * t


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(device=x.device, dtype=x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def model_time(t: torch.Tensor) -> torch.Tensor:
    """Flow time t ∈ [0, 1] -> the float timestep the DiT is called with (0..999)."""
    return t * TIME_SCALE


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x₀ + t·ε, with t of shape (N,)."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """dx_t/dt of the linear interpolant: ε − x₀ (independent of t)."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x_t - _bcast(t, x_t) * v


def eps_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x_t + (1 - _bcast(t, x_t)) * v


def training_losses(model, x0: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                    noise: torch.Tensor | None = None, masked=None) -> dict:
    """Per-sample flow-matching losses at flow times ``t`` (N,) in [0, 1]: ``mse`` = ``loss``.
    ``masked`` (a :class:`dits.masking.TokenMask`): ``mse`` over the visible pixels only, plus its
    extra terms (``mae``, weighed by the objective)."""
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = interpolate(x0, noise, t)
    pred = model(x_t, model_time(t.to(x0.device, torch.float32)), **(model_kwargs or {}))
    if pred.shape != x0.shape:
        raise ValueError(f"a flow model predicts the velocity ({x0.shape[1]} channels); got output shape "
                         f"{tuple(pred.shape)} (train flow with learn_sigma off)")
    sq = (velocity_target(x0, noise) - pred.to(x0.dtype)) ** 2
    if masked is None:
        mse = sq.mean(dim=tuple(range(1, x0.dim())))
        return {"mse": mse, "loss": mse}
    mse = masked.mean_visible(sq)
    return {"mse": mse, "loss": mse, **masked.extra_terms(x_t, pred)}
