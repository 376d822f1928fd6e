"""Run a study: one ordinary `dits train` process per cell, resumable, `--jobs` at a time.

A study directory holds ``study.json`` (the manifest: kind, budget, cells), ``runs/<cell>/``
(plain run directories) and ``logs/<cell>.log``. A cell whose process fails gets
``logs/<cell>.failed`` (its last error line); the others go on. Rerunning the same command
skips finished cells and resumes unfinished ones from their latest checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from dits.checkpoint import latest_checkpoint
from dits.errors import UserError
from dits.fileio import write_json_atomic, write_text_atomic
from dits.study.grid import BATCH_SIZE, DEFAULT_DATA, Cell, build_grid, train_command

MANIFEST = "study.json"
POLL_S, STATUS_EVERY_S = 1.0, 60.0
STOP_WAIT_S = 300.0  # how long a stopped runner waits for its cells to write their checkpoints


# ------------------------------------------------------------------ the study directory
def run_dir(out: Path, cell: Cell | str) -> Path:
    return Path(out) / "runs" / (cell if isinstance(cell, str) else cell.name)


def read_manifest(out: Path) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not a study manifest (bad JSON); use another --out") from None


def manifest_data(m: dict | None) -> str | None:
    """The data set of a manifest (None without one; digits for manifests from before ``--data``)."""
    return None if m is None else m.get("data", "digits")


def prepare_out(out: Path, kind: str, budget: str, cells: list[Cell], data: str | None = None) -> None:
    """Check that ``out`` is empty of other studies' cells and no other runner holds it, then write
    the manifest."""
    out = Path(out)
    check_no_runner(out)
    data = data or (cells[0].data if cells else DEFAULT_DATA)
    m = read_manifest(out)
    if m is not None and (m.get("kind"), m.get("budget"), manifest_data(m)) != (kind, budget, data):
        raise UserError(f"--out {out} holds a {m.get('kind')} study (budget {m.get('budget')}, data "
                        f"{manifest_data(m)}); give another --out for the {kind} study (budget {budget}, data {data})")
    if m is None and (out / "runs").is_dir() and any((out / "runs").iterdir()):
        raise UserError(f"--out {out} holds runs that no study manifest describes; give an empty or new --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    machines = list((m or {}).get("machines", []))
    if this_machine() not in machines:  # a study resumed elsewhere was measured on both
        machines.append(this_machine())
    write_json_atomic(out / MANIFEST, {"kind": kind, "budget": budget, "data": data, "cells": [c.name for c in cells],
                                       "machines": machines})


def this_machine() -> str:
    """What the study's cells run on (they train on CUDA where there is one): device and torch."""
    import torch

    from dits.plan import device_name

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return f"{device_name(dev)}, torch {torch.__version__}"


def machines(out: Path) -> list[str]:
    """The machines a study directory's cells were run on (empty for manifests from before they were recorded)."""
    return list((read_manifest(Path(out)) or {}).get("machines", []))


def cell_state(out: Path, cell: Cell) -> str:
    """'done' (trained all its steps), 'partial' (has a checkpoint) or 'new'."""
    d = run_dir(out, cell)
    ckpt = latest_checkpoint(d)
    if ckpt is None:
        return "new"
    return "done" if int(ckpt.stem) >= cell.steps and (d / "summary.json").is_file() else "partial"


def command_for(out: Path, cell: Cell, python: str | None = None) -> list[str]:
    argv = train_command(cell, str(run_dir(out, cell)), python)
    state = cell_state(out, cell)
    if state == "partial":
        argv += ["--resume", str(run_dir(out, cell))]
    elif state == "new" and run_dir(out, cell).is_dir() and any(run_dir(out, cell).iterdir()):
        # a cell stopped before its first checkpoint: nothing to resume, and dits train refuses
        # to start over a run dir without --overwrite (which removes only a run's own files)
        argv += ["--overwrite"]
    return argv


# ------------------------------------------------------------------ cost and progress
def estimated_seconds(cell: Cell) -> float:
    """A prior for the ETA: one core's seconds for the cell, from the rate measured on an
    idle core (about 28 Gflop/s forward+backward at these sizes, plus ~12 ms of Python per
    step; `docs/scaling.md`). The runner corrects it by the observed/estimated ratio."""
    rate = 28.0
    step = 0.012 + cell.gflops * 3 * BATCH_SIZE / rate
    evals = cell.steps // cell.eval_every * (2.0 + cell.eval_samples * 40 * cell.gflops / rate)
    return 5.0 + cell.steps * step + evals


