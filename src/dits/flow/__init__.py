"""Flow matching on the DiT backbone (SiT's linear interpolant and velocity prediction).

- :mod:`dits.flow.interpolant`: x_t = (1 − t)·x₀ + t·ε, the velocity target ε − x₀, the loss,
  and the model's time scale (999·t);
- :mod:`dits.flow.samplers`: ``euler``, ``heun`` (ODE) and ``sde`` (Euler–Maruyama, w_t = t);
- :func:`sample`: one call for every flow sampler, with (interval) guidance and per-sample seeds;
- :class:`FlowMixtureOracle`: the exact velocity for Gaussian-mixture data (tests, benchmarks).

It sits beside :mod:`dits.diffusion` rather than inside it: the two objectives share the model,
guidance and noise helpers, nothing else. :mod:`dits.objectives` puts both behind one interface.
See docs/flow.md.
"""
from dits.flow.interpolant import (TIME_SCALE, eps_from_velocity, interpolate, model_time, training_losses,
                                   velocity_target, x0_from_velocity)
from dits.flow.oracle import FlowMixtureOracle
from dits.flow.samplers import FLOW_SAMPLERS, evaluation_times, nfe, sample_euler, sample_heun, sample_sde, time_grid
from dits.flow.sampling import check_steps, noise_level, sample

__all__ = ["TIME_SCALE", "interpolate", "velocity_target", "model_time", "x0_from_velocity", "eps_from_velocity",
           "training_losses", "FlowMixtureOracle", "FLOW_SAMPLERS", "nfe", "evaluation_times", "time_grid",
           "sample_euler", "sample_heun", "sample_sde", "check_steps", "noise_level", "sample"]
