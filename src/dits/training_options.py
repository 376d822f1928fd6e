"""Training-time options of the objectives: loss weighting over noise levels and the density of t.

Both are off by default, and "off" is the paper's step exactly (uniform weights, uniform t): the
option objects below return ``None`` weights and leave ``draw_t`` to the objective.

* ``--loss-weighting min-snr[:γ]`` (Min-SNR-γ, Hang et al. 2023, arXiv 2303.09556; γ = 5 by default).
  In x₀ terms every step's error is weighted by min(SNR_t, γ). For ε-prediction the plain loss
  already weights x₀ errors by SNR_t (‖ε̂ − ε‖² = SNR_t · ‖x̂₀ − x₀‖²), so the weight on L_simple is
  min(SNR_t, γ) / SNR_t, SNR_t = ᾱ_t / (1 − ᾱ_t). Only L_simple is weighted; the VLB term of the hybrid
  loss (which trains the variances) is untouched.
  For flow matching with the linear interpolant x_t = (1 − t) x₀ + t ε, the velocity error is
  ‖v̂ − v‖² = ‖x̂₀ − x₀‖² / t², so the same x₀ weighting is the velocity weight min(SNR_t, γ) · t² with
  SNR_t = ((1 − t) / t)². That is the sound equivalent: the same weighting of the same errors.
* ``--t-sampling logit-normal[:m,s]`` (flow only; Esser et al. 2024, arXiv 2403.03206): t = σ(m + s·z),
  z ~ N(0, 1), m = 0, s = 1 by default, which puts the steps at intermediate noise levels. Diffusion
  keeps its uniform integer t (a discrete density was not measured to help; the option says so).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dits.errors import UserError

DEFAULT_GAMMA = 5.0


@dataclass(frozen=True)
class LossWeighting:
    kind: str = "uniform"          # uniform | min-snr
    gamma: float = DEFAULT_GAMMA

    def diffusion(self, alphas_cumprod, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights on L_simple for ε-prediction at integer steps ``t`` (None: uniform)."""
        if self.kind == "uniform":
            return None
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)[t.long().cpu()]
        snr = abar / (1.0 - abar)
        return (torch.clamp(snr, max=self.gamma) / snr).float().to(t.device)

    def flow(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights on the velocity loss at flow times ``t`` in (0, 1] (None: uniform)."""
        if self.kind == "uniform":
            return None
        t64 = t.double().clamp(min=1e-12)
        snr = ((1.0 - t64) / t64) ** 2
        return (torch.clamp(snr, max=self.gamma) * t64 ** 2).float()


@dataclass(frozen=True)
class TSampling:
    kind: str = "uniform"          # uniform | logit-normal
    mean: float = 0.0
    std: float = 1.0

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Flow times in (0, 1): σ(m + s·z)."""
        z = torch.randn(n, generator=generator)
        return torch.sigmoid(self.mean + self.std * z)


def parse_loss_weighting(spec: str | None) -> LossWeighting:
    spec = (spec or "uniform").strip()
    if spec == "uniform":
        return LossWeighting()
    name, _, arg = spec.partition(":")
    if name != "min-snr":
        raise UserError(f"--loss-weighting must be uniform or min-snr[:GAMMA], got {spec!r}")
    try:
        gamma = float(arg) if arg else DEFAULT_GAMMA
    except ValueError:
        raise UserError(f"--loss-weighting min-snr:GAMMA needs a number, got {arg!r}") from None
    if not gamma > 0 or math.isinf(gamma):
        raise UserError(f"--loss-weighting min-snr: gamma must be a finite number > 0, got {arg}")
    return LossWeighting("min-snr", gamma)


def parse_t_sampling(spec: str | None, objective: str = "flow") -> TSampling:
    spec = (spec or "uniform").strip()
    if spec == "uniform":
        return TSampling()
    name, _, arg = spec.partition(":")
    if name != "logit-normal":
        raise UserError(f"--t-sampling must be uniform or logit-normal[:M,S], got {spec!r}")
    if objective != "flow":
        raise UserError("--t-sampling logit-normal is for --objective flow; diffusion draws its integer t "
                        "uniformly (drop the flag or train flow)")
    try:
        m, s = (float(v) for v in arg.split(",")) if arg else (0.0, 1.0)
    except ValueError:
        raise UserError(f"--t-sampling logit-normal:M,S needs two numbers, got {arg!r}") from None
    if not s > 0 or not math.isfinite(m) or not math.isfinite(s):
        raise UserError(f"--t-sampling logit-normal:M,S needs a finite M and S > 0, got {arg!r}")
    return TSampling("logit-normal", m, s)
