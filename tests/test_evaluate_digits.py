"""The digits metric: real digits, the cached classifier, accuracy, FD and its floor."""
import numpy as np
import pytest

from dits.errors import UserError
from dits.evaluate import digits


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache dir, with the classifier fitted once for this module."""
    path = tmp_path_factory.mktemp("dits-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("DITS_CACHE", str(path))
    digits._MEMO.clear()
    digits.load_classifier()
    yield path
    mp.undo()
    digits._MEMO.clear()


def test_real_digits_are_load_digits_mapped_to_uint8():
    images, labels = digits.real_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(np.unique(images).tolist()) <= allowed and images.max() == 255


def test_classifier_is_accurate_and_cached(cache, monkeypatch):
    clf = digits.load_classifier()
    assert clf.heldout_accuracy >= 0.97
    assert clf.n_train + clf.n_test == 1797
    assert (cache / digits.CACHE_NAME).is_file()
    # A fresh process (empty memo) reads the cache instead of refitting...
    digits._MEMO.clear()
    monkeypatch.setattr(digits, "fit_classifier", lambda: pytest.fail("refitted"))
    again = digits.load_classifier()
    np.testing.assert_array_equal(again.w1, clf.w1)
    # ...unless the recipe changed: then the stale cache is refitted.
    digits._MEMO.clear()
    monkeypatch.setattr(digits, "RECIPE", digits.RECIPE + "-changed")
    monkeypatch.setattr(digits, "fit_classifier", lambda: clf)
    assert digits._load(cache / digits.CACHE_NAME) is None
    assert digits.load_classifier() is clf
    digits._MEMO.clear()


def test_fitting_is_deterministic(cache):
    a, b = digits.fit_classifier(), digits.load_classifier()
    np.testing.assert_array_equal(a.w1, b.w1)
    assert a.heldout_accuracy == b.heldout_accuracy


def test_real_digits_score_like_real_digits(cache):
    images, labels = digits.real_digits()
    idx = np.random.default_rng(0).integers(0, len(labels), 500)
    d = digits.digits_metric(images[idx][..., None], labels[idx])  # ADM N×8×8×1 layout
    assert d["n"] == 500 and d["accuracy"] > 0.97
    assert 0 < d["fd_floor"] and d["fd"] < d["fd_floor"] + 4 * d["fd_floor_std"]
    assert sum(d["predicted_counts"]) == 500
    # the floor's draws are fixed by the seed
    assert digits.digits_metric(images[idx], labels[idx])["fd_floor"] == d["fd_floor"]
    line = digits.format_digits_metric(d)
    assert "\n" not in line and "acc" in line and "floor" in line


def test_noise_scores_badly(cache):
    noise = np.random.default_rng(1).integers(0, 256, (300, 8, 8), dtype=np.uint8)
    d = digits.digits_metric(noise)
    assert d["accuracy"] is None and d["fd"] > 20 * d["fd_floor"]
    assert "n/a" in digits.format_digits_metric(d)
    # wrong requested classes: low accuracy
    images, labels = digits.real_digits()
    assert digits.digits_metric(images[:200], (labels[:200] + 1) % 10)["accuracy"] < 0.1


def test_svc_is_an_independent_accurate_classifier(cache):
    images, labels = digits.real_digits()
    assert digits.svc_accuracy(images[:300], labels[:300]) > 0.99
    assert digits.svc_accuracy(images[:300], (labels[:300] + 3) % 10) < 0.05
    check = digits.digits_reference_check(n=200)
    assert check["svc_heldout_accuracy"] >= 0.98 and check["mlp_heldout_accuracy"] >= 0.97
    assert check["fd_floor"] > 0


def test_bad_inputs_are_user_errors(cache):
    images, labels = digits.real_digits()
    with pytest.raises(UserError, match="uint8"):
        digits.digits_metric(images[:10].astype(np.float32) / 255)
    with pytest.raises(UserError, match="8×8"):
        digits.digits_metric(np.zeros((10, 16, 16), np.uint8))
    with pytest.raises(UserError, match="labels"):
        digits.digits_metric(images[:10], labels[:9])
    with pytest.raises(UserError, match="0..9"):
        digits.digits_metric(images[:10], labels[:10] + 10)
    with pytest.raises(UserError, match="at least 2"):
        digits.digits_metric(images[:1])


def test_heldout_ratio_separates_real_from_noisy_digits():
    from dits.data.digits import load_digits_arrays
    images, labels = load_digits_arrays()
    rng = np.random.default_rng(1)
    idx = rng.choice(len(labels), 600)
    real = digits.digits_metric(images[idx], labels[idx])
    assert real["fd_heldout"] / real["fd_heldout_floor"] < 1.3
    noisy = np.clip(images[idx].astype(float) + rng.normal(0, 64, images[idx].shape), 0, 255).astype(np.uint8)
    bad = digits.digits_metric(noisy, labels[idx])
    assert bad["fd_heldout"] / bad["fd_heldout_floor"] > 2.0
