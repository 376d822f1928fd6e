"""The gradient clip's multiply on every step (clip_grad_norm_) against only on steps it clips (the
trainer's clip_grads since the 22nd session), digits step, in one process, alternated, medians:

    PYTHONPATH=src python benchmarks/clip_ab.py compile-model+mkl+math 100   # a norm under the clip
    PYTHONPATH=src python benchmarks/clip_ab.py compile-model+mkl+math 1     # synthetic batches clip every step
"""
import sys, time, statistics as st, torch
import dits.train.loop as L
from dits.bench.speed import Setup, dits_train_step
plan = sys.argv[1] if len(sys.argv) > 1 else "compile-model+mkl+math"
s = lambda: Setup(precision="fp32", plan=plan, run_steps=4000, lr=2e-3, warmup_steps=100, grad_clip=float(sys.argv[2]) if len(sys.argv) > 2 else 1.0, ema_decay=0.999, ema_warmup=True)
new = L.clip_grads
def always(model, max_norm, gnorm):   # the step before: clip_grad_norm_'s multiply on every step
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, gnorm)
    return True
a, _, _ = dits_train_step(s()); b, _, _ = dits_train_step(s())
fa = lambda: (setattr(L, "clip_grads", always), a())
fb = lambda: (setattr(L, "clip_grads", new), b())
for f in (fa, fb):
    for _ in range(5): f()
A, B = [], []
for r in range(20):
    for f, acc in ((fa, A), (fb, B)) if r % 2 == 0 else ((fb, B), (fa, A)):
        t = time.perf_counter()
        for _ in range(20): f()
        acc.append((time.perf_counter() - t) / 20 * 1e3)
print(f"clip every step {st.median(A):.2f} ms, only when it clips {st.median(B):.2f} ms, {st.median(A)/st.median(B):.3f}x (round-paired {st.median([x/y for x,y in zip(A,B)]):.3f}x)")
