"""The testbed's metric: accuracy and Fréchet distance of ``glyphs`` samples (16x16 letters).

The same yardstick as the digits metric (:mod:`dits.evaluate.digits`), built from the testbed's
own splits so that nothing a model trained on is used to judge it:

* a one-hidden-layer ReLU MLP (256 -> ``HIDDEN`` -> 10) is fitted on ``FIT_IMAGES`` images of the
  *training* split; its accuracy on the whole held-out split is stored with it;
* ``accuracy``: the fraction of samples it puts in the requested class;
* ``fd_heldout``: the Fréchet distance between the samples and the 10,000 *held-out* images in its
  hidden-layer space; ``fd_heldout_floor``: the same for n training images (of those the classifier
  was not fitted on) drawn with the samples' class mix (mean over ``FLOOR_REPEATS`` draws), the real-data level: a model that draws fresh
  images as the data does scores ``fd_heldout / fd_heldout_floor`` near 1;
* ``fd`` / ``fd_floor``: the same against the training split's statistics (held-out draws as the floor).

The classifier is cached as plain arrays under :func:`dits.evaluate.cache.cache_dir`, keyed by
``RECIPE`` and the data's ``VERSION``.
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np

from dits.errors import UserError
from dits.evaluate.cache import cache_dir
from dits.evaluate.digits import DigitsClassifier, _fd, _load, _save, fit_mlp, unit_inputs

HIDDEN = 128
ALPHA = 1e-3
MAX_ITER = 40
FIT_IMAGES = 20_000
FLOOR_REPEATS = 5


def _recipe() -> str:
    from dits.data.glyphs import VERSION
    return f"glyphs-mlp-v1:{VERSION}:hidden{HIDDEN}-relu:alpha{ALPHA}:adam:iter{MAX_ITER}:fit{FIT_IMAGES}"


def to_inputs(images) -> np.ndarray:
    """uint8 N x 16 x 16 (or N x 16 x 16 x 1), 0..255 -> float64 N x 256 in [0, 1]."""
    return unit_inputs(images, 16, "glyphs")


@lru_cache(maxsize=1)
def load_classifier() -> DigitsClassifier:
    """The fitted MLP: from the cache file, else fitted on the training split (and cached)."""
    from dits.data.glyphs import glyph_arrays

    path = cache_dir() / "glyphs_classifier.npz"
    clf = _load(path, _recipe())
    if clf is None:
        images, labels = glyph_arrays("train")
        held_x, held_y = glyph_arrays("heldout")
        clf = DigitsClassifier(*fit_mlp(to_inputs(images[:FIT_IMAGES]), labels[:FIT_IMAGES], HIDDEN, ALPHA,
                                        MAX_ITER), 0.0, FIT_IMAGES, len(held_y))
        clf.heldout_accuracy = float((clf.predict(to_inputs(held_x)) == held_y).mean())
        try:
            _save(clf, path, _recipe())
        except (OSError, UserError) as e:
            warnings.warn(f"could not cache the glyphs classifier at {path}: {e}", stacklevel=2)
    return clf


@lru_cache(maxsize=2)
def _split_features(split: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(features, labels, (mean, cov)) of a split; of the training split only the 40,000 images
    the classifier was not fitted on (fitted-on images sit apart in its feature space)."""
    from dits.data.glyphs import glyph_arrays

    images, labels = glyph_arrays(split)
    if split == "train":
        images, labels = images[FIT_IMAGES:], labels[FIT_IMAGES:]
    f = load_classifier().features(to_inputs(images))
    return f, labels, (f.mean(axis=0), np.cov(f, rowvar=False))


def _floor(source: str, against: str, n: int, counts: np.ndarray | None, seed: int) -> float:
    feats, labels, _ = _split_features(source)
    ref = _split_features(against)[2]
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    values = []
    for _ in range(FLOOR_REPEATS):
        if counts is None:
            idx = rng.integers(0, len(feats), n)
        else:
            idx = np.concatenate([rng.choice(by_class[c], k, replace=False) for c, k in enumerate(counts) if k])
        values.append(_fd(feats[idx], ref))
    return float(np.mean(values))


def glyphs_metric(images, labels=None, seed: int = 0) -> dict:
    """Score ``glyphs`` samples (uint8 N x 16 x 16, 0..255; ``labels`` the requested classes or None).

    Returns the digits metric's keys: ``n``, ``accuracy``, ``fd``, ``fd_floor``, ``fd_heldout``,
    ``fd_heldout_floor``, ``predicted_counts``, ``heldout_accuracy`` (of the classifier itself)."""
    x = to_inputs(images)
    n = len(x)
    if n < 2:
        raise UserError(f"glyphs_metric needs at least 2 images, got {n}")
    y = None
    if labels is not None:
        y = np.asarray(labels)
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and (y.min() < 0 or y.max() > 9)):
            raise UserError(f"labels must be {n} integers 0..9 (one per image), got {y.dtype} {y.shape}")
    clf = load_classifier()
    feats = clf.features(x)
    pred = clf.predict(x)
    counts = np.bincount(y, minlength=10) if y is not None else None
    return {
        "n": n,
        "accuracy": float((pred == y).mean()) if y is not None else None,
        "fd": _fd(feats, _split_features("train")[2]),
        "fd_floor": _floor("heldout", "train", n, counts, seed),
        "fd_heldout": _fd(feats, _split_features("heldout")[2]),
        "fd_heldout_floor": _floor("train", "heldout", n, counts, seed + 1),
        "predicted_counts": np.bincount(pred, minlength=10).tolist(),
        "heldout_accuracy": clf.heldout_accuracy,
    }
