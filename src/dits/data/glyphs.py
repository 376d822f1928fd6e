"""The study testbed: 16x16 letters rendered from the fonts matplotlib ships, under random
affine transforms and stroke widths.

Why this data set (docs/scaling.md, "the testbed"): the paper's scaling law shows only where no
model saturates. The 1,797 real 8x8 digits are memorised by a 2 M-parameter model and leave a
smaller patch nothing more to see. ``glyphs`` is the opposite regime at the same cost: 60,000
distinct training images (every one a fresh draw of font x transform x stroke), 16x16 pixels so
that patches 8 / 4 / 2 give 4 / 16 / 64 tokens, 10 classes, nothing downloaded (the fonts are
files inside matplotlib, which dits already installs), and every pixel fixed by the seed.

How an image is made:
1. *Masters*: each class letter (``CLASSES``) is rasterised once per font (``FONTS``: DejaVu
   Sans / Serif / Mono, STIX and Computer Modern, 21 faces) with FreeType, scaled so its larger
   side is ``GLYPH_SIDE`` pixels and centred on a ``CANVAS``-pixel canvas.
2. *Stroke*: the master is kept or dilated (radius 1..3 canvas pixels, a max-pool).
3. *Pose*: one random affine (rotation, shear, anisotropic scale, translation; ranges in ``POSE``)
   resamples the canvas bilinearly.
4. The canvas is box-averaged 4x4 down to 16x16 and quantised to uint8, as a real image is.

Splits: ``train`` (60,000 images, 6,000 per class) and ``heldout`` (10,000) are drawn from the same
distribution with disjoint random streams (another seed), so no held-out image is a training image
(``tests/test_testbed.py`` checks it pixel for pixel).
"""
from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from dits.errors import UserError

CLASSES = "ABCDEFGHJK"          # I is left out: in the serif-less faces it is a bare bar, like a 1
NUM_CLASSES = len(CLASSES)
IMAGE_SIZE = 16
CANVAS = 64                     # rendering resolution; 4x the image side
GLYPH_SIDE = 40                 # the master's larger side on the canvas, before the pose's scale
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
         "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
         "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
         "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
         "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf")
# The pose's ranges (uniform): rotation in degrees, shear, log of the overall scale, log of the
# aspect ratio, translation as a fraction of the half-side.
POSE = {"rotate": 15.0, "shear": 0.25, "log_scale": (math.log(0.7), math.log(1.1)), "log_aspect": 0.15,
        "shift": 0.12}
STROKES = (0, 1, 2, 3)          # max-pool radius on the canvas: 0 keeps the face's stroke, k > 0 dilates
SPLITS = {"train": (60_000, 0), "heldout": (10_000, 1)}   # (images, seed of the split's stream)
CHUNK = 2_000                   # images per generator seed: the result does not depend on memory
VERSION = "glyphs-v1"           # bump when anything above changes the pixels


def _font_dir() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


def _render(path: str, char: str) -> np.ndarray:
    """The anti-aliased FreeType bitmap of one character (uint8, tight box)."""
    from matplotlib.ft2font import FT2Font

    font = FT2Font(path)
    font.set_size(96, 72)
    try:
        from matplotlib.ft2font import LoadFlags
        font.set_text(char, 0.0, flags=LoadFlags.DEFAULT)
    except ImportError:  # matplotlib < 3.10 takes the flags as an int
        font.set_text(char, 0.0, flags=0)
    font.draw_glyphs_to_bitmap(antialiased=True)
    img = np.asarray(font.get_image())
    rows, cols = np.flatnonzero(img.max(axis=1)), np.flatnonzero(img.max(axis=0))
    return img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


@lru_cache(maxsize=1)
def masters() -> torch.Tensor:
    """(fonts, classes, CANVAS, CANVAS) float32 in [0, 1]: each letter once per font, centred."""
    out = torch.zeros(len(FONTS), NUM_CLASSES, CANVAS, CANVAS)
    for i, name in enumerate(FONTS):
        for j, char in enumerate(CLASSES):
            g = torch.from_numpy(_render(os.path.join(_font_dir(), name), char).astype(np.float32) / 255.0)
            h, w = g.shape
            s = GLYPH_SIDE / max(h, w)
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            g = F.interpolate(g[None, None], size=(nh, nw), mode="bilinear", antialias=True,
                              align_corners=False)[0, 0]
            top, left = (CANVAS - nh) // 2, (CANVAS - nw) // 2
            out[i, j, top:top + nh, left:left + nw] = g.clamp(0, 1)
    return out


