"""Micro-timings behind docs/performance.md's "what each change bought" table: AdamW variants,
EMA update styles, attention kernels by shape/dtype, and tanh-GELU in bf16. CPU time, one thread.

    PYTHONPATH=src python benchmarks/speed_parts.py
"""
import time, torch, copy
torch.set_num_threads(1)
from dits.models import create_model
now = time.process_time
def med(fn, n=30):
    for _ in range(3): fn()
    ts=[]
    for _ in range(n):
        t0=now(); fn(); ts.append(now()-t0)
    ts.sort(); return ts[len(ts)//2]*1e3
m = create_model("DiT", depth=4, hidden_size=128, num_heads=4, patch_size=2, input_size=8, in_channels=1, num_classes=10)
for p in m.parameters(): p.grad = torch.randn_like(p)
for name, opt in [("AdamW default (for-loop on CPU)", torch.optim.AdamW(m.parameters(), lr=1e-4)),
                  ("AdamW foreach", torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True)),
                  ("AdamW fused", torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True))]:
    print(f"digits optimizer step, {name}: {med(opt.step):.2f} ms")
ema = copy.deepcopy(m)
def off():
    e = dict(ema.named_parameters())
    with torch.no_grad():
        for k, p in m.named_parameters(): e[k].mul_(0.9999).add_(p.data, alpha=1e-4)
from dits.train.loop import update_ema
print(f"EMA official per-param mul_/add_: {med(off):.2f} ms; dits foreach lerp: {med(lambda: update_ema(ema, m, 0.9999)):.2f} ms")
import torch.nn.functional as F
from dits.speed import math_attention
for shape in [(64,4,16,32),(128,4,16,32),(8,6,256,64)]:
    for dt in ["fp32","bf16"]:
        for bwd in [True, False]:
            q,k,v = [torch.randn(shape, requires_grad=bwd) for _ in range(3)]
            def run(fn):
                def go():
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt=="bf16"):
                        o = fn(q,k,v)
                    if bwd: o.float().sum().backward()
                return go
            a=med(run(F.scaled_dot_product_attention), 15); b=med(run(math_attention), 15)
            print(f"attention {shape} {dt} {'fwd+bwd' if bwd else 'fwd'}: sdpa {a:.2f} ms, matmuls {b:.2f} ms, sdpa/matmuls {a/b:.2f}")
x = torch.randn(64 * 16, 512, dtype=torch.bfloat16, requires_grad=True)
g = torch.randn(64 * 16, 512, dtype=torch.bfloat16)
print(f"tanh-GELU fwd+bwd, bf16 (1024, 512): {med(lambda: F.gelu(x, approximate='tanh').backward(g)):.2f} ms")
