"""Where a run's numbers go: one small interface, several backends (``--log``).

The loop opens the sinks once (:func:`open_sinks`) and then reports three kinds of event, not
knowing which backends are on:

* ``log(rec)``: one ``metrics.jsonl`` record (every ``--log-every`` steps);
* ``evaluation(step, metric)``: one ``eval.jsonl`` record (the built-in data sets' metric);
* ``grid(step, path)``: a preview grid PNG that was just written.

``metrics.jsonl`` (:class:`JsonlSink`) is always on. ``--log tensorboard`` adds
:class:`TensorBoardSink` (``RUN_DIR/tensorboard/``, through ``torch.utils.tensorboard``; extra
``dits[tb]``) and ``--log wandb`` adds :class:`WandbSink` (a Weights & Biases run whose id is kept
in ``RUN_DIR/wandb_run.json``, so ``--resume`` continues it; extra ``dits[wandb]``;
``WANDB_MODE=offline`` works without an account). Only rank 0 opens any of them.

Scalars have stable names: ``train/<key>`` for every number of a ``metrics.jsonl`` record
(``train/loss``, ``train/mse``, ``train/vb``, ``train/grad_norm``, ``train/lr``,
``train/steps_per_s``), and ``eval/...`` for the metric (:func:`eval_scalars`).
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path

from dits.config import log_backends
from dits.errors import UserError, first_line

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"              # what wandb.init(dir=RUN_DIR) creates
WANDB_RUN = "wandb_run.json"     # {"id": ..., "project": ...}: what --resume continues

# backend -> (module to import, the extra that installs it)
REQUIRES = {"tensorboard": ("tensorboard", "tb"), "wandb": ("wandb", "wandb")}

# eval.jsonl keys with a name of their own; other numbers become eval/<key>
EVAL_NAMES = {"accuracy": "eval/acc", "svc_accuracy": "eval/svc_acc", "fd": "eval/fd",
              "heldout_mse": "eval/heldout_loss", "loss_gap": "eval/loss_gap"}
EVAL_SKIP = ("n",)


class Sink:
    """What every backend implements (each method a no-op here). Rank 0 only."""

    def log(self, rec: dict) -> None:
        """One training log record: ``{"step", "loss", "mse", "vb", "grad_norm", "lr", ...}``."""

    def evaluation(self, step: int, metric: dict) -> None:
        """The evaluation at ``step`` (the keys of an ``eval.jsonl`` line)."""

    def grid(self, step: int, path: Path) -> None:
        """A sample grid written at ``step``."""

    def close(self) -> None:
        """Flush and finish (called once, also when the run stops on an error or a signal)."""


class Sinks(Sink):
    """Several sinks behind one: the object the loop holds."""

    def __init__(self, sinks=()):
        self.sinks = list(sinks)

    def log(self, rec):
        for s in self.sinks:
            s.log(rec)

    def evaluation(self, step, metric):
        for s in self.sinks:
            s.evaluation(step, metric)

    def grid(self, step, path):
        for s in self.sinks:
            s.grid(step, Path(path))

    def preview(self, step: int, result: dict) -> None:
        """What ``dits.train.outputs.preview`` returned: its grid and, if any, its metric."""
        if result.get("samples"):
            self.grid(step, result["samples"])
        if result.get("digits_metric"):
            self.evaluation(step, result["digits_metric"])

    def close(self):
        errors = []
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:  # one backend failing to flush must not stop the others
                errors.append(e)
        self.sinks = []
        if errors:
            raise errors[0]


# ---------------------------------------------------------------------------- names
def train_scalars(rec: dict) -> dict[str, float]:
    """``train/<key>`` for every finite number of a metrics record (``step`` is the x axis)."""
    return {f"train/{k}": float(v) for k, v in rec.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_scalars(metric: dict) -> dict[str, float]:
    """The evaluation's numbers under stable names: ``eval/acc``, ``eval/svc_acc``, ``eval/fd``,
    ``eval/fd_heldout_ratio`` (held-out FD / its real-data level), ``eval/heldout_loss``,
    ``eval/loss_gap``, and ``eval/<key>`` for the other numbers (lists and counts are left out)."""
    out = {}
    for k, v in metric.items():
        if k in EVAL_SKIP or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        out[EVAL_NAMES.get(k, f"eval/{k}")] = float(v)
    held, floor = metric.get("fd_heldout"), metric.get("fd_heldout_floor")
    if isinstance(held, (int, float)) and isinstance(floor, (int, float)) and floor > 0:
        out["eval/fd_heldout_ratio"] = float(held) / float(floor)
    return out


# ---------------------------------------------------------------------------- backends
class JsonlSink(Sink):
    """``metrics.jsonl``: one strict-JSON line per log step, flushed at once (always on)."""

    def __init__(self, path: Path):
        self.f = open(path, "a")

    def log(self, rec):
        self.f.write(json.dumps(rec, allow_nan=False) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def _grid_array(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class TensorBoardSink(Sink):
    """Event files in ``RUN_DIR/tensorboard``. On resume the same directory is used and events
    after the resumed checkpoint's step (written before a crash, about to be written again) are
    purged, so each curve continues as one line."""

    def __init__(self, out: Path, config_text: str, start: int):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=start + 1 if start > 0 else None,
                               flush_secs=30)
        # markdown: an indented block keeps the YAML's layout
        self.w.add_text("config", "".join(f"    {line}\n" for line in config_text.splitlines()), global_step=start)

    def _scalars(self, step, values):
        for name, v in values.items():
            self.w.add_scalar(name, v, global_step=step)

    def log(self, rec):
        self._scalars(rec["step"], train_scalars(rec))

    def evaluation(self, step, metric):
        self._scalars(step, eval_scalars(metric))
        self.w.flush()

    def grid(self, step, path):
        self.w.add_image("samples", _grid_array(path), global_step=step, dataformats="HWC")
        self.w.flush()

    def close(self):
        self.w.close()


class WandbSink(Sink):
    """A Weights & Biases run, its files under ``RUN_DIR/wandb``. The run id is kept in
    ``RUN_DIR/wandb_run.json``, so ``--resume`` logs into the same run. Project:
    ``$WANDB_PROJECT``, else ``dits``; the run's name is the run directory's. Offline
    (``WANDB_MODE=offline``) the run stays on disk for ``wandb sync``."""

    def __init__(self, out: Path, config: dict):
        import os

        import wandb

        from dits.fileio import write_json_atomic

        saved = out / WANDB_RUN
        meta = json.loads(saved.read_text()) if saved.is_file() else {}
        new = not meta.get("id")
        if new:
            meta = {"id": secrets.token_hex(4), "project": os.environ.get("WANDB_PROJECT") or "dits"}
        try:
            self.run = wandb.init(project=meta.get("project"), id=meta["id"], resume="allow", name=out.name,
                                  dir=str(out), settings=wandb.Settings(console="off", quiet=True))
        except Exception as e:  # not logged in, a bad project name, ...
            raise UserError(f"--log wandb: W&B did not start ({first_line(e, 200)}); run `wandb login`, "
                            "or set WANDB_MODE=offline") from None
        if new:
            write_json_atomic(saved, meta)
        self.run.config.update(config, allow_val_change=True)  # a resumed run may change lr, steps, ...

    def _log(self, step, values):
        if values:
            self.run.log(values, step=step)

    def log(self, rec):
        self._log(rec["step"], train_scalars(rec))

    def evaluation(self, step, metric):
        self._log(step, eval_scalars(metric))

    def grid(self, step, path):
        import wandb
        self._log(step, {"samples": wandb.Image(str(path))})

    def close(self):
        self.run.finish()


# ---------------------------------------------------------------------------- opening
def require_backends(log) -> tuple[str, ...]:
    """The backends ``log`` names, after checking each one's package imports: else one line
    naming the extra to install. Called before any work, so a missing package costs nothing."""
    backends = log_backends(log)
    missing, broken = [], []
    for name in backends:
        module, _ = REQUIRES[name]
        try:
            __import__(module)
            if name == "tensorboard":
                import torch.utils.tensorboard  # noqa: F401
        except ImportError as e:
            (missing if e.name in (module, None) or e.name.startswith(module + ".") else broken).append((name, e))
    if missing or broken:
        names = [n for n, _ in missing + broken]
        extras = ",".join(REQUIRES[n][1] for n in names)
        why = f" ({first_line(broken[0][1], 100)})" if broken else ""
        raise UserError(f"--log {','.join(names)} needs the {' and '.join(REQUIRES[n][0] for n in names)} "
                        f"package{'s' if len(names) > 1 else ''}{why}: pip install 'dits[{extras}]'")
    return backends


def open_sinks(log, out: Path, config: dict, start: int, main: bool = True) -> Sinks:
    """The run's sinks: ``metrics.jsonl`` plus the ``--log`` backends; none off rank 0."""
    if not main:
        return Sinks()
    from dits.train.outputs import to_yaml

    sinks = Sinks([JsonlSink(out / "metrics.jsonl")])
    try:
        for name in require_backends(log):
            if name == "tensorboard":
                sinks.sinks.append(TensorBoardSink(out, to_yaml(config), start))
            elif name == "wandb":
                sinks.sinks.append(WandbSink(out, config))
    except BaseException:
        sinks.close()
        raise
    return sinks


def clear_sink_files(out: Path) -> None:
    """--overwrite: the backends' files of the run being replaced."""
    import shutil

    for d in (TENSORBOARD_DIR, WANDB_DIR):
        shutil.rmtree(out / d, ignore_errors=True)
    (out / WANDB_RUN).unlink(missing_ok=True)
