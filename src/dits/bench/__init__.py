"""Benchmarks, in one package:

- :mod:`dits.bench.speed`: ``dits bench train`` / ``dits bench sample``, the trainer's own step
  (:mod:`dits.bench.steps`, which the plan probe of :mod:`dits.plan` times too) and the sampler,
  optionally against the official DiT code (:mod:`dits.bench.official`), each contender in its own
  process (:mod:`dits.bench.isolated`);
- :mod:`dits.bench.samplers`: ``dits bench samplers``, sampler error against NFE with exact denoisers;
- :mod:`dits.bench.flow`: ``dits bench flow``, diffusion vs flow matching on the digits.
"""
from dits.bench.speed import (CLOCKS, Setup, Timing, bench_sample, bench_train, dits_sample, dits_train_step,
                              interleave, matmul_peak, report, torch_info)

__all__ = ["Setup", "Timing", "CLOCKS", "bench_train", "bench_sample", "dits_train_step", "dits_sample",
           "interleave", "matmul_peak", "report", "torch_info"]
