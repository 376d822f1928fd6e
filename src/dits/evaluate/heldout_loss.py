"""The held-out denoising loss: a low-noise ranking metric for the study.

Sample metrics (FD, accuracy) carry the noise of a few hundred samples; the denoising loss on a
fixed set of held-out images, at *fixed* noise draws, carries none of it: every model at every
evaluation sees the same (image, t, noise) triples (common random numbers), so two models'
losses differ only by what the models do. Two numbers per split:

* ``mse``: L_simple, the mean over images and dimensions of the squared error of the model's
  prediction target (ε for diffusion, the velocity for flow), with t drawn as in training;
* ``bpd`` (diffusion with learned variances only): an unbiased one-sample-per-image estimate of the
  variational bound in bits/dim, ``T · mean_i L_{t_i}(x_i) + L_prior`` -- the per-step terms of
  DiT's hybrid loss (decoder NLL at t = 0, KL above), times the number of steps they average over,
  plus the prior's KL in closed form.

The same function on the training split (same count, same draws) gives the memorisation gap.
"""
from __future__ import annotations

import math

import torch

N_IMAGES = 2000       # per split: cheap next to sampling (one forward pass each)
SEED = 1234           # the draws' seed: the same for every run, model and evaluation


def _prior_bpd(x0: torch.Tensor, alpha_bar_T: float) -> torch.Tensor:
    """Per-image KL(q(x_T | x_0) || N(0, I)) in bits/dim."""
    mean_sq = alpha_bar_T * x0.double() ** 2
    var = 1.0 - alpha_bar_T
    kl = 0.5 * (var + mean_sq - 1.0 - math.log(var))
    return kl.flatten(1).mean(1) / math.log(2.0)


@torch.no_grad()
def denoising_loss(model, objective, x: torch.Tensor, y: torch.Tensor | None, *, n: int = N_IMAGES,
                   seed: int = SEED, batch_size: int = 500, device=None) -> dict:
    """{"mse", "bpd" (or None), "n"} of ``model`` on the first ``n`` of (x, y) at draws fixed by ``seed``."""
    n = min(n, len(x))
    g = torch.Generator().manual_seed(seed)
    t = objective.draw_t(n, g)
    noise = torch.randn((n, *x.shape[1:]), generator=g)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    mse, vb = [], []
    try:
        for i in range(0, n, batch_size):
            sl = slice(i, min(n, i + batch_size))
            kwargs = {"y": y[sl].to(device)} if y is not None else {}
            terms = objective.training_losses(model, x[sl].to(device), t[sl].to(device), kwargs,
                                              noise=noise[sl].to(device))
            mse.append(terms["mse"].double().cpu())
            if "vb" in terms:
                vb.append(terms["vb"].double().cpu())
    finally:
        model.train(was_training)
    out = {"n": n, "mse": float(torch.cat(mse).mean()), "bpd": None}
    if vb and getattr(objective, "name", "") == "diffusion":
        d = objective.diffusion
        # training_losses scales vb by T/1000 for "rescaled_mse"; undo it to get the bound's terms
        scale = (d.num_timesteps / 1000.0) if d.loss_type == "rescaled_mse" else 1.0
        per_step = torch.cat(vb) / scale
        alpha_bar_T = float(d.schedule.alphas_cumprod[-1])
        out["bpd"] = float(d.num_timesteps * per_step.mean() + _prior_bpd(x[:n], alpha_bar_T).mean())
    return out
