"""Classifier-free guidance (Ho & Salimans, 2022) as DiT applies it.

The batch holds the conditional half first and the unconditional (null-label) half
second, so both go through the network in one forward pass. Guidance extrapolates the
noise prediction away from the unconditional one::

    eps = eps_u + s * (eps_c - eps_u)

Only the ε channels are guided. With a learned variance the model also outputs C
interpolation channels; those (and any unguided ε channels) keep each half's own value,
so the conditional half, the one kept as the sample, uses the conditional variance.
The reference code guides only the first 3 of the 4 latent ε channels (a quirk it keeps
to reproduce its published FID): pass ``guided_channels=3`` for that.

Limited-interval guidance (Kynkäänniemi et al., 2024): with ``interval=(lo, hi)`` the guided
combination is used only at noise levels in [lo, hi]; elsewhere the model runs once on the
conditional labels (no doubled batch). The noise level is on one scale for both objectives:
the time t of the linear flow interpolant x_t = (1 − t)·x₀ + t·ε (0 = data, 1 = noise); a
diffusion timestep maps to the t with the same signal-to-noise ratio, t = σ/(α + σ) with
α = √ᾱ, σ = √(1 − ᾱ) (:func:`diffusion_noise_level`).
"""
from __future__ import annotations

import torch

from dits.errors import UserError


def combine_guided(out: torch.Tensor, cfg_scale: float, eps_channels: int,
                   guided_channels: int | None = None) -> torch.Tensor:
    """Guide a model output whose batch is [conditional; unconditional].

    ``out`` has shape (2N, C_out, ...) with the first ``eps_channels`` channels being ε.
    Returns (2N, C_out, ...): the guided result, repeated for both halves, so samplers that
    carry the doubled batch keep working (the reference's convention).
    """
    if out.shape[0] % 2:
        raise ValueError(f"guided batch must hold a conditional and an unconditional half; got batch {out.shape[0]}")
    g = eps_channels if guided_channels is None else int(guided_channels)
    if not 0 < g <= eps_channels:
        raise ValueError(f"guided_channels must be in 1..{eps_channels}, got {guided_channels}")
    guided, rest = out[:, :g], out[:, g:]
    cond, uncond = guided.chunk(2, dim=0)
    half = uncond + cfg_scale * (cond - uncond)
    guided = torch.cat([half, half], dim=0)
    return torch.cat([guided, rest], dim=1)


def parse_interval(value) -> tuple[float, float] | None:
    """``None``, ``"LO,HI"`` or a pair -> (lo, hi) with 0 ≤ lo ≤ hi ≤ 1; else a one-line UserError."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        parts = value.split(",")
        try:
            value = tuple(float(p) for p in parts)
        except ValueError:
            value = ()
        if len(parts) != 2 or len(value) != 2:
            raise UserError(f"guidance interval must be LO,HI (two numbers in [0, 1], e.g. 0.2,0.8); got {parts!r}")
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"guidance interval must be a pair (lo, hi) in [0, 1]; got {value!r}") from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise UserError(f"guidance interval {lo:g},{hi:g} must satisfy 0 <= LO <= HI <= 1 "
                        "(noise level: 0 = data, 1 = pure noise)")
    return lo, hi


def diffusion_noise_level(alphas_cumprod):
    """Timestep (0..T−1) -> noise level t = σ/(α + σ) of a diffusion schedule's ᾱ (float64)."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    level = (1 - ab).sqrt() / (ab.sqrt() + (1 - ab).sqrt())

    def noise_level(t: torch.Tensor) -> torch.Tensor:
        return level[t.long().cpu()]
    return noise_level


def in_interval(level: torch.Tensor, interval: tuple[float, float]) -> torch.Tensor:
    return (level >= interval[0]) & (level <= interval[1])


def guided_model(model, cfg_scale: float, null_class: int, eps_channels: int,
                 guided_channels: int | None = None, interval: tuple[float, float] | None = None,
                 noise_level=None):
    """Wrap a DiT-style ``model(x, t, y)`` so that one call of N samples is guided.

    The wrapper runs the conditional and the null-label halves in one forward pass of 2N,
    combines them with :func:`combine_guided`, and returns the conditional half (N), so any
    sampler can use it unchanged. With ``interval`` (and ``noise_level(t) -> levels``), only
    samples whose level lies in [lo, hi] are guided; a call with none inside is exactly
    ``model(x, t, y)``.
    """
    if interval is not None and noise_level is None:
        raise ValueError("interval guidance needs a noise_level function for the model's timesteps")

    def guided(x, t, y, **kwargs):
        n = x.shape[0]
        y_null = torch.full_like(y, int(null_class))
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]), **kwargs)
        return combine_guided(out, cfg_scale, eps_channels, guided_channels)[:n]

    def forward(x, t, y=None, **kwargs):
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        if interval is None:
            return guided(x, t, y, **kwargs)
        inside = in_interval(noise_level(t), interval).to(x.device)
        if bool(inside.all()):
            return guided(x, t, y, **kwargs)
        if not bool(inside.any()):
            return model(x, t, y, **kwargs)  # outside: one unguided pass, no doubled batch
        out = model(x[~inside], t[~inside], y[~inside], **kwargs)
        full = out.new_empty((x.shape[0], *out.shape[1:]))
        full[~inside] = out
        full[inside] = guided(x[inside], t[inside], y[inside], **kwargs)
        return full
    return forward
