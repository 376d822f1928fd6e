"""Finding 4 (the paper's Fig. 10): does more sampling compute make up for a smaller model?

Samples the smallest and the largest finished cell of a scaling study with DDPM at several
step counts, using ordinary `dits sample` and `dits evaluate --ref DATA` runs (DATA the study's
built-in data set); results go to ``<study>/sampling/<cell>_ddpm<K>.eval.<DATA>.json`` for the report.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from dits.errors import UserError
from dits.study.grid import build_grid, check_budget, shell_line
from dits.study.runner import (
    cell_state,
    check_jobs,
    last_error_line,
    manifest_data,
    read_manifest,
    run_dir,
)

SEED = 10_000            # the trainer's evaluation seed offset, so the draws match its evals


def plan(out: str | Path, budget: str) -> list[tuple[str, int, list[str], list[str]]]:
    """[(cell, steps, sample argv, evaluate argv)] without the program name."""
    out = Path(out)
    m = read_manifest(out)
    if m is None or m.get("kind") != "scaling" or m.get("budget") != budget:
        raise UserError(f"sampling-compute samples a scaling study's models: run `dits study scaling --budget {budget} "
                        f"--out {out}` first (--out holds {'no study' if m is None else m.get('kind') + ' ' + str(m.get('budget'))})")
    data = manifest_data(m)
    b = check_budget(budget, data)
    cells = [c for c in build_grid("scaling", budget, data) if cell_state(out, c) == "done" and not c.seed]
    if len(cells) < 2:
        raise UserError(f"sampling-compute needs at least 2 finished scaling cells in {out}; rerun the scaling study")
    n = b["eval_samples"]
    todo = []
    for role, cell in (("smallest", cells[0]), ("largest", cells[-1])):
        for k in b["sampling"][role]:
            npz = out / "sampling" / f"{cell.name}_ddpm{k}.npz"
            todo.append((cell.name, k,
                         ["sample", "--ckpt", str(run_dir(out, cell)), "--num-samples", str(n), "--sampler", "ddpm",
                          "--steps", str(k), "--seed", str(SEED), "--batch-size", "500", "--out", str(npz)],
                         ["evaluate", str(npz), "--ref", data, "--json", str(npz.with_suffix(f".eval.{data}.json"))]))
    return todo


def commands(out: str | Path, budget: str) -> list[str]:
    return [f"{shell_line(['dits', *s])} && {shell_line(['dits', *e])}" for _, _, s, e in plan(out, budget)]


def run_sampling(out: str | Path, budget: str, jobs: int = 1, log=print) -> dict:
    """Run every missing (cell, steps) measurement one after another (each uses the cores)."""
    check_jobs(jobs)
    out = Path(out)
    (out / "sampling").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    results, todo = {}, plan(out, budget)
    for i, (cell, k, sample, evaluate) in enumerate(todo, 1):
        key = f"{cell}_ddpm{k}"
        if Path(evaluate[-1]).is_file():
            log(f"[{i}/{len(todo)}] {key} already measured, skipped")
            results[key] = "done"
            continue
        t0, logp = time.time(), out / "logs" / f"{key}.log"
        with open(logp, "a") as logf:
            rc = 0
            for argv in (sample, evaluate):
                rc = subprocess.call([sys.executable, "-m", "dits", *argv], stdout=logf, stderr=subprocess.STDOUT,
                                     env=env)
                if rc:
                    break
        if rc:
            results[key] = f"failed: {last_error_line(logp)}"
            log(f"[{i}/{len(todo)}] {key} FAILED: {last_error_line(logp)}; going on")
        else:
            results[key] = "done"
            log(f"[{i}/{len(todo)}] {key} measured in {time.time() - t0:.0f}s")
    return results
