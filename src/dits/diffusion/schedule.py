"""Noise schedules and timestep respacing.

A discrete Gaussian diffusion is fixed by its variances β_1..β_T: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε
with ᾱ_t = ∏_{s≤t} (1 − β_s). Everything a sampler or the loss needs (posterior
coefficients, √ᾱ, ...) is derived once here, in float64, and cast to the data's dtype when
used: ᾱ_t for t near T is ~4e-5, and 1 − ᾱ_t near t = 0 is ~1e-4, so float32 products
over 1000 steps would lose digits that the reference keeps.

Respacing (IDDPM/ADM) keeps a subset of the timesteps and recomputes β from the ratio of
consecutive kept ᾱ, so the respaced process has *the same marginals* q(x_t | x_0) at the kept
steps. Indices 0..K−1 of a respaced schedule address the kept steps; ``timesteps`` maps them
back to the original 0..T−1 scale, which is what the network was trained on.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from dits.errors import UserError

# Accepted schedule names. "squaredcos_cap_v2" is the name the DiT/ADM code uses for IDDPM's
# cosine schedule; both spellings give the same betas.
SCHEDULES = ("linear", "cosine", "squaredcos_cap_v2")


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Ho et al.'s linear schedule, β from 1e-4 to 0.02, both scaled by 1000/T.

    The scaling keeps ᾱ_T (how much signal survives) roughly independent of T.
    """
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous ᾱ(τ), τ ∈ [0, 1], into T betas: β_i = 1 − ᾱ((i+1)/T) / ᾱ(i/T).

    β is capped at ``max_beta`` because ᾱ(1) = 0 would make the last step singular.
    """
    return np.array([min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


def cosine_betas(num_timesteps: int) -> np.ndarray:
    """IDDPM's cosine schedule: ᾱ(τ) ∝ cos²((τ + s)/(1 + s) · π/2) with s = 0.008."""
    return betas_for_alpha_bar(num_timesteps, lambda tau: math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas (float64 numpy, length T) of the schedule called ``name``."""
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise UserError(f"diffusion_steps must be a positive integer, got {num_timesteps!r}")
    if name == "linear":
        return linear_betas(num_timesteps)
    if name in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_timesteps)
    raise UserError(f"unknown noise schedule {name!r}; use one of: linear, cosine")


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Which of the original timesteps 0..T−1 a respacing string keeps (ADM's definition).

    - ``""`` or ``None``: all of them.
    - ``"ddimN"``: the DDIM paper's striding, ``range(0, T, stride)`` with the integer stride that
      gives exactly N steps (so ``"ddim50"`` of 1000 is 0, 20, ..., 980).
    - ``"250"`` or ``"10,15,20"`` (or a list of ints): split 0..T−1 into equal sections (the first
      T mod k sections one step longer) and take that many evenly spaced steps from each,
      first and last included (``"250"`` keeps 0 and 999).
    """
    if section_counts is None or section_counts == "":
        return set(range(num_timesteps))
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                want = int(spec[len("ddim"):])
            except ValueError:
                raise UserError(f"bad timestep respacing {section_counts!r}: expected 'ddimN' with an "
                                "integer N, e.g. 'ddim50'") from None
            # The smallest stride wins; strides up to T allow "ddim1" (just t = 0).
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise UserError(f"cannot take exactly {want} of {num_timesteps} steps with an integer stride "
                            f"({section_counts!r}); pick another count or use a plain count like '{want}'")
        try:
            section_counts = [int(s) for s in spec.split(",")]
        except ValueError:
            raise UserError(f"bad timestep respacing {section_counts!r}: expected '', 'ddimN', 'N' or "
                            "comma-separated counts like '10,10,10'") from None
    counts = list(section_counts)
    if not counts or any(not isinstance(c, (int, np.integer)) or c < 1 for c in counts):
        raise UserError(f"bad timestep respacing {section_counts!r}: section counts must be positive integers")

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise UserError(f"cannot take {count} steps from a section of {size} (respacing {section_counts!r} "
                            f"over {num_timesteps} steps); use fewer steps")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        # Python's round() (half to even) on an accumulated float index, as ADM does, so the
        # kept steps are identical to the reference's for every spacing.
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)


def _distinct(ts, num_timesteps: int) -> list[int]:
    """Sorted, strictly increasing integer timesteps in 0..T−1, moving the fewest collisions."""
    ts = sorted(int(t) for t in ts)
    for i in range(1, len(ts)):                     # push collisions up ...
        ts[i] = max(ts[i], ts[i - 1] + 1)
    for i in reversed(range(len(ts))):              # ... and back under the top
        ts[i] = min(ts[i], num_timesteps - len(ts) + i)
    return ts


