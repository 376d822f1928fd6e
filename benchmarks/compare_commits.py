"""Time one digits-preset training step (the loop body) and one guided DDPM-250 sampling batch with
whichever dits is first on PYTHONPATH, e.g. to compare two commits interleaved:

    git worktree add --detach /tmp/old ade7c51
    for r in 1 2 3; do for src in /tmp/old/src src; do PYTHONPATH=$src python benchmarks/compare_commits.py; done; done

Prints one JSON line: train_ms (mean of 40 steps), sample_s (64 samples, 250 steps, cfg 4).
"""
import json, time, sys, copy
import torch
from dits.models import create_model
from dits.diffusion import create_diffusion
from dits.sample import generate
torch.manual_seed(0)
m = create_model("DiT", depth=4, hidden_size=128, num_heads=4, patch_size=2, input_size=8, in_channels=1, num_classes=10)
try:
    from dits.speed import adamw; opt = adamw(m.parameters(), 2e-3, 0.0, torch.device("cpu"))
except ImportError:
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0)
ema = copy.deepcopy(m).requires_grad_(False)
d = create_diffusion("")
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 1, 8, 8, generator=g); y = torch.randint(0, 10, (64,), generator=g)
def step():
    t = torch.randint(0, 1000, (64,), generator=g)
    loss = d.training_losses(m, x, t, model_kwargs={"y": y})["loss"].mean()
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
    with torch.no_grad(): torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in m.parameters()], 1e-3)
m.train()
for _ in range(5): step()
t0 = time.perf_counter()
for _ in range(40): step()
train_ms = (time.perf_counter() - t0) / 40 * 1e3
ema.eval()
generate(ema, 64, sampler="ddpm", steps=5, cfg_scale=4.0, batch_size=64)
t0 = time.perf_counter()
generate(ema, 64, sampler="ddpm", steps=250, cfg_scale=4.0, batch_size=64)
print(json.dumps({"train_ms": round(train_ms, 2), "sample_s": round(time.perf_counter() - t0, 3)}))
