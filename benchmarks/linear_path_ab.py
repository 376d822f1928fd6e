"""A/B of the CPU fp32 training step with the oneDNN training GEMMs (plan eager+onednn+sdpa)
against F.linear (MKL, plan eager+mkl+sdpa), alternating the two in one process; medians of rounds.
`dits bench train --plan all` does the same in separate processes, with the other candidates.

    PYTHONPATH=src python benchmarks/linear_path_ab.py s2|digits [rounds]
"""
import statistics
import sys
import time

import torch

from dits.bench import Setup, dits_train_step

torch.set_num_threads(2)
which = sys.argv[1] if len(sys.argv) > 1 else "digits"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
if which == "s2":
    s, per = Setup(depth=12, hidden_size=384, num_heads=6, patch_size=2, input_size=32, in_channels=3,
                   num_classes=1000, batch=8, compile="off"), 2
else:
    s, per = Setup(compile="off"), 20
steps = {}
for path in ("mkl", "onednn"):  # the two eager plans (dits.plan) that differ only in the GEMM backend
    s.plan = f"eager+{path}+sdpa"
    steps[path] = dits_train_step(s)[0]
    for _ in range(2):
        steps[path]()
times = {k: [] for k in steps}
for _ in range(rounds):
    for path, fn in steps.items():
        t0 = time.perf_counter()
        for _ in range(per):
            fn()
        times[path].append((time.perf_counter() - t0) / per * 1e3)
m = {k: statistics.median(v) for k, v in times.items()}
print(f"{which} fp32 step: F.linear (MKL) {m['mkl']:.1f} ms, oneDNN {m['onednn']:.1f} ms, "
      f"speed-up {m['mkl'] / m['onednn']:.2f}x")