def logsnr_timesteps(alphas_cumprod, count: int) -> list[int]:
    """``count`` timesteps from 0 to T−1, evenly spaced in log-SNR λ = ½·log(ᾱ/(1−ᾱ)).

    The ODE solvers step in λ (DPM-Solver's "logSNR" grid). On the linear schedule λ falls
    fastest near t = 0, where an evenly spaced grid in t would take one huge final step that a
    multistep solver extrapolates badly.
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    if not 2 <= count <= len(ac):
        raise UserError(f"need between 2 and {len(ac)} timesteps, got {count}")
    lam = 0.5 * (np.log(ac) - np.log1p(-ac))            # decreasing in t
    targets = np.linspace(lam[-1], lam[0], count)
    # λ is monotone, so the nearest timestep is one of the two neighbours of the insertion point.
    hi = np.clip(np.searchsorted(-lam, -targets), 1, len(lam) - 1)
    nearest = np.where(np.abs(lam[hi - 1] - targets) <= np.abs(lam[hi] - targets), hi - 1, hi)
    return _distinct(nearest, len(ac))


def quadratic_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` timesteps t_i = round((T−1)·(i/(count−1))²): dense near the data (DDIM's "quad")."""
    if not 2 <= count <= num_timesteps:
        raise UserError(f"need between 2 and {num_timesteps} timesteps, got {count}")
    return _distinct(np.round((num_timesteps - 1) * np.linspace(0, 1, count) ** 2), num_timesteps)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))


class Schedule:
    """β_t of the kept timesteps and every quantity derived from them (float64 tensors, on CPU).

    ``Schedule.named("linear", 1000).respace(space_timesteps(1000, "250"))`` is the 250-step
    schedule DiT samples with. ``timesteps[i]`` is the original timestep of kept index i.
    """

    def __init__(self, betas, timesteps=None):
        betas = np.asarray(betas.detach().cpu().numpy() if torch.is_tensor(betas) else betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise UserError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise UserError("betas must lie in (0, 1]")
        self.num_timesteps = len(betas)
        self.timesteps = (torch.arange(self.num_timesteps) if timesteps is None
                          else torch.as_tensor(list(timesteps), dtype=torch.long))
        if self.timesteps.shape != (self.num_timesteps,):
            raise UserError("timesteps must give one original timestep per beta")

        # Same formulas and order of operations as the reference (numpy, float64).
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.betas = _t(betas)
        self.alphas_cumprod = _t(ac)
        self.alphas_cumprod_prev = _t(ac_prev)
        self.alphas_cumprod_next = _t(np.append(ac[1:], 0.0))
        self.sqrt_alphas_cumprod = _t(np.sqrt(ac))
        self.sqrt_one_minus_alphas_cumprod = _t(np.sqrt(1.0 - ac))
        self.log_one_minus_alphas_cumprod = _t(np.log(1.0 - ac))
        self.sqrt_recip_alphas_cumprod = _t(np.sqrt(1.0 / ac))
        self.sqrt_recipm1_alphas_cumprod = _t(np.sqrt(1.0 / ac - 1.0))
        self.log_betas = _t(np.log(betas))
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1·x_0 + coef2·x_t, β̃_t).
        self.posterior_variance = _t(post_var)
        # β̃_0 = 0, so its log is clipped to log β̃_1 (only the learned-range lower end and the
        # t = 0 decoder see this value).
        clipped = np.append(post_var[1], post_var[1:]) if len(post_var) > 1 else post_var
        with np.errstate(divide="ignore"):
            self.posterior_log_variance_clipped = _t(np.log(clipped))
        self.posterior_mean_coef1 = _t(betas * np.sqrt(ac_prev) / (1.0 - ac))
        self.posterior_mean_coef2 = _t((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))

    @classmethod
    def named(cls, name: str = "linear", num_timesteps: int = 1000) -> "Schedule":
        return cls(get_named_beta_schedule(name, num_timesteps))

    def respace(self, use_timesteps: Iterable[int]) -> "Schedule":
        """Keep the given indices of this schedule; β is recomputed so ᾱ is unchanged there."""
        keep = sorted(set(int(i) for i in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise UserError(f"respacing must keep timesteps within 0..{self.num_timesteps - 1}")
        ac = self.alphas_cumprod.numpy()[keep]
        betas = 1.0 - ac / np.append(1.0, ac[:-1])
        return Schedule(betas, self.timesteps[keep].tolist())

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        t = self.timesteps.tolist()
        shown = t if len(t) <= 6 else t[:3] + ["..."] + t[-3:]
        return f"Schedule({self.num_timesteps} steps, timesteps={shown})"


def extract(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``arr[t]`` as a (N, 1, ..., 1) tensor that broadcasts against ``like``.

    Cast to ``like``'s dtype (at least float32: half-precision data still gets float32
    coefficients) and device. The reference casts to float32 the same way.
    """
    dtype = torch.promote_types(like.dtype, torch.float32) if like.is_floating_point() else torch.float32
    # Cast on the CPU first (some backends have no float64), index where ``t`` lives (no
    # device sync), then move to the data.
    out = arr.to(dtype=dtype).to(t.device)[t.long()].to(like.device)
    return out.reshape(-1, *([1] * (like.dim() - 1)))
