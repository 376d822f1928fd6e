"""``dits bench``: reproducible benchmarks.

``dits bench samplers [--quick]`` prints each sampler's error against the number of network
evaluations (NFE) on data whose exact denoiser is known (see dits.diffusion.benchmark).
``dits bench flow --diffusion RUN --flow RUN`` compares the two objectives on the digits
(see dits.flow_bench and docs/flow.md).
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
    _register_flow(targets)


def _samplers(args) -> int:
    from dits.diffusion import benchmark
    return benchmark.run_from_args(args)


def _register_flow(targets) -> None:
    f = targets.add_parser("flow", help="diffusion vs flow matching on the digits: quality against NFE, "
                                        "interval vs constant guidance",
                           description="Score two trained digits runs (one per objective) with the digits metric: "
                                       "each sampler against NFE, and interval vs constant guidance. Results are "
                                       "cached in OUT/results.json; see docs/flow.md for the commands and times.")
    f.add_argument("--diffusion", required=True, metavar="RUN", help="run dir (or checkpoint) of a diffusion model")
    f.add_argument("--flow", required=True, metavar="RUN", help="run dir (or checkpoint) of a flow model")
    f.add_argument("--out", default="flow-bench", help="where results.json, the table and the plots go")
    f.add_argument("--samples", type=int, default=1000, help="samples per evaluation (default 1000)")
    f.add_argument("--nfe", default="10,20,50,250", help="target model calls per sample (default 10,20,50,250; "
                                                         "only ddpm and sde run 250 and more)")
    f.add_argument("--scales", default="1,1.3,2,3", help="guidance scales for the interval comparison")
    f.add_argument("--interval", action="append", metavar="LO,HI",
                   help="guidance interval(s) to compare with constant guidance (default 0.2,0.8; repeatable)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_flow)


def _flow(args) -> int:
    from dits import flow_bench
    return flow_bench.run_from_args(args)
