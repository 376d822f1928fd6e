"""Sampler error against NFE on data with an exact ε (same as ``dits bench samplers``).

    python benchmarks/bench_samplers.py [--quick] [--samples N] [--seed S]

See dits.bench.samplers for the method and docs/diffusion.md for a recorded run.
"""
import sys

from dits.bench.samplers import main

if __name__ == "__main__":
    sys.exit(main())
