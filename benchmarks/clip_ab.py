"""The gradient clip's multiply on every step (clip_grad_norm_) against only on steps it clips (the
trainer's clip_grads since the 22nd session), digits step, in one process (the two take turns round
by round, dits.bench.speed.interleave, medians):

    PYTHONPATH=src python benchmarks/clip_ab.py compile-model+mkl+math 100   # a norm under the clip
    PYTHONPATH=src python benchmarks/clip_ab.py compile-model+mkl+math 1     # synthetic batches clip every step
"""
import statistics
import sys

import torch

import dits.train.loop as loop
from dits.bench.speed import Setup, dits_train_step, interleave

plan = sys.argv[1] if len(sys.argv) > 1 else "compile-model+mkl+math"
clip = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0


def setup() -> Setup:
    return Setup(precision="fp32", plan=plan, run_steps=4000, lr=2e-3, warmup_steps=100, grad_clip=clip,
                 ema_decay=0.999, ema_warmup=True)


def every_step(model, max_norm, gnorm):  # the step before: clip_grad_norm_'s multiply on every step
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, gnorm)
    return True


when_it_clips = loop.clip_grads
a, _, _ = dits_train_step(setup())
b, _, _ = dits_train_step(setup())


def old():
    loop.clip_grads = every_step
    a()


def new():
    loop.clip_grads = when_it_clips
    b()


ta, tb = interleave({"every step": old, "when it clips": new}, 20, 20, 5, torch.device("cpu"), progress=False)
paired = statistics.median(x / y for x, y in zip(ta.seconds, tb.seconds))
print(f"clip every step {ta.median * 1e3:.2f} ms, only when it clips {tb.median * 1e3:.2f} ms; "
      f"{ta.median / tb.median:.3f}x (round-paired {paired:.3f}x)")
