"""Sample-quality metrics on feature vectors: FID/sFID, IS, precision/recall, KID.

Conventions follow the ADM evaluator (Dhariwal & Nichol 2021), which DiT papers use:

* Fréchet distance of Gaussians fitted with the unbiased covariance (``np.cov``);
  ``scipy.linalg.sqrtm`` of Σ1Σ2, retried with 1e-6 on the diagonals when the product
  is singular, tiny imaginary parts dropped (larger ones are an error).
* Inception Score over consecutive splits of 5,000 samples, the last split keeping
  whatever is left (so fewer than 5,000 samples form one split), averaged.
* Improved precision/recall (Kynkäänniemi et al. 2019) with k = 3: a point's radius
  is the squared distance to its 3rd nearest neighbour (itself excluded) in its own set.

Statistics are float64; distances for precision/recall are float32 (ADM even uses
float16), computed in blocks so 50k × 50k never sits in memory.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

from dits.errors import UserError

IS_SPLIT_SIZE = 5000


# --------------------------------------------------------------------------- Gaussians
def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of an N×D feature matrix, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise UserError(f"need at least 2 feature vectors (N×D) for statistics, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class RunningStats:
    """Mean and covariance accumulated batch by batch (for sets too big to keep).

    Sums are taken around a shift (the first batch's mean) so that large means do not
    eat the precision of the covariance (the textbook sum-of-squares pitfall).
    """

    def __init__(self):
        self.n = 0
        self.shift = None
        self.sum = None
        self.sum_outer = None

    def update(self, batch) -> None:
        b = np.asarray(batch, dtype=np.float64)
        if b.ndim != 2:
            raise ValueError(f"RunningStats.update expects N×D, got shape {b.shape}")
        if self.shift is None:
            self.shift = b.mean(axis=0)
            self.sum = np.zeros_like(self.shift)
            self.sum_outer = np.zeros((b.shape[1], b.shape[1]))
        b = b - self.shift
        self.n += b.shape[0]
        self.sum += b.sum(axis=0)
        self.sum_outer += b.T @ b

    def mean(self) -> np.ndarray:
        return self.shift + self.sum / self.n

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise UserError("need at least 2 images for a covariance")
        centred = self.sum / self.n
        return (self.sum_outer - self.n * np.outer(centred, centred)) / (self.n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = |mu1 − mu2|² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½).

    ``method="sqrtm"`` is the ADM/pytorch-fid computation. ``method="eigh"`` computes the
    same trace as Σ sqrt(eig(Σ1^½ Σ2 Σ1^½)), a symmetric PSD matrix: about 3× faster
    at 2048-d and exact for singular covariances (negative round-off eigenvalues are
    clipped); the two agree to round-off on full-rank covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise UserError(f"statistics do not match: mean {mu1.shape} vs {mu2.shape}, covariance "
                        f"{s1.shape} vs {s2.shape} (were they made with the same network?)")
    diff = mu1 - mu2
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    else:
        raise UserError(f"unknown Fréchet method {method!r}; use 'sqrtm' or 'eigh'")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on singular input; we check ourselves
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than dimensions): regularise both sides.
        warnings.warn(f"Fréchet distance: singular covariance product; adding {eps} to the "
                      "diagonals", RuntimeWarning, stacklevel=3)
        offset = np.eye(s1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives small imaginary parts; large ones mean the input is not PSD.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: matrix square root has an imaginary part of "
                             f"{np.abs(covmean.imag).max():.3g}; are the covariances valid?")
        covmean = covmean.real
    return float(np.trace(covmean))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def fid_from_features(features1, features2, method: str = "sqrtm") -> float:
    """Fréchet distance between two feature sets (e.g. pool3 activations)."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2), method=method)


# --------------------------------------------------------------------------- IS
def inception_score(logits, split_size: int = IS_SPLIT_SIZE, return_splits: bool = False):
    """exp(E_x KL(p(y|x) ‖ p(y))) per split of ``split_size`` samples, averaged.

    ``logits`` are pre-softmax scores (N×K); ADM softmaxes ``pool3 @ fc.weight.T``
    (the network's ``logits_unbiased``). Splits are consecutive: with N = 12,000 they
    are 5,000 + 5,000 + 2,000, and N ≤ 5,000 gives a single split. Computed in float64
    through log-softmax, so tiny probabilities do not turn into log(0).
    """
    z = logits if isinstance(logits, torch.Tensor) else np.asarray(logits)
    if z.ndim != 2 or z.shape[0] < 1:
        raise UserError(f"inception_score expects N×K logits, got shape {tuple(z.shape)}")
    if split_size < 1:
        raise UserError(f"split_size must be positive, got {split_size}")
    scores = []
    for start in range(0, z.shape[0], split_size):
        # float64 one split at a time: 50k × 1008 doubles at once would be 400 MB
        part = torch.as_tensor(z[start:start + split_size]).to(torch.float64)
        logp = torch.log_softmax(part, dim=1)
        log_marginal = torch.logsumexp(logp, dim=0) - np.log(logp.shape[0])
        kl = (logp.exp() * (logp - log_marginal)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    mean = float(np.mean(scores))
    return (mean, scores) if return_splits else mean


# --------------------------------------------------------------------------- P/R
def _as_f32(x, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device or x.device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # |a|² − 2ab + |b|², clamped: round-off can make it slightly negative.
    d = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def knn_radii(features, k: int = 3, block: int = 10000, device=None) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set.

    Counting the point itself as the 0th neighbour (distance 0), as ADM does. Uses
    running top-(k+1) over column blocks so memory is block × block.
    """
    x = _as_f32(features, device)
    n = x.shape[0]
    if n <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} feature vectors, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=x.device)
    for i in range(0, n, block):
        rows = x[i:i + block]
        best = None
        for j in range(0, n, block):
            d = _sq_dists(rows, x[j:j + block])
            if best is not None:
                d = torch.cat([best, d], dim=1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[i:i + block] = best[:, k]
    return radii


def precision_recall(real_features, fake_features, k: int = 3, block: int = 10000,
                     device=None) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds), as in the ADM evaluator.

    precision: fraction of fake points inside some real point's k-NN ball;
    recall: fraction of real points inside some fake point's k-NN ball.
    A point is inside a ball when its squared distance is ≤ the squared radius.
    """
    real = _as_f32(real_features, device)
    fake = _as_f32(fake_features, real.device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise UserError(f"precision/recall needs two N×D feature sets of equal D, got "
                        f"{tuple(real.shape)} and {tuple(fake.shape)}")
    r_real = knn_radii(real, k, block)
    r_fake = knn_radii(fake, k, block)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=fake.device)
    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for i in range(0, real.shape[0], block):
        for j in range(0, fake.shape[0], block):
            d = _sq_dists(real[i:i + block], fake[j:j + block])
            fake_in[j:j + block] |= (d <= r_real[i:i + block, None]).any(dim=0)
            real_in[i:i + block] |= (d <= r_fake[None, j:j + block]).any(dim=1)
    return float(fake_in.double().mean()), float(real_in.double().mean())


# --------------------------------------------------------------------------- KID
def kernel_inception_distance(real_features, fake_features, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel
    k(x, y) = (x·y / d + 1)³, averaged over random subsets. Returns (mean, std)."""
    real = np.asarray(real_features, dtype=np.float64)
    fake = np.asarray(fake_features, dtype=np.float64)
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise UserError("KID needs at least 2 feature vectors in each set")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = real[rng.choice(real.shape[0], m, replace=False)]
        y = fake[rng.choice(fake.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        # Unbiased: leave out the diagonal (a point with itself).
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) \
            - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))
