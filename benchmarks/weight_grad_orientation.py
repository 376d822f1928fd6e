"""The weight-gradient GEMM gradᵀ·x on oneDNN in both orientations, at the digits model's linears
(docs/performance.md, fifth session): oneDNN copies a transposed first operand, so the narrower
operand should be the transposed one (dits.speed._weight_grad).

    PYTHONPATH=src python benchmarks/weight_grad_orientation.py
"""
import torch, time
from dits.speed import _onednn
def med(f, n=200):
    for _ in range(20): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[n//2]*1e3
for N, i, o in [(1024,512,128),(1024,128,512),(1024,128,384),(1024,128,128),(64,128,768)]:
    x=torch.randn(N,i); g=torch.randn(N,o)
    a=_onednn(x.t(), g.t(), None).t(); b=g.t()@x
    print(N,i,o, "onednn(xT,gT)T %.3f"%med(lambda: _onednn(x.t(), g.t(), None).t()),
          "mm(gT,x) %.3f"%med(lambda: g.t()@x),
          "onednn(gT.c, xT) %.3f"%med(lambda: _onednn(g.t().contiguous(), x.t(), None)),
          "onednn(xT.c,gT)T %.3f"%med(lambda: _onednn(x.t().contiguous(), g.t(), None).t()),
          "xT.contig %.3f"%med(lambda: x.t().contiguous()),
          "maxdiff %.2e"%(a-b).abs().max())
