"""Flow samplers: integrate from noise (t = 1) to data (t = 0) with a velocity field.

Every sampler has the form ``sample_xxx(velocity, x, ts, ...) -> x`` with ``velocity(x, t)``
(t a Python float in [0, 1]) returning v̂ = dx_t/dt, and ``ts`` the decreasing time grid
(:func:`time_grid`: ``steps + 1`` evenly spaced points from 1 to 0).

- ``euler``: x ← x + (s − t)·v̂(x, t). ``steps`` NFE; first order.
- ``heun``: the trapezoidal corrector with the slope at both ends; the last interval ends at
  t = 0, where it takes the Euler step alone (EDM's convention; the last Euler step already
  lands on x̂₀ = x − t·v̂). 2·steps − 1 NFE; second order.
- ``sde``: Euler–Maruyama on the reverse-time SDE (SPEC section 8)
      dX = [v̂ − ½·w_t·score] dt + √w_t dW̄,  score = −ε̂/t,  ε̂ = x + (1 − t)·v̂,
  with diffusion coefficient **w_t = t** (SiT's "sigma" form: noise injection fades to zero at
  the data end, and ½·w_t·score = −ε̂/2 stays bounded). The stochastic part stops before the
  last interval: the last step is the deterministic Euler step to t = 0 (x̂₀), where the
  score's 1/t would blow up. ``steps`` NFE.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from dits.flow.interpolant import eps_from_velocity

FLOW_SAMPLERS = ("euler", "heun", "sde")
Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def time_grid(steps: int) -> list[float]:
    """``steps + 1`` evenly spaced times from 1 (noise) down to 0 (data)."""
    return [1.0 - i / steps for i in range(steps)] + [0.0]


def nfe(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def evaluation_times(sampler: str, steps: int) -> list[float]:
    """The times at which ``sampler`` calls the velocity, in call order."""
    ts = time_grid(steps)
    if sampler != "heun":
        return ts[:-1]
    out = []
    for t, s in zip(ts[:-1], ts[1:]):
        out += [t, s] if s > 0 else [t]
    return out


def _bar(seq, progress: bool, desc: str):
    if not progress:
        return seq
    from tqdm.auto import tqdm
    return tqdm(list(seq), desc=desc)


def _intervals(ts):
    return list(zip(ts[:-1], ts[1:]))


def sample_euler(velocity: Velocity, x: torch.Tensor, ts, *, progress: bool = False) -> torch.Tensor:
    for t, s in _bar(_intervals(ts), progress, "euler"):
        x = x + (s - t) * velocity(x, t)
    return x


def sample_heun(velocity: Velocity, x: torch.Tensor, ts, *, progress: bool = False) -> torch.Tensor:
    for t, s in _bar(_intervals(ts), progress, "heun"):
        d = velocity(x, t)
        x_euler = x + (s - t) * d
        x = x_euler if s == 0 else x + (s - t) * 0.5 * (d + velocity(x_euler, s))
    return x


def sample_sde(velocity: Velocity, x: torch.Tensor, ts, *, noise_fn=None, progress: bool = False) -> torch.Tensor:
    noise_fn = noise_fn or torch.randn_like
    steps = _intervals(ts)
    for i, (t, s) in enumerate(_bar(steps, progress, "sde")):
        v = velocity(x, t)
        if i == len(steps) - 1:            # deterministic finish (lands on x̂₀ when s = 0)
            x = x + (s - t) * v
            break
        w = t                              # diffusion coefficient w_t = t
        drift = v + 0.5 * eps_from_velocity(x, v, torch.full((x.shape[0],), t))  # v − ½·w·score
        x = x + (s - t) * drift + math.sqrt(w * (t - s)) * noise_fn(x)
    return x


LOOPS = {"euler": sample_euler, "heun": sample_heun, "sde": sample_sde}
