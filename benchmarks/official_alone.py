"""The official DiT training step timed alone: no dits contender anywhere, each attention path in
its own process, the same rounds and medians as `dits bench train`. The check that the bench's
"official" rows are the reference's own speed (issue 20: interleaved in one process after dits'
compiled graph, the reference ran slower than alone, which flattered dits).

    python benchmarks/official_alone.py /path/to/DiT [--official-path DIR ...] [--precision bf16]
           [--rounds 5] [--steps 10] [--clock cpu]

Shape: the digits preset (depth 4, width 128, patch 2, 8x8x1, batch 64), as `--preset digits`.
"""
import argparse
import os

import torch

from dits.bench import isolated
from dits.bench.speed import Setup, _contender_specs, _loadavg

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("official")
p.add_argument("--official-path", action="append", default=[])
p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--clock", default="wall", choices=("wall", "cpu"))
a = p.parse_args()
extra = a.official_path + [x for x in os.environ.get("DITS_BENCH_PATH", "").split(":") if x]
s = Setup(precision=a.precision)
specs = _contender_specs("train", s, a.official, extra, "auto", [])
load0 = _loadavg()
timings = isolated.run_isolated(specs, a.rounds, a.steps, 3, progress=True, clock=a.clock)
for t in timings:
    print(f"{t.name:38s} {t.median * 1e3:8.1f} ms/step (median of {len(t.seconds)} rounds of {a.steps})")
print(f"alone: no dits contender; {a.clock} clock, {torch.get_num_threads()} thread(s); "
      f"load average {load0} -> {_loadavg()}")
