"""The built-in dataset: scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes).

Shipped inside scikit-learn, so it needs no download. Pixel values 0..16 map to [-1, 1].
Splits (:func:`split_indices`): a fixed 80 % ``train`` / 20 % ``heldout`` permutation (seed 0),
the same split the digits metric's classifier is fitted and tested on.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SIZE = 8
HELDOUT_FRACTION = 0.2


@lru_cache(maxsize=1)
def _load():
    from sklearn.datasets import load_digits  # lazy: sklearn is slow to import

    return load_digits()


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 8 x 8 in 0..255, labels int64 N): the real digits."""
    d = _load()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    return images, d.target.astype(np.int64)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 N x 1 x 8 x 8 in [-1, 1], y int64 N): all 1,797 digits."""
    d = _load()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return x, torch.from_numpy(d.target.astype(np.int64))


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train, heldout) index split of the 1,797 digits: 80 % / 20 %."""
    n = len(_load().target)
    perm = np.random.default_rng(0).permutation(n)  # PCG64 streams are stable across numpy
    n_test = int(round(n * HELDOUT_FRACTION))
    return perm[n_test:], perm[:n_test]


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of the ``train`` or ``heldout`` split, as :func:`load_digits_tensors`."""
    x, y = load_digits_tensors()
    idx = torch.from_numpy(split_indices()[0 if split == "train" else 1])
    return x[idx], y[idx]