def _stroke(x: torch.Tensor, radius: int) -> torch.Tensor:
    if radius == 0:
        return x
    k = 2 * abs(radius) + 1
    if radius > 0:
        return F.max_pool2d(x, k, stride=1, padding=abs(radius))
    return -F.max_pool2d(-x, k, stride=1, padding=abs(radius))


def _poses(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine_grid matrices: output coordinates -> canvas coordinates."""
    u = torch.rand(n, 5, generator=g, dtype=torch.float64) * 2 - 1           # U(-1, 1)
    shift = torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1
    lo, hi = POSE["log_scale"]
    rot = torch.deg2rad(u[:, 0] * POSE["rotate"])
    shear = u[:, 1] * POSE["shear"]
    scale = torch.exp(lo + (u[:, 2] + 1) / 2 * (hi - lo))
    aspect = torch.exp(u[:, 3] * POSE["log_aspect"])
    c, s = torch.cos(rot), torch.sin(rot)
    fwd = torch.zeros(n, 2, 2, dtype=torch.float64)                         # R @ Shear @ diag(sx, sy)
    sx, sy = scale * aspect, scale / aspect
    fwd[:, 0, 0], fwd[:, 0, 1] = c * sx, (c * shear - s) * sy
    fwd[:, 1, 0], fwd[:, 1, 1] = s * sx, (s * shear + c) * sy
    inv = torch.linalg.inv(fwd)
    t = shift * POSE["shift"]
    theta = torch.cat([inv, -(inv @ t[:, :, None])], dim=2)
    return theta.float()


def _chunk(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    m = masters()
    y = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=g)]   # balanced per chunk
    font = torch.randint(0, len(FONTS), (n,), generator=g)
    stroke = torch.randint(0, len(STROKES), (n,), generator=g)
    theta = _poses(n, g)
    canvas = m[font, y][:, None]                                            # n x 1 x C x C
    for k, r in enumerate(STROKES):
        sel = stroke == k
        if sel.any():
            canvas[sel] = _stroke(canvas[sel], r)
    grid = F.affine_grid(theta, list(canvas.shape), align_corners=False)
    canvas = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    small = F.avg_pool2d(canvas, CANVAS // IMAGE_SIZE)
    img = (small[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return img, y.numpy().astype(np.int64)


def _generate(split: str) -> tuple[np.ndarray, np.ndarray]:
    n, split_seed = SPLITS[split]
    parts = [_chunk(min(CHUNK, n - i), 1_000_003 * (split_seed + 1) + i // CHUNK) for i in range(0, n, CHUNK)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@lru_cache(maxsize=2)
def glyph_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x 16 x 16 in 0..255, int64 labels N) of a split; read-only.

    Generated once (about 10 s for the training split on one core) and kept as an ``.npz`` under
    :func:`dits.evaluate.cache.cache_dir` (``DITS_CACHE``); a file of another ``VERSION``, or one
    that does not read, is regenerated. The pixels are the same with or without the file."""
    from dits.evaluate.cache import cache_dir
    from dits.fileio import write_npz_atomic

    path = cache_dir() / f"{VERSION}-{split}.npz"
    images = labels = None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["version"]) == VERSION:
                images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError, EOFError):
        pass
    if images is None or len(images) != SPLITS[split][0]:
        images, labels = _generate(split)
        try:
            write_npz_atomic(path, version=np.array(VERSION), images=images, labels=labels)
        except (OSError, UserError):  # read-only cache: regenerated next time, nothing else changes
            pass
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def glyphs_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 N x 1 x 16 x 16 in [-1, 1], y int64 N) of ``train`` or ``heldout``."""
    images, labels = glyph_arrays(split)
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    return x, torch.from_numpy(labels.copy())
