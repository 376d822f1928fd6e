"""Where a dits training step goes, kernel by kernel: `torch.profiler` over the step that
`dits bench train` times, with inductor's per-kernel records on (docs/performance.md).

    PYTHONPATH=src python benchmarks/profile_step.py [PLAN [PRECISION]]   # default compile-model+math bf16
"""
import sys
import time

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from dits.bench.speed import Setup, dits_train_step

inductor_config.cpp.enable_kernel_profile = True  # each generated C++ kernel gets its own row
plan = sys.argv[1] if len(sys.argv) > 1 else "compile-model+math"
setup = Setup(model="DiT-S/2", input_size=32, in_channels=3, num_classes=1000, batch=8, precision=sys.argv[2] if len(sys.argv) > 2 else "bf16", plan=plan)
step, _, choice = dits_train_step(setup)
print(choice.line)
for _ in range(4):
    step()
times = []
for _ in range(4):
    t = time.perf_counter()
    step()
    times.append(round(1e3 * (time.perf_counter() - t)))
print("ms/step:", times)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(3):
        step()
print("3 steps:")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
