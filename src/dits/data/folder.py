"""Images in a folder, preprocessed as DiT's training does (SPEC §4).

Layout::

    root/class_a/xxx.jpg   root/class_b/yyy.png ...   -> labels 0..K-1 by sorted class name
    root/xxx.jpg root/yyy.png ...                     -> unconditional: num_classes 0, label 0

With class subfolders, files directly in ``root`` are ignored (with a warning) and images
in nested folders count for their top-level class. A captioned folder (``captioned=True``,
text runs: captions come from ``metadata.jsonl``, see :mod:`dits.data.captions`) takes every
image under ``root``, at any depth, and no labels. Hidden files and folders (starting with
".") are skipped. Recognised extensions: jpg, jpeg, png, bmp, webp (any case).

Corrupt files: when the dataset is built every image header is read (``verify=True``);
files PIL cannot open are skipped with one warning line listing how many and the first
few. A file that fails later, while decoding (e.g. a truncated JPEG), is replaced by the
next good image with a warning, so a long training run never crashes on one bad file.

Images smaller than the crop are upscaled by the bicubic resize, as in the reference
(ImageNet has such images); ``small="error"`` refuses them instead, naming the file, and
``small="skip"`` drops them.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dits.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: an (image_size, image_size[, C]) uint8 array.

    Halve the image with a box filter while its short side is at least twice the target
    (cheap, alias-free downsampling), then one bicubic resize bringing the short side to
    ``image_size``, then crop the centre square.
    """
    img = pil_image
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(folder: Path) -> list[Path]:
    """All images under ``folder``, recursively, in a deterministic (sorted) order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
    return found


def scan_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, classes) of an image folder, without opening any image."""
    root = Path(root).expanduser()
    if not root.exists():
        from dits.data.builtin import names
        raise UserError(f"data folder {root} does not exist; --data takes an image folder or a built-in name "
                        f"(built-in names: {', '.join(names())})")
    if not root.is_dir():
        raise UserError(f"data path {root} is not a folder; pass a folder of images or of class subfolders")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not classes:  # flat folder: unconditional data
        files = [Path(e.path) for e in entries if e.is_file() and _is_image(e.name)]
        if not files:
            raise UserError(f"data folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}) and no class subfolders")
        return files, [0] * len(files), []
    loose = sum(1 for e in entries if e.is_file() and _is_image(e.name))
    if loose:
        warnings.warn(f"{root}: ignoring {loose} image(s) directly in the folder (class subfolders found)",
                      stacklevel=2)
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _walk_images(root / name)
        if not found:
            raise UserError(f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            "remove it or add images (labels come from the sorted folder names)")
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def scan_captioned(root: str | os.PathLike) -> list[Path]:
    """Every image under a captioned folder, at any depth, in sorted order (no labels)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        scan_folder(root)  # the same one-line errors as a labelled folder
    files = _walk_images(root)
    if not files:
        raise UserError(f"data folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


class ImageFolderDataset(torch.utils.data.Dataset):
    """(image, label) pairs: float tensor (channels, image_size, image_size) in [-1, 1], int.

    ``flip`` mirrors each image with probability 1/2 using torch's global RNG (the
    DataLoader seeds every worker from it, so seeding torch makes epochs reproducible) or
    ``generator`` if given. ``channels`` 3 gives RGB, 1 greyscale.
    Attributes: ``classes`` (sorted class names, [] if unconditional), ``num_classes``
    (0 if unconditional), ``files``, ``labels``.
    """

    def __init__(self, root: str | os.PathLike, image_size: int, flip: bool = True, channels: int = 3,
                 small: str = "upscale", verify: bool = True, generator: torch.Generator | None = None,
                 captioned: bool = False):
        if channels not in (1, 3):
            raise UserError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
        if small not in ("upscale", "error", "skip"):
            raise UserError(f"small must be 'upscale', 'error' or 'skip', got {small!r}")
        if int(image_size) < 1:
            raise UserError(f"image size must be a positive integer, got {image_size}")
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)
        self.flip = flip
        self.channels = channels
        self.generator = generator
        if captioned:
            files = scan_captioned(self.root)
            labels, self.classes = [0] * len(files), []
        else:
            files, labels, self.classes = scan_folder(self.root)
        self.num_classes = len(self.classes)
        if verify or small != "upscale":
            files, labels = self._check_files(files, labels, small)
        self.files, self.labels = files, labels
        self._warned: set[int] = set()

    def _check_files(self, files, labels, small):
        """Read every header: drop unreadable files and handle images smaller than the crop."""
        keep_f, keep_l, bad, tiny = [], [], [], []
        for f, label in zip(files, labels):
            try:
                with Image.open(f) as im:
                    size = im.size
            except Exception:  # PIL raises several types for non-images and broken headers
                bad.append(f)
                continue
            if min(size) < self.image_size:
                if small == "error":
                    raise UserError(f"image {f} is {size[0]}x{size[1]}, smaller than the {self.image_size}px crop; "
                                    "remove it or use a smaller --image-size")
                tiny.append(f)
                if small == "skip":
                    continue
            keep_f.append(f)
            keep_l.append(label)
        if bad:
            shown = ", ".join(str(b) for b in bad[:3]) + (", ..." if len(bad) > 3 else "")
            warnings.warn(f"skipping {len(bad)} unreadable image file(s): {shown}", stacklevel=3)
        if tiny:
            action = "skipped" if small == "skip" else "upscaled"
            warnings.warn(f"{len(tiny)} image(s) smaller than {self.image_size}px are {action} "
                          f"(first: {tiny[0]})", stacklevel=3)
        if not keep_f:
            raise UserError(f"data folder {self.root} has no usable images")
        return keep_f, keep_l

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> np.ndarray:
        """The centre-cropped uint8 array of one image (H, W, C), no flip."""
        with Image.open(self.files[index]) as im:
            im = im.convert("RGB" if self.channels == 3 else "L")
        arr = center_crop_arr(im, self.image_size)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def __getitem__(self, index: int):
        for k in range(len(self.files)):
            i = (index + k) % len(self.files)
            try:
                arr = self.load(i)
                break
            except (OSError, ValueError) as e:  # truncated or corrupt data, found only on decode
                if i not in self._warned:
                    self._warned.add(i)
                    warnings.warn(f"cannot decode {self.files[i]} ({e}); using the next image instead", stacklevel=2)
        else:
            raise UserError(f"no image in {self.root} can be decoded")
        x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1.0  # copy: PIL's is read-only
        if self.flip and torch.rand(1, generator=self.generator).item() < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]
