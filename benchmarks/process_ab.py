"""Same-run A/Bs that `dits bench` cannot express, each variant timed in worker processes of its own
(`dits.bench.isolated`), alternated, medians:

  env    the dits step under environment variants (an allocator or OpenMP setting read at start-up):
             python benchmarks/process_ab.py env --shape s2 --rounds 6 --steps 4 \
                 base= thp=THP_MEM_ALLOC_ENABLE=1 bind=OMP_PROC_BIND=true,OMP_PLACES=cores
  fresh  dits against the official step in K fresh processes each (process-to-process and
         hour-to-hour spread, not only round-to-round), and the first step of a round against the rest:
             python benchmarks/process_ab.py fresh --shape s2 --rounds 5 --steps 4 \
                 --official /path/to/DiT --official-path /path/to/timm-dir

Shapes: s2 (DiT-S/2, 32x32x3, batch 8, a 400,000-step run) or digits (the preset's model, batch 64,
4,000 steps). --precision bf16|fp32; --plan as `dits train --plan` (default auto: the probe or its cache).
"""
import argparse
import os
import statistics
import time

import torch

from dits.bench.isolated import Worker
from dits.bench.speed import Setup, _contender_specs
from dits.cli.bench import _setup, register


SHAPES = {"s2": ["--model", "DiT-S/2", "--image-size", "32", "--channels", "3", "--batch", "8"],  # as bench_speed.sh
          "digits": ["--preset", "digits"]}


def setup(a) -> Setup:
    """The Setup `dits bench train` builds for the same flags (its parser and its _setup: one way to say a shape)."""
    root = argparse.ArgumentParser()
    register(root.add_subparsers(dest="command"))
    return _setup(root.parse_args(["bench", "train", *SHAPES[a.shape], "--precision", a.precision]))


def timed(w: Worker, steps: int) -> tuple[float, float, float]:
    """(mean, first, mean of the rest) ms of one round of ``steps`` calls."""
    r = w.call(steps)
    first, mean = r["first_s"] * 1e3, r["seconds"] * 1e3
    return mean, first, (mean * steps - first) / max(steps - 1, 1)


def env_ab(a) -> None:
    s = setup(a)
    base, workers = dict(os.environ), {}
    for v in a.variants:
        name, _, assigns = v.partition("=")
        os.environ.clear()
        os.environ.update(base)
        os.environ.update(dict(kv.split("=", 1) for kv in assigns.split(",") if kv))
        spec = {"kind": "train", "setup": s.to_dict(), "threads": torch.get_num_threads(), "who": "dits", "plan": a.plan}
        workers[name] = Worker(name, spec, "wall")  # the worker inherits this environment
        print(f"{name}: {workers[name].receive().get('plan_line') or a.plan}", flush=True)
    os.environ.clear()
    os.environ.update(base)
    for w in workers.values():
        w.call(a.warmup)
    names, ms = list(workers), {n: [] for n in workers}
    for k in range(a.rounds):
        for n in names[k % len(names):] + names[:k % len(names)]:
            ms[n].append(timed(workers[n], a.steps)[0])
        print(f"round {k + 1}: " + ", ".join(f"{n} {ms[n][-1]:.1f} ms" for n in names), flush=True)
    for w in workers.values():
        w.close()
    ref = names[0]
    for n in names:
        paired = statistics.median(r / x for r, x in zip(ms[ref], ms[n]))
        print(f"{n}: {statistics.median(ms[n]):.1f} ms/step, {statistics.median(ms[ref]) / statistics.median(ms[n]):.3f}x "
              f"of {ref} (round-paired {paired:.3f})")


def fresh(a) -> None:
    s = setup(a)
    specs = _contender_specs("train", s, a.official, a.official_path, "auto", [a.plan])
    specs = {k: v for k, v in specs.items() if k == "dits" or ("sdpa" in k) == (a.official_attention == "sdpa")}
    res = {n: {"mean": [], "first": [], "rest": []} for n in specs}
    for k in range(a.rounds):
        for n, spec in list(specs.items())[::1 if k % 2 == 0 else -1]:
            t0 = time.time()
            w = Worker(n, spec, "wall")
            w.receive()
            w.call(a.warmup)
            for key, v in zip(("mean", "first", "rest"), timed(w, a.steps)):
                res[n][key].append(v)
            w.close()
            print(f"process {k + 1}: {n} {res[n]['mean'][-1]:.1f} ms/step (first {res[n]['first'][-1]:.0f}, "
                  f"rest {res[n]['rest'][-1]:.0f}; {time.time() - t0:.0f} s with start-up)", flush=True)
    d, o = list(specs)
    for n in specs:
        m = res[n]["mean"]
        print(f"{n}: median {statistics.median(m):.1f} ms/step ({min(m):.1f}-{max(m):.1f}); first step of a round "
              f"{statistics.median(res[n]['first']):.1f}, the rest {statistics.median(res[n]['rest']):.1f}")
    pairs = sorted(x / y for x, y in zip(res[o]["mean"], res[d]["mean"]))
    print(f"speed-up (ratio of medians): {statistics.median(res[o]['mean']) / statistics.median(res[d]['mean']):.3f}x; "
          f"process pairs {pairs[0]:.3f}-{pairs[-1]:.3f}x")


p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("what", choices=("env", "fresh"))
p.add_argument("variants", nargs="*", help="env: NAME=VAR=VALUE[,VAR=VALUE] (the first is the reference)")
p.add_argument("--shape", choices=("s2", "digits"), default="s2")
p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
p.add_argument("--plan", default="auto")
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--steps", type=int, default=4)
p.add_argument("--warmup", type=int, default=4)
p.add_argument("--official")
p.add_argument("--official-path", action="append", default=[])
p.add_argument("--official-attention", choices=("math", "sdpa"), default="math")
a = p.parse_intermixed_args()
if a.what == "env" and len(a.variants) < 2:
    p.error("env needs two variants or more, e.g. base= thp=THP_MEM_ALLOC_ENABLE=1")
if a.what == "fresh" and not a.official:
    p.error("fresh needs --official /path/to/DiT")
env_ab(a) if a.what == "env" else fresh(a)
