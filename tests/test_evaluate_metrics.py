"""FID/sFID, IS, precision/recall and KID against answers known in closed form."""
import warnings

import numpy as np
import pytest

from dits.errors import UserError
from dits.evaluate.metrics import (IS_SPLIT_SIZE, RunningStats, fid_from_features,
                                   frechet_distance, gaussian_stats, inception_score,
                                   kernel_inception_distance, knn_radii, precision_recall)

METHODS = ("sqrtm", "eigh")


def _random_rotation(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# --------------------------------------------------------------------------- Fréchet
@pytest.mark.parametrize("method", METHODS)
def test_frechet_commuting_covariances_closed_form(method):
    # Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ  =>  d² = |Δμ|² + Σ (√a − √b)²
    rng = np.random.default_rng(0)
    d = 6
    q = _random_rotation(d, rng)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T, method=method)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_2d_non_commuting_closed_form(method):
    # For 2×2, tr √M = √(tr M + 2 √det M) with M = Σ1 Σ2 (eigenvalues real, ≥ 0).
    rng = np.random.default_rng(1)
    for _ in range(5):
        x, y = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
        s1, s2 = x @ x.T + 0.1 * np.eye(2), y @ y.T + 0.1 * np.eye(2)
        m = s1 @ s2
        tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
        expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2, method=method) == \
            pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_frechet_of_sampled_gaussians_approaches_closed_form():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20000, 3))
    y = 2.0 * rng.standard_normal((20000, 3)) + np.array([1.0, 0.0, -1.0])
    expected = 2.0 + 3 * (1.0 - 2.0) ** 2  # |Δμ|² + Σ(σ1 − σ2)²
    assert fid_from_features(x, y) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_fid_of_a_set_with_itself_is_zero(method):
    f = np.random.default_rng(3).standard_normal((400, 64)) * 3 + 5
    assert abs(fid_from_features(f, f, method=method)) < 1e-8


def test_singular_covariances_are_handled_and_methods_agree():
    # 10 samples in 50-d: rank-9 covariances, the n < d case of small evaluations.
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((10, 50)), rng.standard_normal((10, 50)) + 0.3
    stats = (*gaussian_stats(a), *gaussian_stats(b))
    with warnings.catch_warnings():
        # sqrtm may need the eps regularisation here, and says so
        warnings.simplefilter("ignore", RuntimeWarning)
        v1 = frechet_distance(*stats, method="sqrtm")
    v2 = frechet_distance(*stats, method="eigh")
    assert np.isfinite(v1) and v2 > 0
    assert v1 == pytest.approx(v2, rel=1e-4)
    # √ of round-off-level null eigenvalues: error ~ √ε · scale, not ε
    self_fd = frechet_distance(stats[0], stats[1], stats[0], stats[1], method="eigh")
    assert abs(self_fd) < 1e-6 * np.trace(stats[1])


def test_large_imaginary_part_is_an_error():
    # -I is not a covariance: √(I · −I) is purely imaginary.
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3), method="sqrtm")


def test_mismatched_statistics_are_a_user_error():
    with pytest.raises(UserError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(UserError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


def test_running_stats_match_numpy_even_far_from_origin():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1000, 8)) * 1e-3 + 1e6  # big mean, tiny spread
    rs = RunningStats()
    for i in range(0, 1000, 64):
        rs.update(x[i:i + 64])
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(rs.mean(), mu, rtol=1e-14, atol=0)
    np.testing.assert_allclose(rs.cov(), sigma, rtol=1e-6, atol=1e-15)


# --------------------------------------------------------------------------- IS
def test_inception_score_of_uniform_logits_is_one():
    assert inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_distinct_classes_is_the_class_count():
    k = 10
    logits = np.full((k, k), -1e4)
    np.fill_diagonal(logits, 1e4)  # also checks that huge logits give no NaN
    assert inception_score(logits) == pytest.approx(k, rel=1e-9)
    # all samples the same confident class: no diversity, IS = 1
    assert inception_score(np.tile(logits[:1], (k, 1))) == pytest.approx(1.0, rel=1e-9)


def test_inception_score_uses_consecutive_splits_keeping_the_remainder():
    assert IS_SPLIT_SIZE == 5000
    # 10 samples, splits of 4: [4 distinct classes] [4 distinct] [2 distinct] -> 4, 4, 2
    logits = np.full((10, 4), -50.0)
    logits[np.arange(10), np.arange(10) % 4] = 50.0
    mean, splits = inception_score(logits, split_size=4, return_splits=True)
    np.testing.assert_allclose(splits, [4, 4, 2], rtol=1e-9)
    assert mean == pytest.approx(10 / 3)
    # fewer samples than a split: one split
    _, splits = inception_score(logits[:3], return_splits=True)
    assert len(splits) == 1


# --------------------------------------------------------------------------- P/R
def _line(xs):
    return np.stack([np.asarray(xs, float), np.zeros(len(xs))], axis=1)


def test_knn_radius_is_third_neighbour_excluding_self():
    r = knn_radii(_line(np.arange(10)), k=3).numpy()
    # interior points: neighbours at ±1, ±2 -> 3rd nearest is 2 away; ends: 3 away
    assert r[0] == 9 and r[-1] == 9  # squared distances
    assert np.all(r[2:-2] == 4)


@pytest.mark.parametrize("block", [7, 10000])
def test_precision_recall_on_points_on_a_line(block):
    real = _line(np.arange(100))
    assert precision_recall(real, real, block=block) == (1.0, 1.0)
    assert precision_recall(real, real + 500.0, block=block) == (0.0, 0.0)
    # half the fakes on the real line (0..49), half far away:
    # precision = 50/100; fake 49's ball (radius 3) reaches real 52 -> recall 53/100
    fake = np.concatenate([real[:50], _line(np.arange(50) + 1000.0)])
    p, r = precision_recall(real, fake, block=block)
    assert p == pytest.approx(0.5) and r == pytest.approx(0.53)


def test_precision_recall_on_gaussian_blobs():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((600, 5))
    narrow = 0.3 * rng.standard_normal((600, 5))  # mode collapse: precise, low recall
    p, r = precision_recall(real, narrow)
    assert p > 0.9 and r < 0.5


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(UserError, match="more than 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# --------------------------------------------------------------------------- KID
def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    same, _ = kernel_inception_distance(a, b, subsets=10, subset_size=200)
    diff, _ = kernel_inception_distance(a, b + 1.0, subsets=10, subset_size=200)
    assert abs(same) < 0.02 and diff > 0.1
