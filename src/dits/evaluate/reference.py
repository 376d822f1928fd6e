"""Reference batches and the Inception evaluation of a samples file.

A reference batch is ADM's ``.npz``: ``mu``/``sigma`` (pool3 Gaussian, float64),
``mu_s``/``sigma_s`` (spatial Gaussian), and ``arr_0``, up to 10,000 of the reference
images, whose pool3 features are the real manifold for precision/recall. ADM's own
reference batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``) load unchanged, and the
ones written here load in ADM's evaluator.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dits.errors import UserError
from dits.fileio import write_json_atomic, write_npz_atomic
from dits.evaluate.cache import cache_dir
from dits.evaluate.images import NpzImages, load_labels, open_images
from dits.evaluate.inception import POOL3_DIM, SPATIAL_DIM, InceptionV3
from dits.evaluate.metrics import (IS_SPLIT_SIZE, RunningStats, frechet_distance,
                                   gaussian_stats, inception_score,
                                   kernel_inception_distance, precision_recall)

REF_MAX_IMAGES = 10_000  # ADM's reference batches keep 10k images
PR_K = 3


# --------------------------------------------------------------------------- plumbing
def pick_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None: CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def _get_net(net: InceptionV3 | None, inception, input_mode: str, device) -> InceptionV3:
    if net is None:
        net = InceptionV3.from_file(inception, input_mode=input_mode)
    return net.to(device).eval()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def write_json(path: str | os.PathLike, obj) -> None:
    write_json_atomic(path, obj)


# --------------------------------------------------------------------------- features
@dataclass
class Features:
    """What one pass of the network over an image set yields."""

    n: int
    pool3_stats: RunningStats
    spatial_stats: RunningStats
    pool3: np.ndarray | None = None            # N×2048 float32 (precision/recall, KID)
    logits_unbiased: np.ndarray | None = None  # N×1008 float32 (IS)
    kept_images: np.ndarray | None = None      # the subset asked for by ``keep_indices``
    kept_pool3: np.ndarray | None = None       # ... and its pool3 features
    kept_spatial_stats: RunningStats | None = None


@torch.inference_mode()
def extract_features(images, net: InceptionV3, batch_size: int = 50, device=None,
                     keep_pool3: bool = True, keep_logits: bool = True,
                     keep_indices: np.ndarray | None = None, progress: bool = True,
                     desc: str = "inception") -> Features:
    """Run the network over ``images`` (anything with ``len`` and ``batches(b)`` of
    N×H×W×C uint8) and gather statistics; optionally keep per-image features and a
    sorted subset of the images themselves (for a reference batch's ``arr_0``)."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    device = next(net.parameters()).device if device is None else torch.device(device)
    pool_stats, spatial_stats = RunningStats(), RunningStats()
    pool3, logits, kept, kept_pool3 = [], [], [], []
    kept_spatial = RunningStats()
    start = 0
    with _progress(len(images), desc, progress) as bar:
        for batch in images.batches(batch_size):
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
            x = x.permute(0, 3, 1, 2).float() / 255.0
            out = net(x)
            p = out["pool3"].double().cpu().numpy()
            sp = out["spatial"].double().cpu().numpy()
            pool_stats.update(p)
            spatial_stats.update(sp)
            if keep_pool3:
                pool3.append(p.astype(np.float32))
            if keep_logits:
                logits.append(out["logits_unbiased"].float().cpu().numpy())
            if keep_indices is not None:
                lo, hi = np.searchsorted(keep_indices, [start, start + len(batch)])
                sel = keep_indices[lo:hi] - start
                if len(sel):
                    kept.append(np.array(batch[sel]))
                    kept_pool3.append(p[sel].astype(np.float32))
                    kept_spatial.update(sp[sel])
            start += len(batch)
            bar.update(len(batch))
    return Features(
        n=start, pool3_stats=pool_stats, spatial_stats=spatial_stats,
        pool3=np.concatenate(pool3) if keep_pool3 else None,
        logits_unbiased=np.concatenate(logits) if keep_logits else None,
        kept_images=np.concatenate(kept) if kept else None,
        kept_pool3=np.concatenate(kept_pool3) if kept_pool3 else None,
        kept_spatial_stats=kept_spatial if kept_pool3 else None)


# --------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """A reference batch. ``mu`` etc. are None when the file only holds images."""

    path: Path
    mu: np.ndarray | None
    sigma: np.ndarray | None
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    images: NpzImages | None

    @property
    def has_stats(self) -> bool:
        return self.mu is not None


def load_reference(path: str | os.PathLike) -> Reference:
    """Read an ADM reference ``.npz``; checks that the statistics have FID's shapes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such reference batch: {path} (make one with "
                        "`dits evaluate --make-ref SRC --out REF.npz`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            stats = {k: z[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s")
                     if k in files}
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .npz reference batch ({e})") from None
    if stats and len(stats) != 4:
        raise UserError(f"{path} has only {sorted(stats)} of mu, sigma, mu_s, sigma_s")
    expected = {"mu": (POOL3_DIM,), "sigma": (POOL3_DIM, POOL3_DIM),
                "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
    for k, shape in expected.items():
        if k in stats and stats[k].shape != shape:
            raise UserError(f"{path}: {k} has shape {stats[k].shape}, expected {shape} "
                            "(is it an Inception pool3/mixed_6 reference batch?)")
    images = NpzImages(path) if "arr_0" in files else None
    if not stats and images is None:
        raise UserError(f"{path} has neither statistics (mu, sigma, mu_s, sigma_s) nor images (arr_0)")
    return Reference(path, stats.get("mu"), stats.get("sigma"), stats.get("mu_s"),
                     stats.get("sigma_s"), images)


def make_reference(src: str | os.PathLike, out: str | os.PathLike, net: InceptionV3 | None = None,
                   inception=None, batch_size: int = 50, device=None,
                   max_images: int = REF_MAX_IMAGES, seed: int = 0, progress: bool = True,
                   input_mode: str = "pytorch-fid", use_cache: bool = True) -> dict:
    """Write an ADM reference batch for the images in ``src`` (folder or ``.npz``).

    Statistics cover every image; ``arr_0`` keeps ``max_images`` of them, picked at
    random with ``seed`` (all if there are fewer), in their original order.
    """
    images = open_images(src)
    net = _get_net(net, inception, input_mode, pick_device(device))
    n = len(images)
    if n < 2:
        raise UserError(f"{src}: a reference batch needs at least 2 images, got {n}")
    keep = np.arange(n) if n <= max_images else \
        np.sort(np.random.default_rng(seed).choice(n, max_images, replace=False))
    feats = extract_features(images, net, batch_size, keep_pool3=False, keep_logits=False,
                             keep_indices=keep, progress=progress, desc="reference")
    arrays = {
        "arr_0": feats.kept_images,
        "mu": feats.pool3_stats.mean(), "sigma": feats.pool3_stats.cov(),
        "mu_s": feats.spatial_stats.mean(), "sigma_s": feats.spatial_stats.cov(),
        # Extra key, ignored by ADM's evaluator: how this batch was made.
        "dits_meta": np.array(json.dumps({"n_images": n, "source": str(src),
                                          "input_mode": net.input_mode})),
    }
    write_npz_atomic(out, **arrays)
    # Evaluations against this file need arr_0's pool3: we have it already.
    if use_cache and len(keep) >= 2:
        _write_cached(_ref_cache_path(Path(out), net), {
            "pool3": feats.kept_pool3, "mu_s": feats.kept_spatial_stats.mean(),
            "sigma_s": feats.kept_spatial_stats.cov()})
    return {"out": str(out), "n_images": n, "n_kept": int(len(keep)),
            "image_shape": list(images.shape[1:])}


def _net_fingerprint(net: InceptionV3) -> str:
    """A hash of the weights and input mode, so cached activations match the network.

    Recomputed each time (a fraction of a second): weights can be reloaded in place.
    """
    h = hashlib.sha256(net.input_mode.encode())
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def reference_features(ref: Reference, net: InceptionV3, batch_size: int = 50,
                       progress: bool = True, use_cache: bool = True) -> dict:
    """The real side of an evaluation: ``pool3`` of the reference images (None when the
    file has no images) and the four statistics (the file's own, else from its images).

    Reference activations are cached in the user's cache dir, keyed by the file (path,
    size, mtime) and a hash of the weights: 10k images through Inception take many
    minutes on a CPU, and they never change.
    """
    out = {"pool3": None, "mu": ref.mu, "sigma": ref.sigma, "mu_s": ref.mu_s,
           "sigma_s": ref.sigma_s}
    if ref.images is None:
        return out
    cached = _ref_cache_path(ref.path, net)
    acts = _read_cached(cached) if use_cache else None
    if acts is None:
        feats = extract_features(ref.images, net, batch_size, keep_logits=False,
                                 progress=progress, desc="reference")
        if feats.n < 2:
            raise UserError(f"{ref.path}: arr_0 needs at least 2 images")
        acts = {"pool3": feats.pool3, "mu_s": feats.spatial_stats.mean(),
                "sigma_s": feats.spatial_stats.cov()}
        if use_cache:
            _write_cached(cached, acts)
    out["pool3"] = acts["pool3"]
    if not ref.has_stats:  # ADM's rule: statistics from the images when the file has none
        out["mu"], out["sigma"] = gaussian_stats(acts["pool3"])
        out["mu_s"], out["sigma_s"] = acts["mu_s"], acts["sigma_s"]
    return out


def _ref_cache_path(path: Path, net: InceptionV3) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|"
                         f"{_net_fingerprint(net)}".encode()).hexdigest()[:24]
    return cache_dir() / "ref_activations" / f"{key}.npz"


def _write_cached(path: Path, acts: dict) -> None:
    try:
        write_npz_atomic(path, **acts)
    except OSError:
        pass  # a read-only cache only costs time


def _read_cached(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("pool3", "mu_s", "sigma_s")}
    except (OSError, ValueError, KeyError):
        return None  # absent or unreadable: recompute


# --------------------------------------------------------------------------- evaluation
def evaluate_samples(samples: str | os.PathLike, ref: str | os.PathLike | Reference,
                     net: InceptionV3 | None = None, inception=None, batch_size: int = 50,
                     device=None, progress: bool = True, fd_method: str = "sqrtm",
                     kid: bool = False, input_mode: str = "pytorch-fid",
                     use_cache: bool = True) -> dict:
    """FID, sFID, IS, precision and recall of an ADM samples ``.npz`` against a
    reference batch, as the ADM evaluator computes them (KID too if ``kid``).

    Precision/recall need the reference's ``arr_0`` and are None without it.
    """
    if fd_method not in ("sqrtm", "eigh"):  # fail now, not after an hour of Inception
        raise UserError(f"unknown Fréchet method {fd_method!r}; use 'sqrtm' or 'eigh'")
    images = NpzImages(samples)
    if len(images) < 2:
        raise UserError(f"{samples}: need at least 2 samples, got {len(images)}")
    labels = load_labels(samples, len(images))  # check it before the long part
    ref = ref if isinstance(ref, Reference) else load_reference(ref)
    net = _get_net(net, inception, input_mode, pick_device(device))
    real = reference_features(ref, net, batch_size, progress, use_cache)
    fake = extract_features(images, net, batch_size, progress=progress, desc="samples")

    results = {
        "fid": frechet_distance(fake.pool3_stats.mean(), fake.pool3_stats.cov(),
                                real["mu"], real["sigma"], method=fd_method),
        "sfid": frechet_distance(fake.spatial_stats.mean(), fake.spatial_stats.cov(),
                                 real["mu_s"], real["sigma_s"], method=fd_method),
        "inception_score": inception_score(fake.logits_unbiased, IS_SPLIT_SIZE),
        "precision": None,
        "recall": None,
    }
    if real["pool3"] is not None and len(real["pool3"]) > PR_K and fake.n > PR_K:
        results["precision"], results["recall"] = precision_recall(
            real["pool3"], fake.pool3, k=PR_K, device=next(net.parameters()).device)
    if kid and real["pool3"] is not None:
        results["kid"], results["kid_std"] = kernel_inception_distance(real["pool3"], fake.pool3)
    results.update({
        "n_samples": fake.n,
        "n_ref_images": None if real["pool3"] is None else int(len(real["pool3"])),
        "samples": str(samples),
        "ref": str(ref.path),
        "is_split_size": IS_SPLIT_SIZE,
        "is_splits": -(-fake.n // IS_SPLIT_SIZE),
        "pr_k": PR_K,
        "input_mode": net.input_mode,
        "fd_method": fd_method,
    })
    if labels is not None:
        results["n_classes_in_samples"] = int(len(np.unique(labels)))
    return results


def format_results(results: dict) -> str:
    """A small aligned table of the headline numbers."""
    rows = [("FID", "fid"), ("sFID", "sfid"), ("Inception Score", "inception_score"),
            ("Precision", "precision"), ("Recall", "recall"), ("KID", "kid")]
    lines = []
    for name, key in rows:
        if key not in results:
            continue
        v = results[key]
        lines.append(f"{name:<16} {'n/a' if v is None else f'{v:.4f}':>10}")
    lines.append(f"{'samples':<16} {results['n_samples']:>10}")
    if results.get("n_ref_images") is not None:
        lines.append(f"{'ref images':<16} {results['n_ref_images']:>10}")
    return "\n".join(lines)
