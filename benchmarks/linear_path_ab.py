"""A/B of the CPU fp32 training step with the oneDNN training GEMMs (dits.speed.linear's
default) against F.linear (MKL), alternating the two in one process; medians of rounds.

    PYTHONPATH=src python benchmarks/linear_path_ab.py s2|digits [rounds]
"""
import statistics
import sys
import time

import torch

from dits import speed
from dits.bench import Setup, dits_train_step

torch.set_num_threads(2)
which = sys.argv[1] if len(sys.argv) > 1 else "digits"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
if which == "s2":
    s, per = Setup(depth=12, hidden_size=384, num_heads=6, patch_size=2, input_size=32, in_channels=3,
                   num_classes=1000, batch=8, compile="off"), 2
else:
    s, per = Setup(compile="off"), 20
fast_applies, mode = speed._onednn_applies, {"path": "onednn"}


def applies(x, w):  # "mkl": the autograd path falls back to F.linear
    if mode["path"] == "mkl" and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    return fast_applies(x, w)


speed._onednn_applies = applies
steps = {}
for path in ("mkl", "onednn"):
    mode["path"] = path
    steps[path] = dits_train_step(s)[0]
    for _ in range(2):
        steps[path]()
times = {k: [] for k in steps}
for _ in range(rounds):
    for path, fn in steps.items():
        mode["path"] = path
        t0 = time.perf_counter()
        for _ in range(per):
            fn()
        times[path].append((time.perf_counter() - t0) / per * 1e3)
m = {k: statistics.median(v) for k, v in times.items()}
print(f"{which} fp32 step: F.linear (MKL) {m['mkl']:.1f} ms, oneDNN {m['onednn']:.1f} ms, "
      f"speed-up {m['mkl'] / m['onednn']:.2f}x")
