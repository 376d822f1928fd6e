"""What the loop does when things go wrong: a non-finite loss or gradient, and preemption.

Both end in a decision every process must share (under torchrun one rank alone must never
stop or skip), so :func:`agree` folds them into one small all-reduce per step, and only when
there is more than one process.
"""
from __future__ import annotations

import math
import os
import signal

import torch
import torch.distributed as dist

from dits.errors import UserError


class NonFiniteGuard:
    """Checks a step's loss and gradient norm before the optimiser may use them.

    ``stop``: the run ends with one line and the weights (and the last checkpoint) stay as
    they were before this step. ``skip``: the update is dropped and counted. Under fp16 an
    infinite gradient norm is the grad scaler's business (it skips that step and lowers its
    scale), so only the loss is checked there."""

    def __init__(self, mode: str, fp16: bool):
        self.mode, self.fp16, self.skipped = mode, fp16, 0

    def bad(self, loss: torch.Tensor, gnorm: torch.Tensor) -> torch.Tensor:
        """1.0 when this step is non-finite, else 0.0 (a device tensor: no host sync here)."""
        ok = torch.isfinite(loss.detach().float())
        if not self.fp16:
            ok = ok & torch.isfinite(gnorm.detach().float())
        return (~ok).float().reshape(())

    def describe(self, loss: float, gnorm: float) -> str:
        if not math.isfinite(loss):
            return f"loss is {loss}"
        return f"gradient norm is {gnorm}"

    def stop(self, step: int, cfg, loss: float, gnorm: float, last_ckpt) -> UserError:
        hint = ("lower --lr (now {:g})".format(cfg.lr) +
                (", set --grad-clip 1.0" if not cfg.grad_clip else "") +
                ", or pass --on-nonfinite skip")
        kept = f"; last good checkpoint {last_ckpt}" if last_ckpt else "; no checkpoint was written"
        return UserError(f"training diverged at step {step + 1}: {self.describe(loss, gnorm)}; {hint}{kept}")


class Preemption:
    """SIGTERM/SIGINT (what SLURM and Kubernetes send) asks the loop to stop after the current
    step and checkpoint; a second signal ends the process at once (the default action)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._old.clear()
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        for s in self.SIGNALS:  # the next one is not caught
            signal.signal(s, signal.SIG_DFL)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"

    def requested(self) -> torch.Tensor:
        return torch.tensor(float(self.signum is not None))


def agree(ctx, *flags: torch.Tensor) -> list[bool]:
    """The flags of all processes, or-ed: one all-reduce (MAX) when world > 1, one host sync."""
    v = torch.stack([f.to(ctx.device).float().reshape(()) for f in flags])
    if ctx.world > 1:
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return [bool(x) for x in v.tolist()]


def injected_fault():
    """Test hook: ``DITS_FAULT_AT_STEP=k`` sends ``DITS_FAULT_SIGNAL`` (default SIGKILL, like a
    crash or an OOM kill; SIGTERM like a preemption) right after step k, to this process or,
    with ``DITS_FAULT_GROUP=1``, to its whole process group (as SLURM does, loader workers too)."""
    at = int(os.environ.get("DITS_FAULT_AT_STEP", "-1"))
    sig = getattr(signal, os.environ.get("DITS_FAULT_SIGNAL", "SIGKILL"))
    group = os.environ.get("DITS_FAULT_GROUP") == "1"

    def maybe(step: int) -> None:
        if step == at:
            os.killpg(os.getpgid(0), sig) if group else os.kill(os.getpid(), sig)
    return maybe
