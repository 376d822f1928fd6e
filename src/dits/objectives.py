"""Training objectives behind one small interface: Gaussian diffusion (DiT) and flow matching (SiT).

The trainer asks an objective for two things: ``draw_t(n, generator)`` (the step's noise
levels, drawn from the step's generator) and ``training_losses(model, x0, t, model_kwargs,
noise)`` (a dict of per-sample losses, ``loss`` among them). The sampler side is one call,
:func:`sample`, which dispatches on the objective to :func:`dits.diffusion.sample` or
:func:`dits.flow.sample`. Guidance (constant or limited-interval) is shared by both.

Checkpoints record the objective in their ``train_config`` (and inference checkpoints at the
top level); :func:`objective_of` reads it, and files without it are diffusion (everything
written before flow existed, and the official DiT checkpoints).
"""
from __future__ import annotations

import torch

from dits.diffusion import SAMPLERS as DIFFUSION_SAMPLERS
from dits.diffusion import create_diffusion
from dits.diffusion import sample as diffusion_sample
from dits.diffusion.guidance import diffusion_noise_level, in_interval, parse_interval
from dits.diffusion.sampling import evaluation_timesteps
from dits.diffusion.schedule import Schedule
from dits.errors import UserError
from dits import flow
from dits.training_options import LossWeighting, TSampling, parse_loss_weighting, parse_t_sampling

OBJECTIVES = ("diffusion", "flow")
SAMPLERS = {"diffusion": DIFFUSION_SAMPLERS, "flow": flow.FLOW_SAMPLERS}
# The stochastic 250-step samplers: DiT's DDPM-250, and SiT's SDE (its best FID).
DEFAULT_SAMPLER = {"diffusion": "ddpm", "flow": "sde"}


def check_objective(name: str) -> str:
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; use one of: {', '.join(OBJECTIVES)}")
    return name


def resolve_learn_sigma(objective: str, learn_sigma: bool | None) -> bool:
    """``learn_sigma`` None means automatic: on for diffusion (DiT), off for flow (no variance to learn)."""
    if learn_sigma is None:
        return check_objective(objective) == "diffusion"
    if learn_sigma and objective == "flow":
        raise UserError("--learn-sigma true does not apply to --objective flow (it predicts the velocity only); "
                        "drop the flag")
    return bool(learn_sigma)


def check_sampler(objective: str, sampler: str) -> str:
    """One line if ``sampler`` does not belong to ``objective``'s samplers."""
    ok = SAMPLERS[check_objective(objective)]
    if sampler not in ok:
        other = [o for o in OBJECTIVES if sampler in SAMPLERS[o]]
        why = f"is a {other[0]} sampler" if other else "is unknown"
        raise UserError(f"sampler {sampler!r} {why}; this is a {objective} model: use one of {', '.join(ok)}")
    return sampler


def default_steps(sampler: str) -> int:
    """DiT's 250 for the ancestral samplers (ddpm, and the flow SDE), 50 for the ODE solvers."""
    return 250 if sampler in ("ddpm", "sde") else 50


def objective_of(info: dict | None) -> str:
    """The objective a checkpoint (``load_model``'s info, or a checkpoint dict) was trained with."""
    info = info or {}
    tc = info.get("train_config") if isinstance(info.get("train_config"), dict) else {}
    return check_objective(info.get("objective") or tc.get("objective") or "diffusion")


# ----------------------------------------------------------------------------- training
def _weighted(terms: dict, w: torch.Tensor | None, mae_weight: float = 0.0) -> dict:
    """``loss`` with L_simple weighted per sample (``mse`` stays the plain L_simple, for the logs), plus
    ``mae_weight`` × the masked-token term ``mae`` of a masked step."""
    if w is not None:
        w = w.to(terms["mse"].device, terms["mse"].dtype)
        terms["loss"] = w * terms["mse"] + (terms["vb"] if "vb" in terms else 0.0)
    if "mae" in terms:
        terms["loss"] = terms["loss"] + mae_weight * terms["mae"]
    return terms


def _split_mask(masking, x0, model_kwargs):
    """The step's :class:`dits.masking.TokenMask` (None: an unmasked step). ``mask_keep`` stays in
    the model's kwargs: the model drops the same tokens the loss leaves out."""
    keep = (model_kwargs or {}).get("mask_keep")
    if keep is None:
        return None
    if masking is None:
        raise ValueError("mask_keep given to an objective created without masking")
    return masking.token_mask(keep, x0)


def _unmasked_log(terms: dict, masking) -> dict:
    """A masked run's unmasked steps (--unmask-steps) log ``mae`` as 0, so every log line has the key."""
    if masking is not None and "mae" not in terms:
        terms["mae"] = torch.zeros_like(terms["mse"])
    return terms