def current_step(out: Path, cell: Cell) -> int:
    """Latest logged step of a running cell, from its own metrics.jsonl."""
    path = run_dir(out, cell) / "metrics.jsonl"
    try:
        lines = path.read_text().strip().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def last_eval_line(out: Path, cell: Cell) -> str:
    path = run_dir(out, cell) / "eval.jsonl"
    try:
        r = json.loads(path.read_text().strip().splitlines()[-1])
        return f"FD {r['fd']:.3f}, held-out {r['fd_heldout'] / r['fd_heldout_floor']:.2f}x, acc {r['accuracy']:.1%}"
    except (OSError, ValueError, KeyError, IndexError, TypeError, ZeroDivisionError):
        return "no evaluation yet"


def _fmt_s(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def last_error_line(log: Path, since: int = 0) -> str:
    """The last line mentioning an error (else the last line) written at or after byte
    ``since``: a cell's log collects every attempt, and only this attempt's error counts."""
    try:
        with open(log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errs = [ln for ln in lines if "error" in ln.lower()]
    return (errs or lines or ["no output"])[-1][:300]


# ------------------------------------------------------------------ running
def check_jobs(jobs: int) -> int:
    cores = os.cpu_count() or 1
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if jobs > cores:
        raise UserError(f"--jobs {jobs} is more than this machine's {cores} CPU core(s); use --jobs {cores} or fewer")
    return jobs


def run_cells(kind: str, budget: str, out: str | Path, jobs: int = 1, python: str | None = None,
              log=print, data: str = DEFAULT_DATA) -> dict:
    """Train every unfinished cell of the study; returns {cell name: 'done' | 'failed: ...'}."""
    check_jobs(jobs)
    out = Path(out)
    cells = build_grid(kind, budget, data)
    prepare_out(out, kind, budget, cells, data)
    return train_cells(cells, out, jobs, python, log, f"study {kind} ({budget}, data {data})")


def train_cells(cells: list, out: str | Path, jobs: int = 1, python: str | None = None, log=print,
                title: str = "study") -> dict:
    """The runner proper, for any cells (``name``, ``label``, ``steps``, ``gflops``, ``eval_every``,
    ``eval_samples``, ``train_args(run_dir)``) in a prepared ``out``: finished ones are skipped,
    partial ones resumed, ``jobs`` processes at a time; {cell name: 'done' | 'failed: ...'}."""
    check_jobs(jobs)
    out = Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with _runner_lock(out):
        return _train_cells(cells, out, jobs, python, log, title)


LOCK = "runner.pid"


@contextlib.contextmanager
def _runner_lock(out: Path):
    """One runner per study directory: a second one would resume the same runs beside the first, and
    each trainer's resume rewrites the logs the other is appending to. ``OUT/runner.pid`` holds the
    running one's pid; a stale file (that process is gone) is taken over."""
    check_no_runner(out)
    path = out / LOCK
    write_text_atomic(path, f"{os.getpid()}\n")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def check_no_runner(out: Path) -> None:
    """One line, before anything is written, when another live runner holds ``out``."""
    pid = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((Path(out) / LOCK).read_text().split()[0])
    if pid is not None and pid != os.getpid() and _alive(pid):
        raise UserError(f"another runner (pid {pid}) is training {out}; wait for it, or stop it "
                        f"(kill {pid}: its cells checkpoint) and rerun")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _train_cells(cells: list, out: Path, jobs: int, python: str | None, log, title: str) -> dict:
    threads = max(1, (os.cpu_count() or 1) // jobs)   # jobs x threads <= cores
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    results = {c.name: "done" for c in cells if cell_state(out, c) == "done"}
    todo = [c for c in cells if c.name not in results]
    def skip_done(c: Cell) -> None:
        (out / "logs" / f"{c.name}.failed").unlink(missing_ok=True)  # an earlier attempt's
        results[c.name] = "done"
        log(f"[{c.name}] already done, skipped ({last_eval_line(out, c)})")

    for c in cells:
        if c.name in results:
            skip_done(c)
    est = {c.name: estimated_seconds(c) for c in todo}
    log(f"{title}: {len(cells)} cells, {len(todo)} to train, {jobs} job(s) x {threads} thread(s); "
        f"first estimate {_fmt_s(sum(est.values()) / jobs)}")
    running: dict[str, tuple[subprocess.Popen, Cell, float, object, int]] = {}  # proc, cell, start, log, log offset
    t0, last_status, spent_est, spent_real = time.time(), time.time(), 0.0, 0.0
    # One job: the grid's order (smallest first, results early). Several: longest first, so that the
    # largest cell does not start last and run on alone while the other cores idle (a schedule
    # that finishes within a longest cell's time of the ideal total / jobs).
    queue = list(todo) if jobs == 1 else sorted(todo, key=lambda c: -est[c.name])
    previous = _sigterm_raises()
    try:
        while queue or running:
            while queue and len(running) < jobs:
                cell = queue.pop(0)
                state = cell_state(out, cell)
                if state == "done":  # finished meanwhile (another runner, a copied run dir)
                    skip_done(cell)
                    continue
                logf = open(out / "logs" / f"{cell.name}.log", "a")
                logf.seek(0, os.SEEK_END)
                proc = subprocess.Popen(command_for(out, cell, python), stdout=logf, stderr=subprocess.STDOUT,
                                        env=env)
                running[cell.name] = (proc, cell, time.time(), logf, logf.tell())
                log(f"[{cell.name}] {'resuming' if state == 'partial' else 'started'}: {cell.label}, "
                    f"{getattr(cell, 'shape_note', f'{cell.tokens} tokens')}, {cell.gflops * 1e3:.3g} Mflops, {cell.steps} steps")
            time.sleep(POLL_S)
            for name in [n for n, (p, *_rest) in running.items() if p.poll() is not None]:
                proc, cell, started, logf, log_start = running.pop(name)
                logf.close()
                took = time.time() - started
                spent_est, spent_real = spent_est + est[name], spent_real + took
                marker = out / "logs" / f"{name}.failed"
                finished = len(cells) - len(queue) - len(running)
                if proc.returncode == 0 and cell_state(out, cell) == "done":
                    marker.unlink(missing_ok=True)
                    results[name] = "done"
                    log(f"[{finished}/{len(cells)}] {cell.label} done in {_fmt_s(took)}: {last_eval_line(out, cell)}"
                        f"; ETA {_eta(queue, running, est, spent_est, spent_real, jobs, out)}")
                else:
                    why = last_error_line(out / "logs" / f"{name}.log", log_start)
                    write_text_atomic(marker, f"exit code {proc.returncode}: {why}\n")
                    results[name] = f"failed: {why}"
                    log(f"[{finished}/{len(cells)}] {cell.label} FAILED (exit {proc.returncode}): {why}; "
                        f"the study goes on (log: {out / 'logs' / (name + '.log')})")
            if running and time.time() - last_status >= STATUS_EVERY_S:
                last_status = time.time()
                now = ", ".join(f"{c.label} {current_step(out, c)}/{c.steps}" for _, c, *_ in running.values())
                log(f"  {_fmt_s(time.time() - t0)} elapsed; running {now}; "
                    f"ETA {_eta(queue, running, est, spent_est, spent_real, jobs, out)}")
    except (KeyboardInterrupt, Stopped) as e:
        # Ctrl-C reached the cells too (one process group); `kill` of the runner did not: pass it on,
        # and wait while they write their checkpoints, so that rerunning the command resumes them.
        for proc, *_ in running.values():
            proc.terminate()
        for name, (proc, *_rest) in running.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_WAIT_S)
        log(f"stopped ({'SIGTERM' if isinstance(e, Stopped) else 'interrupted'}): {len(running)} running cell(s) "
            f"told to checkpoint; rerun the same command to resume")
        if isinstance(e, Stopped):
            raise SystemExit(128 + e.signum) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return results


class Stopped(Exception):
    """The runner was sent SIGTERM (``kill``, a scheduler's preemption)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def _sigterm_raises():
    """Make SIGTERM raise :class:`Stopped` in the runner; returns the handler it replaced (None off
    the main thread, where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_stopped)


def _eta(queue, running, est, spent_est, spent_real, jobs, out=None) -> str:
    """Remaining estimated seconds, scaled by how far off the estimates have been so far
    (finished cells, and the running ones by the fraction of steps they logged)."""
    left, real, done_est = sum(est[c.name] for c in queue), spent_real, spent_est
    for _, cell, started, *_ in running.values():
        frac = current_step(out, cell) / cell.steps if out is not None else 0.0
        left += est[cell.name] * (1 - frac)
        if frac > 0:
            real, done_est = real + time.time() - started, done_est + est[cell.name] * frac
    ratio = real / done_est if done_est > 0 else 1.0
    return _fmt_s(left * ratio / jobs)


def print_commands(kind: str, budget: str, out: str | Path, data: str = DEFAULT_DATA) -> list[str]:
    """One plain `dits train` line per cell (submit them anywhere, then --report-only)."""
    from dits.study.grid import shell_line

    out = Path(out)
    return [shell_line(["dits", *c.train_args(str(run_dir(out, c)))]) for c in build_grid(kind, budget, data)]
