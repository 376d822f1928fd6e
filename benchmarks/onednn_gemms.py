"""The three GEMMs of a training step (forward, input gradient, weight gradient) on MKL (what
F.linear / mm take for CPU fp32) and on oneDNN (dits.speed's path), at DiT-S/2 and digits
shapes; median ms of 20 calls, two threads. The table in docs/performance.md.

    PYTHONPATH=src python benchmarks/onednn_gemms.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
lp = torch.ops.mkldnn._linear_pointwise


def med(fn, n=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


for name, rows, shapes in [("DiT-S/2 b8", 2048, [(384, 1152), (384, 384), (384, 1536), (1536, 384)]),
                           ("digits b64", 1024, [(128, 384), (128, 128), (128, 512), (512, 128)])]:
    for k, n in shapes:
        x, w, b, g = torch.randn(rows, k), torch.randn(n, k), torch.randn(n), torch.randn(rows, n)
        r = [(med(lambda: F.linear(x, w, b)), med(lambda: lp(x, w, b, "none", [], ""))),
             (med(lambda: g @ w), med(lambda: lp(g, w.t(), None, "none", [], ""))),
             (med(lambda: g.t() @ x), med(lambda: lp(x.t(), g.t(), None, "none", [], "").t()))]
        print(f"{name} {rows} x {k} -> {n}: " + ", ".join(
            f"{what} MKL {a:.2f} / oneDNN {o:.2f} ms" for what, (a, o) in zip(("forward", "d/dx", "d/dW"), r)))
