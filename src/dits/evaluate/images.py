"""Reading image sets: ADM ``.npz`` batches (streamed) and image folders.

ADM's layout: ``arr_0`` uint8 N×H×W×C (C = 3, or 1 for grey), optional ``arr_1``
int64 labels. 50,000 samples at 256 px are ~10 GB, so ``arr_0`` is read in batches
straight out of the zip member instead of being loaded whole.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from dits.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class NpzImages:
    """``arr_0`` of an ADM ``.npz``: shape, dtype and batches, without loading it all."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
        self.path = Path(path)
        self.key = key
        if not self.path.is_file():
            raise UserError(f"no such file: {self.path}")
        try:
            with zipfile.ZipFile(self.path) as z:
                names = z.namelist()
                if f"{key}.npy" not in names:
                    found = ", ".join(n[:-4] for n in names if n.endswith(".npy")) or "nothing"
                    raise UserError(f"{self.path} has no '{key}' array (found: {found}); "
                                    f"samples and references keep images in {key}")
                with z.open(f"{key}.npy") as f:
                    shape, fortran, dtype = _read_npy_header(f)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"{self.path} is not a readable .npz file ({e})") from None
        self.shape, self.fortran, self.dtype = tuple(shape), fortran, dtype
        _check_image_array(self.shape, self.dtype, f"{self.path}:{key}")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive N×H×W×C uint8 batches (grey arrays get their channel axis)."""
        if self.fortran:  # rare; cannot stream, so load once
            arr = np.load(self.path, allow_pickle=False)[self.key]
            for i in range(0, len(arr), batch_size):
                yield _with_channel(arr[i:i + batch_size])
            return
        per_image = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as z, z.open(f"{self.key}.npy") as f:
            _read_npy_header(f)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = f.read(count * per_image)
                if len(data) != count * per_image:
                    raise UserError(f"{self.path}: '{self.key}' is truncated after {start} images")
                # bytearray: a writable buffer, which torch.from_numpy wants
                arr = np.frombuffer(bytearray(data), dtype=self.dtype)
                arr = arr.reshape((count, *self.shape[1:]))
                yield _with_channel(arr)


def _read_npy_header(f):
    # np.save writes version 1.0 (2.0 for huge headers); 3.0 is only for unicode
    # field names, which image arrays never have.
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def _check_image_array(shape, dtype, where: str) -> None:
    if dtype != np.uint8:
        raise UserError(f"{where} must be uint8 images 0..255 (ADM layout), got {dtype}; "
                        "convert with np.clip(np.round(x * 255), 0, 255).astype(np.uint8)")
    ok = len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))
    if not ok or shape[0] == 0:
        raise UserError(f"{where} must be N×H×W×C images with C = 3 or 1, got shape {shape}")


def _with_channel(arr: np.ndarray) -> np.ndarray:
    return arr[..., None] if arr.ndim == 3 else arr


def load_labels(path: str | os.PathLike, n: int) -> np.ndarray | None:
    """``arr_1`` of an ADM samples file (class labels), or None if absent."""
    with np.load(path, allow_pickle=False) as z:
        if "arr_1" not in z.files:
            return None
        labels = z["arr_1"]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: arr_1 must hold {n} integer labels, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


class FolderImages:
    """All .png/.jpg/.jpeg files under a folder (recursive, sorted), as RGB uint8.

    Every image must have the same size, as in an ADM batch; resize/crop them first.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"no such folder: {self.root}")
        self.files = sorted(p for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise UserError(f"no .png/.jpg images under {self.root}")
        first = self._read(self.files[0])
        self.shape = (len(self.files), *first.shape)

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise UserError(f"cannot read image {path}: {e}") from None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.files), batch_size):
            batch = []
            for p in self.files[start:start + batch_size]:
                img = self._read(p)
                if img.shape != self.shape[1:]:
                    raise UserError(f"{p} is {img.shape[1]}×{img.shape[0]} but the first image is "
                                    f"{self.shape[2]}×{self.shape[1]}; all images must share one size")
                batch.append(img)
            yield np.stack(batch)


def open_images(src: str | os.PathLike):
    """An image folder or an ``.npz`` (``arr_0``), each with ``len``, ``shape``, ``batches``."""
    p = Path(src)
    if p.is_dir():
        return FolderImages(p)
    if p.suffix.lower() == ".npz" or p.is_file():
        return NpzImages(p)
    raise UserError(f"no such file or folder: {p} (give an image folder or an .npz with arr_0)")
