"""Which periodic checkpoints a run keeps (``--keep-last K``, ``--keep-every M``)."""
from __future__ import annotations

from pathlib import Path

from dits.checkpoint import run_checkpoints


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Delete the numbered checkpoints that are neither among the ``keep_last`` newest nor a
    multiple of ``keep_every``; returns what was deleted. ``keep_last`` 0 keeps everything.

    Call it only after the newest checkpoint was written: ``save_checkpoint`` fsyncs the
    file and its directory before renaming, so the successor is durable before anything
    older goes."""
    if keep_last <= 0:
        return []
    files = run_checkpoints(run_dir)
    keep = set(files[-keep_last:])
    if keep_every > 0:
        keep |= {p for p in files if int(p.stem) % keep_every == 0}
    gone = [p for p in files if p not in keep]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone
