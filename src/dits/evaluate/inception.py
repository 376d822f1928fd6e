"""The FID Inception-v3: the 2015 TensorFlow graph as a plain torch module.

FID, sFID, IS and precision/recall are only comparable between papers when they use
the same network. That network is the 2015 TF Inception-v3 graph, whose standard
PyTorch port is the state dict ``pt_inception-2015-12-05-6726825d.pth`` (a release
asset of mseitzer/pytorch-fid). This module reproduces that graph so the file loads
with ``strict=True``: parameter names are the file's keys (torchvision's Inception-v3
naming), and the forward pass has the TF graph's quirks (see SPEC §7):

* average pooling in the A, C and first E block does not count the padding;
* the last E block (``Mixed_7c``) max-pools in its pooling branch;
* ``fc`` has 1008 outputs (the TF graph's label set), no auxiliary head.

The weights cannot be downloaded here; :func:`resolve_weights_path` says in one line
where to get them and where to put them.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dits.errors import UserError
from dits.evaluate.cache import cache_dir

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
)
WEIGHTS_ENV = "DITS_INCEPTION"
# torch.hub names files <name>-<first 8 hex digits of the sha256>.<ext>
WEIGHTS_SHA256_PREFIX = "6726825d"
# The file's size in numbers, BatchNorm counters included: pins key set and shapes.
WEIGHTS_NUMEL = 23_885_486

RESIZE_TO = 299
POOL3_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023 at 299 px
NUM_LOGITS = 1008


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pooling divides by the number of *real* pixels under the window.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


class BlockA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and pooled 1x1 branches."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ], 1)


class BlockB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches at 17x17."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = (1, 7), (7, 1)
        pad_row, pad_col = (0, 3), (3, 0)
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, row, padding=pad_row)
        self.branch7x7_3 = ConvBN(c7, 192, col, padding=pad_col)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, col, padding=pad_col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, row, padding=pad_row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, col, padding=pad_col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, row, padding=pad_row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Exposed separately because sFID reads the 1x1 branch of Mixed_6d.
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return [self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_3x3(x))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class BlockD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                      self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            b7,
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockE(nn.Module):
    """Mixed_7b/7c: expanded 1x3 / 3x1 branches at 8x8.

    ``pool`` is the TF graph's choice for the pooling branch: average (Mixed_7b) or
    max (Mixed_7c).
    """

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = _max_pool_3x3 if pool == "max" else _avg_pool_3x3
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
            self.branch_pool(self.pool(x)),
        ], 1)


def resize_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize with TF1's legacy sampling grid (no half-pixel centres).

    Output pixel i samples input coordinate i * in/out, clamped at the last pixel.
    This is what the 2015 graph's own ResizeBilinear does inside the ADM evaluator.
    """
    def weights(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = pos.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = (pos - lo).to(x.dtype).to(x.device)
        return lo.to(x.device), hi.to(x.device), frac

    lo, hi, fy = weights(x.shape[-2])
    x = x[..., lo, :] * (1 - fy)[:, None] + x[..., hi, :] * fy[:, None]
    lo, hi, fx = weights(x.shape[-1])
    return x[..., lo] * (1 - fx) + x[..., hi] * fx


class InceptionV3(nn.Module):
    """FID Inception-v3. ``net(x)`` with x: N×3×H×W floats in [0, 1] returns a dict:

    * ``pool3``  N×2048: global average of Mixed_7c (FID, precision/recall);
    * ``spatial`` N×2023: first 7 channels of Mixed_6d's 1×1 branch at 17×17, in
      ADM's (row, column, channel) flattening so ADM's ``mu_s``/``sigma_s`` apply (sFID);
    * ``logits`` N×1008: ``fc(pool3)``;
    * ``logits_unbiased`` N×1008: ``pool3 @ fc.weight.T`` — what ADM's (and the
      original improved-GAN) Inception Score softmaxes: it drops the fc bias.

    ``input_mode`` picks how images reach 299×299:

    * ``"pytorch-fid"`` (default): bilinear ``F.interpolate`` (align_corners=False)
      then ``2x - 1``, as pytorch-fid does;
    * ``"tf"``: the TF graph's own steps on 0..255 values, TF1 bilinear grid then
      ``(v - 128) / 128``; closer to the ADM evaluator's numbers.
    """

    def __init__(self, input_mode: str = "pytorch-fid"):
        super().__init__()
        if input_mode not in ("pytorch-fid", "tf"):
            raise UserError(f"input_mode must be 'pytorch-fid' or 'tf', got {input_mode!r}")
        self.input_mode = input_mode
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, pool="avg")
        self.Mixed_7c = BlockE(2048, pool="max")
        self.fc = nn.Linear(POOL3_DIM, NUM_LOGITS)
        self.eval()  # an evaluation network: BatchNorm always uses the stored statistics

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, input_mode: str = "pytorch-fid",
                  check_hash: bool = True) -> "InceptionV3":
        """Build the network and strictly load the standard weights from ``path``.

        ``path`` None means: ``$DITS_INCEPTION``, else the usual cache locations (see
        :func:`resolve_weights_path`).
        """
        path = resolve_weights_path(path)
        net = cls(input_mode=input_mode)
        net.load_state_dict(load_weights(path), strict=True)
        if check_hash:
            _warn_if_hash_differs(path)
        return net

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` with a one-line :class:`UserError` for foreign keys."""
        if strict:
            _check_keys(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"InceptionV3 expects N×3×H×W images in [0, 1], got shape "
                            f"{tuple(x.shape)}")
        if x.shape[1] == 1:  # grey: the network only knows RGB
            x = x.expand(-1, 3, -1, -1)
        x = x.to(self.fc.weight.dtype)
        if self.input_mode == "tf":
            return (resize_tf1(x * 255.0, RESIZE_TO) - 128.0) / 128.0
        x = F.interpolate(x, size=(RESIZE_TO, RESIZE_TO), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self._prepare(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        branches = self.Mixed_6d.branches(x)
        # TF's mixed_6/conv is NHWC: flatten as (row, column, channel) like ADM does.
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_6e(torch.cat(branches, 1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool3 = x.mean(dim=(2, 3))
        return {
            "pool3": pool3,
            "spatial": spatial,
            "logits": self.fc(pool3),
            "logits_unbiased": pool3 @ self.fc.weight.T,
        }


def _check_keys(net: nn.Module, state_dict) -> None:
    """Raise one clear line when a state dict is not the FID Inception's."""
    if not isinstance(state_dict, dict):
        raise UserError(f"Inception weights must be a state dict, got {type(state_dict).__name__}; "
                        f"use {WEIGHTS_NAME} from {WEIGHTS_URL}")
    own = net.state_dict()
    # PyTorch fills in BatchNorm counters that an older file may lack.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and hasattr(state_dict[k], "shape")
             and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise UserError("not the FID Inception-v3 weights: " + ", ".join(parts)
                        + f"; use {WEIGHTS_NAME} from {WEIGHTS_URL}")


def default_weights_locations() -> list[Path]:
    """Where we look when neither ``--inception`` nor ``$DITS_INCEPTION`` is given."""
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return [cache_dir() / WEIGHTS_NAME, torch_home / "hub" / "checkpoints" / WEIGHTS_NAME]


def resolve_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The weights file to use, or a one-line :class:`UserError` saying how to get it."""
    if path is None and os.environ.get(WEIGHTS_ENV):
        path = os.environ[WEIGHTS_ENV]
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        raise UserError(f"Inception weights not found at {p}: download {WEIGHTS_URL} "
                        f"(pytorch-fid release asset) and pass its path")
    for p in default_weights_locations():
        if p.is_file():
            return p
    raise UserError(f"Inception weights not found: download {WEIGHTS_URL} (pytorch-fid "
                    f"release asset) to {default_weights_locations()[0]}, or pass "
                    f"--inception PATH / set {WEIGHTS_ENV}")


def load_weights(path: str | os.PathLike) -> dict:
    """``torch.load`` without code execution; unreadable files give one line."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, pickle garbage, disallowed globals, ...
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read Inception weights {path} (corrupt, truncated or not a "
                        f"PyTorch state dict: {reason}); re-download {WEIGHTS_URL}") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds a {type(sd).__name__}, not a state dict; "
                        f"use {WEIGHTS_NAME} from {WEIGHTS_URL}")
    return sd


def _warn_if_hash_differs(path: Path) -> None:
    # Only meaningful for the standard file name, whose hash prefix is its checksum.
    if path.name != WEIGHTS_NAME:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
        warnings.warn(f"{path}: sha256 {h.hexdigest()[:8]} is not {WEIGHTS_SHA256_PREFIX}; "
                      "the weights load but may not be the standard file", stacklevel=3)
