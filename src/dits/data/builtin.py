"""The registry of built-in data sets: ``builtin(name, split) -> (x, y)``.

The trainer (``dits train --data NAME``), the study runner and the metrics ask for a built-in
data set by name, here, and nowhere else. Each set ships inside a package dits already installs
(nothing is downloaded) and is fixed by its seed:

* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits (the `make demo` job).
* ``glyphs``: 16x16 letters rendered from matplotlib's fonts under random poses and strokes,
  60,000 training images: the study testbed (:mod:`dits.data.glyphs`, docs/scaling.md).

``x`` is float32 N x C x H x W in [-1, 1], ``y`` int64 labels; ``split`` is ``"train"`` (what
``dits train`` trains on) or ``"heldout"`` (a fixed split that is never trained on: the held-out
loss and the metrics' reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dits.errors import UserError

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class BuiltinData:
    name: str
    image_size: int
    channels: int
    num_classes: int
    class_names: tuple
    about: str
    load: Callable[[str], tuple[torch.Tensor, torch.Tensor]]   # split -> (x, y)


def _digits(split):
    from dits.data.digits import digits_split
    return digits_split(split)


def _glyphs(split):
    from dits.data.glyphs import glyphs_split
    return glyphs_split(split)


BUILTINS = {
    "digits": BuiltinData("digits", 8, 1, 10, tuple("0123456789"),
                          "scikit-learn's real 8x8 handwritten digits: 1,438 train / 359 held-out", _digits),
    "glyphs": BuiltinData("glyphs", 16, 1, 10, tuple("ABCDEFGHJK"),
                          "16x16 letters in 21 fonts under random poses and strokes: 60,000 train / "
                          "10,000 held-out (the study testbed)", _glyphs),
}


def names() -> tuple[str, ...]:
    return tuple(BUILTINS)


def is_builtin(name: str | None) -> bool:
    return name in BUILTINS


def get(name: str) -> BuiltinData:
    """The registry entry of ``name``; one line listing the names when it is not one."""
    if name not in BUILTINS:
        raise UserError(f"unknown built-in data set {name!r}; built-in names: {', '.join(BUILTINS)} "
                        "(or pass an image folder)")
    return BUILTINS[name]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    return split


def builtin(name: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a built-in data set: x float32 N x C x H x W in [-1, 1], y int64 N."""
    entry = get(name)
    x, y = entry.load(check_split(split))
    return x, y
