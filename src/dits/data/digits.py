"""The built-in dataset: scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes).

Shipped inside scikit-learn, so it needs no download. Pixel values 0..16 map to [-1, 1].
"""
from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SIZE = 8


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 8 x 8 in 0..255, labels int64 N): the real digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    return images, d.target.astype(np.int64)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 N x 1 x 8 x 8 in [-1, 1], y int64 N)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return x, torch.from_numpy(d.target.astype(np.int64))
