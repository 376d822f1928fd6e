"""``dits bench``: reproducible benchmarks.

``dits bench samplers [--quick]`` prints each sampler's error against the number of network
evaluations (NFE) on data whose exact denoiser is known (see dits.diffusion.benchmark).
"""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark (samplers)",
                              description="Reproducible benchmarks.")
    targets = p.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True
    s = targets.add_parser("samplers", help="sampler error against NFE (DDPM, DDIM, DPM-Solver++, Heun)",
                           description="Sampler error (W1 to the true distribution) against NFE, with an exact "
                                       "denoiser for a Gaussian and a Gaussian mixture. About 40 s on 2 CPU cores; "
                                       "--quick takes a few seconds.")
    # torch is imported only when the command runs, so `dits --help` stays fast.
    s.add_argument("--quick", action="store_true", help="fewer samples and NFE (5, 10, 20, 50)")
    s.add_argument("--samples", type=int, default=None, help="samples per run (default 2^18, quick 2^14)")
    s.add_argument("--seed", type=int, default=0, help="seed for x_T and DDPM's noise (default 0)")
    s.set_defaults(func=_samplers)


def _samplers(args) -> int:
    from dits.diffusion import benchmark
    return benchmark.run_from_args(args)
