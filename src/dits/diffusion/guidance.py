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
"""
from __future__ import annotations

import torch


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


def guided_model(model, cfg_scale: float, null_class: int, eps_channels: int,
                 guided_channels: int | None = None):
    """Wrap a DiT-style ``model(x, t, y)`` so that one call of N samples is guided.

    The wrapper runs the conditional and the null-label halves in one forward pass of 2N,
    combines them with :func:`combine_guided`, and returns the conditional half (N), so any
    sampler can use it unchanged.
    """
    def forward(x, t, y=None, **kwargs):
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        n = x.shape[0]
        y_null = torch.full_like(y, int(null_class))
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]), **kwargs)
        return combine_guided(out, cfg_scale, eps_channels, guided_channels)[:n]
    return forward