class TrainingLoss(torch.nn.Module):
    """``objective.training_losses(net, x0, t, model_kwargs, noise)`` as a module, called
    ``(x0, t, model_kwargs, noise)``: the unit a whole-model compile compiles (dits.plan), so the
    loss's few dozen small ops (q_sample, the split of the output, the learned-variance bound, the
    MSE) join the network's graph instead of running eager around it: the digits training step
    1.02-1.09x faster (docs/performance.md, 22nd session). The module holds ``net`` (no copy of its parameters)."""

    def __init__(self, objective, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.__dict__["objective"] = objective  # not a module: kept out of the module tree

    def forward(self, x0, t, model_kwargs, noise) -> dict:
        return self.objective.training_losses(self.net, x0, t, model_kwargs=model_kwargs, noise=noise)


class DiffusionObjective:
    """DiT's Gaussian diffusion: integer t uniform over the T steps, L_simple (+ L_vlb)."""
    name = "diffusion"

    def __init__(self, noise_schedule: str = "linear", diffusion_steps: int = 1000, learn_sigma: bool = True,
                 weighting: LossWeighting = LossWeighting(), masking=None):
        self.diffusion = create_diffusion("", noise_schedule=noise_schedule, learn_sigma=learn_sigma,
                                          diffusion_steps=diffusion_steps)
        self.weighting = weighting
        self.masking = masking  # a dits.masking.Masking, or None

    def draw_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.diffusion.num_timesteps, (n,), generator=generator)

    def training_losses(self, model, x0, t, model_kwargs=None, noise=None) -> dict:
        masked = _split_mask(self.masking, x0, model_kwargs)
        extra = {} if masked is None else {"masked": masked}
        terms = self.diffusion.training_losses(model, x0, t, model_kwargs=model_kwargs, noise=noise, **extra)
        terms = _weighted(terms, self.weighting.diffusion(self.diffusion.alphas_cumprod, t),
                          self.masking.loss_weight if masked is not None else 0.0)
        return _unmasked_log(terms, self.masking)


class FlowObjective:
    """Flow matching with the linear interpolant: t ~ U[0, 1] (or logit-normal), velocity MSE."""
    name = "flow"

    def __init__(self, weighting: LossWeighting = LossWeighting(), t_sampling: TSampling = TSampling(), masking=None):
        self.weighting, self.t_sampling, self.masking = weighting, t_sampling, masking

    def draw_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.t_sampling.kind == "uniform":
            return torch.rand(n, generator=generator)
        return self.t_sampling.draw(n, generator)

    def training_losses(self, model, x0, t, model_kwargs=None, noise=None) -> dict:
        masked = _split_mask(self.masking, x0, model_kwargs)
        extra = {} if masked is None else {"masked": masked}
        terms = flow.training_losses(model, x0, t, model_kwargs=model_kwargs, noise=noise, **extra)
        terms = _weighted(terms, self.weighting.flow(t), self.masking.loss_weight if masked is not None else 0.0)
        return _unmasked_log(terms, self.masking)


def create_objective(name: str, *, noise_schedule: str = "linear", diffusion_steps: int = 1000,
                     learn_sigma: bool | None = None, loss_weighting: str | None = None,
                     t_sampling: str | None = None, masking=None):
    """The objective; ``loss_weighting`` / ``t_sampling`` are the --loss-weighting / --t-sampling specs
    (None or "uniform": the paper's step, bit for bit); ``masking`` a :class:`dits.masking.Masking`
    (--mask-ratio; None: no masked steps)."""
    learn_sigma = resolve_learn_sigma(name, learn_sigma)
    weighting = parse_loss_weighting(loss_weighting)
    sampling = parse_t_sampling(t_sampling, name)
    if name == "flow":
        return FlowObjective(weighting, sampling, masking)
    return DiffusionObjective(noise_schedule, diffusion_steps, learn_sigma, weighting, masking)


# ----------------------------------------------------------------------------- sampling
def sample(model, shape, *, objective: str = "diffusion", sampler: str | None = None, steps: int | None = None,
           learn_sigma: bool = True, noise_schedule: str = "linear", diffusion_steps: int = 1000, **kwargs):
    """x₀ samples from ``model`` trained with ``objective``; ``kwargs`` as :func:`dits.diffusion.sample`
    (``y``, ``cfg_scale``, ``guided_channels``, ``guidance_interval``, ``clip_denoised``, ``seed``, ...)."""
    sampler = check_sampler(objective, sampler or DEFAULT_SAMPLER[objective])
    steps = default_steps(sampler) if steps is None else steps
    if objective == "flow":
        return flow.sample(model, shape, sampler=sampler, steps=steps, **kwargs)
    return diffusion_sample(model, shape, sampler=sampler, steps=steps, learn_sigma=learn_sigma,
                            noise_schedule=noise_schedule, diffusion_steps=diffusion_steps, **kwargs)


def evaluation_levels(objective: str, sampler: str, steps: int, noise_schedule: str = "linear",
                      diffusion_steps: int = 1000) -> torch.Tensor:
    """Noise level (flow-t scale, see :mod:`dits.diffusion.guidance`) of each model call, in order."""
    check_sampler(objective, sampler)
    if objective == "flow":
        flow.check_steps(sampler, steps)
        ts = torch.tensor(flow.evaluation_times(sampler, steps), dtype=torch.float32)
        return flow.noise_level(flow.model_time(ts))  # exactly what the guided wrapper computes
    level = diffusion_noise_level(Schedule.named(noise_schedule, diffusion_steps).alphas_cumprod)
    return level(torch.tensor(evaluation_timesteps(sampler, steps, noise_schedule, diffusion_steps)))


def count_nfe(objective: str, sampler: str, steps: int, cfg_scale: float = 1.0, guidance_interval=None,
              noise_schedule: str = "linear", diffusion_steps: int = 1000) -> int:
    """Network evaluations per sample: a guided call counts 2 (conditional + unconditional rows)."""
    levels = evaluation_levels(objective, sampler, steps, noise_schedule, diffusion_steps)
    if cfg_scale == 1:
        return len(levels)
    interval = parse_interval(guidance_interval)
    guided = torch.ones_like(levels, dtype=torch.bool) if interval is None else in_interval(levels, interval)
    return len(levels) + int(guided.sum())
