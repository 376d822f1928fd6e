"""The loss in the compiled graph, against the network alone compiled, in one process (the two
steps take turns round by round, dits.bench.speed.interleave, medians; docs/performance.md, 22nd session):

    PYTHONPATH=src python benchmarks/loss_graph_ab.py fp32 digits compile-model+mkl+math
    PYTHONPATH=src python benchmarks/loss_graph_ab.py fp32 s2 compile-model+onednn+sdpa 6

Arguments: precision, shape (digits: the preset's model, batch and recipe; s2: DiT-S/2 32x32x3,
batch 8), a compile-model plan, rounds. "network alone" is the step before the 22nd session: the
objective's loss eager around the compiled network.
"""
import statistics
import sys

import torch

import dits.train.loop as loop
from dits.bench.speed import Setup, dits_train_step, interleave
from dits.objectives import TrainingLoss

precision, shape = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "digits"
plan = sys.argv[3] if len(sys.argv) > 3 else "compile-model+mkl+math"
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 20


def setup() -> Setup:
    if shape == "s2":
        return Setup(model="DiT-S/2", input_size=32, in_channels=3, num_classes=1000, batch=8, precision=precision, plan=plan)
    return Setup(precision=precision, plan=plan, run_steps=4000, lr=2e-3, warmup_steps=100, grad_clip=1.0,
                 ema_decay=0.999, ema_warmup=True)


def network_alone(plan, objective, net, model, quiet=False):
    return TrainingLoss(objective, plan.wrap(net, model, quiet=quiet))


in_graph = loop.step_loss
loop.step_loss = network_alone
alone, _, _ = dits_train_step(setup())
loop.step_loss = in_graph
whole, _, _ = dits_train_step(setup())
timings = interleave({"alone": alone, "whole": whole}, rounds, 2 if shape == "s2" else 20, 3,
                     torch.device("cpu"), progress=False)
ta, tb = timings
paired = statistics.median(x / y for x, y in zip(ta.seconds, tb.seconds))
print(f"{precision} {shape} {plan}: network alone compiled {ta.median * 1e3:.2f} ms, with the loss {tb.median * 1e3:.2f} ms; "
      f"{ta.median / tb.median:.3f}x (round-paired {paired:.3f}x)")
