"""One entry point for the built-in data sets' metrics (``digits``, ``glyphs``): the trainer, the
study and ``dits evaluate --ref NAME`` ask here by the data set's name."""
from __future__ import annotations

from dits.errors import UserError


def score(name: str, images, labels=None, seed: int = 0) -> dict:
    """The metric of built-in set ``name`` on uint8 samples (N x H x W[ x 1], 0..255)."""
    if name == "digits":
        from dits.evaluate.digits import digits_metric, svc_accuracy

        m = digits_metric(images, labels, seed=seed)
        m["svc_accuracy"] = svc_accuracy(images, labels) if labels is not None else None
        return m
    if name == "glyphs":
        from dits.evaluate.glyphs import glyphs_metric

        return glyphs_metric(images, labels, seed=seed)
    raise UserError(f"no built-in metric for {name!r}; built-in metrics: digits, glyphs")


def format_metric(name: str, d: dict) -> str:
    """One line, e.g. ``glyphs n=500: acc 97.9% | FD 0.21 (...) | held-out FD 0.3 vs real 0.2 (1.5x)``."""
    from dits.evaluate.digits import format_digits_metric

    line = format_digits_metric(d)
    line = name + line[len("digits"):] if line.startswith("digits") else line
    if d.get("heldout_mse") is not None:
        line += f" | held-out loss {d['heldout_mse']:.4f}"
        if d.get("train_mse"):
            line += f" (train {d['train_mse']:.4f}, gap {100 * d['loss_gap']:+.1f}%)"
        if d.get("heldout_bpd") is not None:
            line += f", {d['heldout_bpd']:.3f} bits/dim"
    return line
