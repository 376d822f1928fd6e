"""The exact velocity field for Gaussian-mixture data: ground truth for the flow samplers.

Under the linear interpolant x_t = (1 − t)·x₀ + t·ε the optimal network predicts
E[ε − x₀ | x_t] = (x_t − E[x₀ | x_t]) / t (since ε = (x_t − (1 − t)·x₀)/t). Dividing x_t by
c = √((1 − t)² + t²) turns it into a variance-preserving x_t/c = √ᾱ·x₀ + √(1 − ᾱ)·ε with
ᾱ = (1 − t)²/c², so E[x₀ | x_t] is :meth:`GaussianMixtureOracle.posterior` at (x_t/c, ᾱ): closed form.
"""
from __future__ import annotations

from typing import Sequence

import torch

from dits.diffusion.oracle import GaussianMixtureOracle
from dits.flow.interpolant import TIME_SCALE


class FlowMixtureOracle:
    """A DiT-style ``model(x, t, y)`` (t = 999·flow time) returning the exact velocity; ``y`` ignored.

    ``calls`` counts network evaluations and ``rows`` the samples evaluated (a guided call of
    N samples runs 2N rows).
    """

    def __init__(self, weights: Sequence[float], means: Sequence[float], stds: Sequence[float]):
        self.mixture = GaussianMixtureOracle(weights, means, stds, learn_sigma=False)
        self.calls = 0
        self.rows = 0

    def sample_data(self, shape, generator=None) -> torch.Tensor:
        return self.mixture.sample_data(shape, generator)

    def cdf(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixture.cdf(x)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        t = (t.double() / TIME_SCALE).to(x.device).reshape((-1,) + (1,) * (x.dim() - 1))
        c = ((1 - t) ** 2 + t ** 2).sqrt()
        mean0, _ = self.mixture.posterior(x.double() / c, ((1 - t) / c) ** 2)
        return ((x.double() - mean0) / t).to(x.dtype)
