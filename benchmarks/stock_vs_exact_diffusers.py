"""What running a converted DiT with *stock* diffusers costs in sample quality.

diffusers' DiT computes its timestep sinusoid with ``downscale_freq_shift=1``
(frequencies 10000^(-k/127)) where the reference uses 10000^(-k/128); no weight mapping
absorbs that. This script converts a trained digits model to a ``DiTTransformer2DModel``,
samples the same seeds through (a) our model, (b) the converted transformer patched by
``dits.interop.diffusers.make_exact`` and (c) the stock converted transformer, and prints
the digits metric of each.

    python benchmarks/stock_vs_exact_diffusers.py RUN_DIR [--n 1000] [--cfg 1.3]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from dits.checkpoint import load_model
from dits.evaluate.digits import digits_metric, format_digits_metric, svc_accuracy
from dits.interop.diffusers import make_exact, to_diffusers
from dits.sample import generate


class DiffusersAsDiT(torch.nn.Module):
    """Call a DiTTransformer2DModel with the DiT signature model(x, t, y)."""

    def __init__(self, transformer, like):
        super().__init__()
        self.transformer = transformer
        for k in ("num_classes", "in_channels", "input_size", "learn_sigma"):
            setattr(self, k, getattr(like, k))

    def forward(self, x, t, y=None):
        return self.transformer(x, timestep=t, class_labels=y).sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a digits run directory or checkpoint")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--cfg", type=float, default=1.3)
    p.add_argument("--sampler", default="dpm++")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    model, _ = load_model(a.run)
    stock = to_diffusers(model)
    exact = make_exact(copy.deepcopy(stock))
    print(f"{a.n} samples, {a.sampler} {a.steps} steps, cfg {a.cfg}, same seeds for all three")
    for name, net in (("dits", model), ("diffusers exact", DiffusersAsDiT(exact, model)),
                      ("diffusers stock", DiffusersAsDiT(stock, model))):
        t0 = time.time()
        imgs, labs = generate(net, a.n, sampler=a.sampler, steps=a.steps, cfg_scale=a.cfg, seed=0, batch_size=500)
        m = digits_metric(imgs, labs)
        print(f"{name:<16} svc acc {100 * svc_accuracy(imgs, labs):5.1f}% | {format_digits_metric(m)} "
              f"[{time.time() - t0:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
