"""Gaussian diffusion as DiT trains and samples it (IDDPM/ADM conventions).

:func:`create_diffusion` takes the same arguments as the reference's, and the returned
:class:`GaussianDiffusion` has the same method names and argument names
(``training_losses``, ``p_mean_variance``, ``p_sample_loop``, ``ddim_sample_loop``, ...), so
research code written against DiT ports unchanged.

Conventions, as in the reference:
- ``t`` passed to every method indexes the *kept* timesteps of a respaced diffusion
  (0..num_timesteps−1); the model is always called with the original timestep
  (``timesteps[t]``, on the 0..T−1 scale it was trained on), as a long tensor.
- With learned variances the model returns 2C channels: ε (or x₀) then v ∈ [−1, 1], and
  log Σ = ((v+1)/2)·log β_t + (1 − (v+1)/2)·log β̃_t ("learned range").
"""
from __future__ import annotations

import functools
import math

import torch

from dits.errors import UserError
from dits.diffusion import samplers
from dits.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from dits.diffusion.schedule import Schedule, extract, get_named_beta_schedule, space_timesteps

MEAN_TYPES = ("epsilon", "x_start")
VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


def _check(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; use one of: {', '.join(allowed)}")
    return value


class GaussianDiffusion:
    """Training loss and samplers for one (possibly respaced) noise schedule.

    :param schedule: a :class:`Schedule`, or a 1-D array of betas (also accepted as ``betas=``,
        the reference's keyword).
    :param model_mean_type: "epsilon" (the network predicts ε) or "x_start" (it predicts x₀).
    :param model_var_type: "learned_range" (DiT), "fixed_small" (β̃_t) or "fixed_large" (β_t).
    :param loss_type: "mse" (L_simple, plus the unscaled L_vlb with learned variances: DiT),
        "rescaled_mse" (vb term × T/1000, IDDPM), "kl" (the bound alone), "rescaled_kl" (× T).
    """

    def __init__(self, schedule=None, *, betas=None, model_mean_type: str = "epsilon",
                 model_var_type: str = "learned_range", loss_type: str = "mse"):
        if (schedule is None) == (betas is None):
            raise UserError("give GaussianDiffusion either a schedule or betas")
        schedule = betas if schedule is None else schedule
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(schedule)
        self.model_mean_type = _check("model mean type", model_mean_type, MEAN_TYPES)
        self.model_var_type = _check("model variance type", model_var_type, VAR_TYPES)
        self.loss_type = _check("loss type", loss_type, LOSS_TYPES)
        self.num_timesteps = self.schedule.num_timesteps
        s = self.schedule
        # The reference exposes these as attributes; keep the names (float64 tensors here).
        self.betas, self.alphas_cumprod = s.betas, s.alphas_cumprod
        self.alphas_cumprod_prev, self.alphas_cumprod_next = s.alphas_cumprod_prev, s.alphas_cumprod_next
        self.posterior_variance = s.posterior_variance
        self.posterior_log_variance_clipped = s.posterior_log_variance_clipped
        self.timestep_map = s.timesteps.tolist()
        self.use_timesteps = set(self.timestep_map)
        # Fixed-large uses β_t, except at t = 0 where β̃_1 gives the decoder a better likelihood.
        large = torch.cat([s.posterior_variance[1:2], s.betas[1:]]) if len(s.betas) > 1 else s.betas
        self._fixed_var = {"fixed_large": (large, torch.log(large)),
                           "fixed_small": (s.posterior_variance, s.posterior_log_variance_clipped)}

    @property
    def learn_sigma(self) -> bool:
        return self.model_var_type == "learned_range"

    def __repr__(self) -> str:
        return (f"GaussianDiffusion({self.schedule!r}, mean={self.model_mean_type}, var={self.model_var_type}, "
                f"loss={self.loss_type})")

    # ------------------------------------------------------------------ the forward process
    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Kept indices -> the original timesteps the network sees."""
        return self.schedule.timesteps.to(t.device)[t.long()]

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        s = self.schedule
        return (extract(s.sqrt_alphas_cumprod, t, x_start) * x_start,
                extract(1.0 - s.alphas_cumprod, t, x_start).expand_as(x_start),
                extract(s.log_one_minus_alphas_cumprod, t, x_start).expand_as(x_start))

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise UserError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x_start.shape)}")
        s = self.schedule
        return (extract(s.sqrt_alphas_cumprod, t, x_start) * x_start
                + extract(s.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of the true posterior q(x_{t−1} | x_t, x_0)."""
        s = self.schedule
        mean = extract(s.posterior_mean_coef1, t, x_t) * x_start + extract(s.posterior_mean_coef2, t, x_t) * x_t
        return (mean, extract(s.posterior_variance, t, x_t).expand_as(x_t),
                extract(s.posterior_log_variance_clipped, t, x_t).expand_as(x_t))

    def predict_xstart_from_eps(self, x_t, t, eps):
        s = self.schedule
        return extract(s.sqrt_recip_alphas_cumprod, t, x_t) * x_t - extract(s.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        s = self.schedule
        return ((extract(s.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / extract(s.sqrt_recipm1_alphas_cumprod, t, x_t))

    # ------------------------------------------------------------------ the model
    def _split_output(self, out: torch.Tensor, x: torch.Tensor):
        c = x.shape[1]
        want = 2 * c if self.learn_sigma else c
        if out.shape[0] != x.shape[0] or out.shape[1] != want or out.shape[2:] != x.shape[2:]:
            hint = (" (with learned sigma the model must return ε and v: 2×C channels; pass learn_sigma=False for "
                    "a C-channel model)" if self.learn_sigma else " (pass learn_sigma=True for a 2×C-channel model)")
            raise UserError(f"model returned shape {tuple(out.shape)} for input {tuple(x.shape)}; expected "
                            f"{want} channels{hint}")
        return out.split(c, dim=1) if self.learn_sigma else (out, None)

    def _variance(self, v: torch.Tensor | None, x: torch.Tensor, t: torch.Tensor):
        s = self.schedule
        if v is None:
            var, log_var = self._fixed_var[self.model_var_type]
            return extract(var, t, x).expand_as(x), extract(log_var, t, x).expand_as(x)
        # Learned range: v = −1 is the posterior variance β̃_t (clipped at t = 0), v = +1 is β_t;
        # interpolating the logs keeps the output well scaled over the 3 decades between them.
        min_log = extract(s.posterior_log_variance_clipped, t, x)
        max_log = extract(s.log_betas, t, x)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        return torch.exp(log_var), log_var

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model: p(x_{t−1} | x_t) and the x₀ prediction.

        Returns a dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` (after
        ``denoised_fn`` then clipping to [−1, 1] if ``clip_denoised``), and ``eps`` (re-derived
        from ``pred_xstart``, which is what DDIM and the ODE solvers step with).
        """
        out = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        out, v = self._split_output(out, x)
        variance, log_variance = self._variance(v, x, t)
        pred_xstart = out if self.model_mean_type == "x_start" else self.predict_xstart_from_eps(x, t, out)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart,
                "eps": self.predict_eps_from_xstart(x, t, pred_xstart)}

    # ------------------------------------------------------------------ training
    def vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None, reduce=None):
        """One term of the variational bound, in bits per dimension, per sample.

        KL(q(x_{t−1}|x_t,x_0) ‖ p(x_{t−1}|x_t)) for t > 0; −log p(x_0|x_1) under the discretised
        Gaussian decoder for t = 0. Returns ``output`` (N,) and ``pred_xstart``. ``reduce`` replaces
        the mean over dimensions (masked training: the mean over the visible pixels).
        """
        reduce = reduce or mean_flat
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = reduce(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = reduce(nll) / math.log(2.0)
        return {"output": torch.where(t.to(kl.device) == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, masked=None):
        """Per-sample losses at kept timesteps ``t``: a dict of (N,) tensors.

        ``mse`` = L_simple (mean over dimensions of (target − prediction)²); with learned
        variances also ``vb`` = L_vlb for Σ only (the mean is detached inside it, so the bound
        trains the variance channels and L_simple alone trains the mean); ``loss`` = mse + vb
        (DiT's unweighted sum; × T/1000 on vb for "rescaled_mse"). For the "kl" losses ``loss``
        is the bound term alone (× T for "rescaled_kl").

        ``masked`` (a :class:`dits.masking.TokenMask`, masked training): ``mse`` and ``vb`` are means
        over the visible pixels only, and its extra terms (``mae``) are added to the dict (not to
        ``loss``: the objective weighs them).
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        reduce = masked.mean_visible if masked is not None else mean_flat
        if self.loss_type in ("kl", "rescaled_kl"):
            if masked is not None:
                raise ValueError("masked training needs an MSE loss type")
            terms["loss"] = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                              model_kwargs=model_kwargs)["output"]
            if self.loss_type == "rescaled_kl":
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        raw = model(x_t, self.model_timesteps(t), **model_kwargs)
        pred, v = self._split_output(raw, x_t)
        if v is not None:
            frozen = torch.cat([pred.detach(), v], dim=1)
            vb = self.vb_terms_bpd(lambda *_args, **_kw: frozen, x_start, x_t, t, clip_denoised=False,
                                   reduce=reduce)["output"]
            terms["vb"] = vb * (self.num_timesteps / 1000.0) if self.loss_type == "rescaled_mse" else vb
        target = noise if self.model_mean_type == "epsilon" else x_start
        terms["mse"] = reduce((target - pred) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        if masked is not None:
            terms.update(masked.extra_terms(x_t, pred))
        return terms

    # ------------------------------------------------------------------ sampling
    def _denoiser(self, model, clip_denoised, denoised_fn, model_kwargs):
        return functools.partial(self.p_mean_variance, model, clip_denoised=clip_denoised,
                                 denoised_fn=denoised_fn, model_kwargs=model_kwargs)

    @staticmethod
    def _start(model, shape, noise, device, noise_fn):
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise UserError(f"noise has shape {tuple(noise.shape)} but shape is {tuple(shape)}")
            return noise.to(device) if device is not None else noise
        if device is None:
            params = getattr(model, "parameters", None)
            p = next(iter(params()), None) if callable(params) else None
            device = p.device if p is not None else "cpu"
        like = torch.empty(tuple(shape), device=device)
        return noise_fn(like) if noise_fn is not None else torch.randn_like(like)

    def _run(self, fn, model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress,
             noise_fn=None, **kw):
        x = self._start(model, shape, noise, device, noise_fn)
        if noise_fn is not None and fn in (samplers.sample_ddpm, samplers.sample_ddim):  # the stochastic ones
            kw["noise_fn"] = noise_fn
        with torch.no_grad():
            return fn(self._denoiser(model, clip_denoised, denoised_fn, model_kwargs), x, self.alphas_cumprod,
                      progress=progress, **kw)

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, *, noise_fn=None):
        """Ancestral (DDPM) sampling over the kept steps: K steps, K model calls.

        ``noise`` is x_T (else drawn with ``noise_fn``, default the global RNG, on ``device``,
        default the model's). ``noise_fn(like)`` also supplies every step's noise.
        """
        return self._run(samplers.sample_ddpm, model, shape, noise, clip_denoised, denoised_fn, model_kwargs,
                         device, progress, noise_fn)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta=0.0, *, noise_fn=None):
        """DDIM over the kept steps (use a "ddimN" respacing for the DDIM paper's striding)."""
        return self._run(samplers.sample_ddim, model, shape, noise, clip_denoised, denoised_fn, model_kwargs,
                         device, progress, noise_fn, eta=eta)

    def ddim_reverse_sample_loop(self, model, x, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                                 device=None, progress=False):
        """Invert DDIM (η = 0): clean ``x`` -> the x_T from which :meth:`ddim_sample_loop` returns ≈ x."""
        x = x.to(device) if device is not None else x
        with torch.no_grad():
            return samplers.sample_ddim_reverse(self._denoiser(model, clip_denoised, denoised_fn, model_kwargs), x,
                                                self.alphas_cumprod, progress=progress)

    def _ode(self, fn, *args, **kw):
        if self.num_timesteps < 2:
            raise UserError("the ODE samplers integrate between kept timesteps and need at least 2 of them")
        return self._run(fn, *args, **kw)

    def dpm_solver_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                               model_kwargs=None, device=None, progress=False, *, noise_fn=None):
        """DPM-Solver++(2M) from the last kept step to the first (K kept steps, K−1 model calls)."""
        return self._ode(samplers.sample_dpmpp_2m, model, shape, noise, clip_denoised, denoised_fn, model_kwargs,
                         device, progress, noise_fn)

    def heun_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, *, noise_fn=None):
        """Heun's method from the last kept step to the first (K kept steps, 2(K−1) model calls)."""
        return self._ode(samplers.sample_heun, model, shape, noise, clip_denoised, denoised_fn, model_kwargs,
                         device, progress, noise_fn)


def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False, diffusion_steps=1000):
    """DiT's factory, same arguments and defaults.

    ``timestep_respacing``: ``""``/``None`` (all steps), ``"250"``, ``"ddim50"``, ``"10,10,10"``
    (see :func:`space_timesteps`). Training uses ``create_diffusion("")``; DiT samples with
    ``create_diffusion("250")``.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    schedule = Schedule(betas).respace(space_timesteps(diffusion_steps, timestep_respacing))
    return GaussianDiffusion(schedule, model_mean_type="x_start" if predict_xstart else "epsilon",
                             model_var_type=var_type, loss_type=loss_type)
