"""The update after a DiT-S/2 step: torch's fused AdamW + foreach EMA + gradient norm (what
`train_step` runs) against AdamW and EMA as one torch.compile'd pass (docs/performance.md,
fifteenth session). Wall clock, interleaved, medians.

    PYTHONPATH=src python benchmarks/optimizer_pass.py
"""
import statistics
import time

import torch

from dits.models import create_model

torch.manual_seed(0)
params = list(create_model("DiT-S/2", input_size=32, in_channels=3, num_classes=1000).parameters())
print(f"{sum(p.numel() for p in params) / 1e6:.1f} M parameters in {len(params)} tensors")
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
ema = [p.detach().clone() for p in params]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=True)
opt.step()


def as_trained():
    torch.nn.utils.get_total_norm([p.grad for p in params])
    opt.step()
    torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-4)


# the same update on copies, as one compiled function (bias corrections as tensors: no recompiles)
P = [p.detach().clone() for p in params]
G = [p.grad for p in params]
M = [opt.state[p]["exp_avg"].clone() for p in params]
V = [opt.state[p]["exp_avg_sq"].clone() for p in params]
E = [e.clone() for e in ema]


def adamw_and_ema(P, G, M, V, E, lr, bc1, bc2, decay):
    for p, g, m, v, e in zip(P, G, M, V, E):
        m.lerp_(g, 0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        p.addcdiv_(m, (v / bc2).sqrt().add_(1e-8), value=-lr / bc1)
        e.lerp_(p, 1 - decay)


compiled = torch.compile(adamw_and_ema, fullgraph=True)
scalars = [torch.tensor(v) for v in (1e-4, 0.5, 0.01, 0.9999)]


def one_pass():
    torch.nn.utils.get_total_norm(G)
    compiled(P, G, M, V, E, *scalars)


t0 = time.perf_counter()
one_pass()
print(f"compile: {time.perf_counter() - t0:.0f} s")
times = {as_trained: [], one_pass: []}
for _ in range(30):
    for fn, acc in times.items():
        t = time.perf_counter()
        fn()
        acc.append(time.perf_counter() - t)
a, b = (1e3 * statistics.median(v) for v in times.values())
print(f"fused AdamW + foreach EMA + norm: {a:.1f} ms; compiled AdamW+EMA pass + norm: {b:.1f} ms ({a / b:.2f}x)")
