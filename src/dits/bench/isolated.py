"""Each contender of `dits bench train/sample` in a process of its own.

Timed in one process, contenders share an allocator, a thread pool, caches and, after a compiled
contender ran, the compiler's state; the official loop measured 55.0 ms a step inside the old
in-process bench and 41.2 ms alone on another machine (issue 20). So the parent starts one worker
per contender (``python -m dits.bench.isolated``, the same interpreter and dits), and drives them
round by round: while one worker runs its calls, the others block on their pipe, idle. The order
rotates every round; each worker reports seconds per call with its own clock and its own memory
high-water mark. The protocol is one JSON object per line over the worker's stdin/stdout (the
worker's own prints go to stderr).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dits.errors import UserError

READY_TIMEOUT_S = 600


# ----------------------------------------------------------------------------- one contender
def build(spec: dict):
    """(function running one unit of work, info) for a contender spec (see bench.speed._contender_specs)."""
    from dits.bench import official as off
    from dits.bench.speed import Setup, dits_sample, dits_train_step

    s = Setup(**spec["setup"])
    if spec["who"] == "dits":
        s.plan = spec.get("plan") or s.plan
        if spec["kind"] == "train":
            fn, _, choice = dits_train_step(s)  # (its plan line goes into the table)
            label = f"dits ({s.precision}, {choice.plan.name})"
        else:
            fn, _, choice = dits_sample(s)
            label = f"dits generate ({s.sampler}, {s.sample_steps} steps, {choice.plan.name})"
        return fn, {"label": label, "plan": choice.plan.name, "plan_line": choice.line,
                    "compiled": choice.plan.compile is not None}
    like = s.build()
    make = off.official_train_step if spec["kind"] == "train" else off.official_sampler
    return make(s, spec["official"], spec.get("extra_paths", []), like, spec["fused"]), {}


def _worker() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                 # anything else printed (by torch, by dits) goes to stderr
    sys.stdout = sys.stderr

    def reply(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    from dits.bench.speed import CLOCKS, _sync, peak_memory

    spec = json.loads(sys.stdin.readline())
    try:
        torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
        fn, info = build(spec)
    except UserError as e:
        reply({"error": str(e)})
        return 2
    except Exception as e:  # noqa: BLE001 - reported by the parent as one line
        reply({"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"})
        return 1
    device = torch.device(spec["setup"]["device"])
    now = CLOCKS[spec.get("clock", "wall")]
    reply({"ready": True, **info})
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "exit":
            break
        n = int(msg["n"])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        first, t0 = None, now()
        for i in range(n):
            t = now()
            fn()
            _sync(device)
            if i == 0:
                first = now() - t
        reply({"seconds": (now() - t0) / max(n, 1), "first_s": first, "peak": peak_memory(device)})
    return 0


# ----------------------------------------------------------------------------- the parent
class Worker:
    def __init__(self, name: str, spec: dict, clock: str):
        import dits

        self.name = name
        env = dict(os.environ)
        src = str(Path(dits.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
        self.proc = subprocess.Popen([sys.executable, "-m", "dits.bench.isolated"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.send({**spec, "clock": clock})

    def send(self, msg: dict) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise UserError(f"benchmark contender {self.name!r} exited ({code}) without an answer; see its messages above")
        msg = json.loads(line)
        if "error" in msg:
            raise UserError(msg["error"])
        return msg

    def call(self, n: int) -> dict:
        self.send({"op": "calls", "n": n})
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "exit"})
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait()


def run_isolated(specs: dict[str, dict], rounds: int, per_round: int, warmup: int, progress: bool = True,
                 clock: str = "wall") -> list:
    """Time each contender in its own process: ``warmup`` calls each (one worker at a time), then
    ``rounds`` rounds of ``per_round`` calls, the order rotating every round."""
    from dits.bench.speed import Timing

    workers = []
    try:
        infos = {}
        def probes(spec):  # a dits contender with --plan auto may time plans while it starts
            return spec["who"] == "dits" and spec.get("plan", "auto") == "auto"
        for name, spec in specs.items():  # those alone ...
            if probes(spec):
                workers.append(Worker(name, spec, clock))
                infos[name] = workers[-1].receive()
        for name, spec in specs.items():  # ... then the others together (nothing is timed while they start)
            if not probes(spec):
                workers.append(Worker(name, spec, clock))
        timings = []
        for w in workers:
            info = infos[w.name] if w.name in infos else w.receive()
            t = Timing(info.get("label", w.name) if w.name == "dits" else w.name, compiled=bool(info.get("compiled")),
                       note=info.get("plan_line", ""))
            if info.get("plan") and w.name != "dits":
                t.name = f"dits {info['plan']}"
            timings.append(t)
        for w, t in zip(workers, timings):  # warm-up (and compile) alone too
            if warmup:
                r = w.call(warmup)
                t.first_s = r["first_s"]
        for k in range(rounds):
            order = list(range(len(workers)))
            order = order[k % len(order):] + order[:k % len(order)]
            for i in order:
                r = workers[i].call(per_round)
                timings[i].seconds.append(r["seconds"])
                timings[i].peak_bytes = max(timings[i].peak_bytes, int(r["peak"]))
            if progress:
                print(f"  round {k + 1}/{rounds}: " + ", ".join(f"{t.name} {t.seconds[-1] * 1e3:.1f} ms"
                                                              for t in timings), file=sys.stderr, flush=True)
        return timings
    finally:
        for w in workers:
            w.close()


def run_shared(specs: dict[str, dict], rounds: int, per_round: int, warmup: int, device, progress: bool = True,
               clock: str = "wall") -> list:
    """The old way, kept to check the new one: every contender in this process, interleaved."""
    from dits.bench.speed import interleave

    fns, labels, compiled = {}, {}, {}
    for name, spec in specs.items():
        fn, info = build(spec)
        label = info.get("label", name) if name == "dits" else (f"dits {info['plan']}" if info.get("plan") else name)
        fns[label], compiled[label] = fn, bool(info.get("compiled"))
    timings = interleave(fns, rounds, per_round, warmup, device, progress, clock)
    for t in timings:
        t.compiled = compiled[t.name]
    return timings


if __name__ == "__main__":
    sys.exit(_worker())
