"""The testbed pilot (docs/scaling.md, "Choosing the testbed"): a few study cells x 2 seeds on a
candidate built-in data set, to measure its regime before the grid is run.

    python benchmarks/testbed_pilot.py --data glyphs --out /tmp/pilot --steps 1500 --jobs 2

Per cell and seed it reports, at the last evaluation: the held-out FD ratio (samples vs the
data's own level), class accuracy, the held-out denoising loss and its train/held-out gap, so
that a data set is chosen by its regime (not saturated, not memorised), not by the verdicts.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dits.study.grid import RECIPE, SIZES

CELLS = {"digits": [("S", 4), ("B", 2), ("L", 2)], "glyphs": [("S", 8), ("B", 4), ("L", 4)]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="glyphs")
    ap.add_argument("--out", default="/tmp/pilot")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    jobs = []
    for size, patch in CELLS[a.data]:
        d, w, h = SIZES[size]
        for seed in map(int, a.seeds.split(",")):
            run = Path(a.out) / a.data / f"{size}-p{patch}-s{seed}"
            argv = [sys.executable, "-m", "dits", "train", "--preset", a.data, "--data", a.data, "--model", "DiT",
                    "--depth", str(d), "--hidden-size", str(w), "--num-heads", str(h), "--patch-size", str(patch),
                    "--steps", str(a.steps), "--ckpt-every", str(a.steps), "--sample-every", str(a.steps // 3),
                    "--eval-samples", str(a.eval_samples), *[str(x) for kv in RECIPE.items() for x in kv],
                    "--seed", str(seed), "--out", str(run), "--no-progress", "--overwrite"]
            jobs.append((f"{size}/{patch}", seed, run, argv))

    def go(job):
        label, seed, run, argv = job
        t = time.time()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return job, time.time() - t

    with ThreadPoolExecutor(a.jobs) as ex:
        done = list(ex.map(go, jobs))
    print(f"| data | cell | seed | wall s | held-out FD ratio | accuracy | held-out loss | train loss | gap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (label, seed, run, _), wall in done:
        r = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()][-1]
        print(f"| {a.data} | {label} | {seed} | {wall:.0f} | {r['fd_heldout'] / r['fd_heldout_floor']:.2f}x | "
              f"{100 * r['accuracy']:.1f} % | {r['heldout_mse']:.5f} | {r['train_mse']:.5f} | "
              f"{100 * r['loss_gap']:+.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
