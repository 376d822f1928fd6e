"""``dits evaluate`` end to end on tiny inputs: make a reference, evaluate against it,
the digits table, and one-line errors with exit code 2."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dits.cli import main
from dits.evaluate import InceptionV3, load_reference
from dits.evaluate.digits import real_digits
from dits.evaluate.reference import reference_features


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DITS_CACHE", str(tmp_path_factory.getbasetemp() / "cli-cache"))
    monkeypatch.delenv("DITS_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights in the standard layout (the real file is not available offline)."""
    torch.manual_seed(0)
    net = InceptionV3()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("conv.weight"):  # He scaling keeps activations O(1)
                p.normal_(0, math.sqrt(2.0 / p[0].numel()))
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)


def _net_outputs(weights, imgs, input_mode="pytorch-fid"):
    """pool3 and unbiased logits of uint8 N x H x W x C images, in float64."""
    net = InceptionV3.from_file(weights, input_mode=input_mode)
    with torch.no_grad():
        out = net(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    return out["pool3"].double().numpy(), out["logits_unbiased"].double().numpy()


def _inception_score(logits):
    """exp(mean_x KL(p(y|x) || p(y))), p = softmax of the logits, one split, in float64."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    marginal = p.mean(axis=0)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1))))


def _frechet(f1, f2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), through eigendecompositions."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    lam, v = np.linalg.eigh(s1)
    half = (v * np.sqrt(np.clip(lam, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(half @ s2 @ half)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_make_ref_then_evaluate(tmp_path, weights, images, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(images):  # recursive: some in a subfolder
        Image.fromarray(img).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    ref = tmp_path / "ref.npz"
    assert main(["evaluate", "--make-ref", str(folder), "--out", str(ref),
                 "--inception", str(weights), "--no-progress"]) == 0
    r = load_reference(ref)
    assert r.mu.shape == (2048,) and r.sigma.shape == (2048, 2048)
    assert r.mu_s.shape == (2023,) and r.sigma_s.shape == (2023, 2023)
    assert len(r.images) == 5
    with np.load(ref) as z:  # files sorted by path: 0, 2, 4 then sub/1, sub/3
        np.testing.assert_array_equal(z["arr_0"], images[[0, 2, 4, 1, 3]])

    # the same images as samples: FID ~ 0, precision = recall = 1
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images, arr_1=np.arange(5))
    assert main(["evaluate", str(samples), "--ref", str(ref), "--inception", str(weights),
                 "--fd-method", "eigh", "--batch-size", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "Precision" in out
    res = json.loads((tmp_path / "samples.eval.ref.json").read_text())
    assert abs(res["fid"]) < 1e-3 * np.trace(r.sigma) and abs(res["sfid"]) < 1e-3 * np.trace(r.sigma_s)
    assert res["precision"] == 1.0 and res["recall"] == 1.0
    assert res["n_samples"] == 5 and res["is_splits"] == 1
    want_is = _inception_score(_net_outputs(weights, images)[1])
    # random weights predict almost alike (IS barely above 1): compare the excess over 1
    assert want_is - 1 > 1e-6
    assert res["inception_score"] - 1 == pytest.approx(want_is - 1, rel=1e-3)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave nothing behind


def test_reference_without_statistics_uses_its_images(tmp_path, weights, images):
    # ADM's rule: a reference holding only arr_0 gets statistics from its images
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=images[:4, :, :, :1])  # grey images work too
    net = InceptionV3.from_file(weights)
    real = reference_features(load_reference(ref), net, progress=False, use_cache=False)
    with torch.no_grad():
        x = torch.from_numpy(images[:4, :, :, :1]).permute(0, 3, 1, 2).float() / 255
        pool3 = net(x)["pool3"].double().numpy()
    np.testing.assert_allclose(real["pool3"], pool3, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(real["mu"], pool3.mean(0), rtol=1e-5, atol=1e-6)
    assert real["sigma"].shape == (2048, 2048) and real["sigma_s"].shape == (2023, 2023)


def test_digits_table_and_json(tmp_path, capsys):
    imgs, labels = real_digits()
    samples = tmp_path / "digits.npz"
    np.savez(samples, arr_0=imgs[:200, :, :, None], arr_1=labels[:200])
    out_json = tmp_path / "out" / "d.json"
    assert main(["evaluate", str(samples), "--ref", "digits", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "floor" in out and "SVC" in out
    d = json.loads(out_json.read_text())
    assert d["accuracy"] > 0.95 and d["svc_accuracy"] > 0.95
    # FD in the classifier's 64-d feature space, against all real digits: the formula written out
    from dits.evaluate.digits import load_classifier, to_inputs

    clf = load_classifier()
    want = _frechet(clf.features(to_inputs(imgs[:200])), clf.features(to_inputs(imgs)))
    assert want > 1e-3 and d["fd"] == pytest.approx(want, rel=1e-6)
    # and the class accuracy is the classifier's agreement with the labels given
    assert d["accuracy"] == pytest.approx(float((clf.predict(to_inputs(imgs[:200])) == labels[:200]).mean()))


def test_digits_check_prints_the_yardsticks(capsys):
    """`dits evaluate --digits-check`: the MLP's and an RBF SVC's accuracy on the held-out 20 %
    (recomputed here, the SVC fitted by scikit-learn on the 80 %), and the real-vs-real floor (a
    bootstrap of 1,000 class-uniform real digits against all of them, estimated here anew)."""
    import re

    from sklearn.svm import SVC

    from dits.evaluate.digits import SVC_C, SVC_GAMMA, load_classifier, split_indices, to_inputs

    assert main(["evaluate", "--digits-check"]) == 0
    out = capsys.readouterr().out
    mlp = float(re.search(r"MLP held-out accuracy +([0-9.]+)%", out).group(1)) / 100
    svc = float(re.search(r"SVC held-out accuracy +([0-9.]+)%", out).group(1)) / 100
    floor, spread = map(float, re.search(r"FD real-vs-real floor +([0-9.]+) ± ([0-9.]+) at n=1000", out).groups())
    imgs, labels = real_digits()
    x = to_inputs(imgs)
    train_idx, test_idx = split_indices()
    assert len(test_idx) == pytest.approx(0.2 * len(x), abs=10) and not set(train_idx) & set(test_idx)
    clf = load_classifier()
    assert mlp == pytest.approx(float((clf.predict(x[test_idx]) == labels[test_idx]).mean()), abs=1e-4)
    fitted = SVC(kernel="rbf", gamma=SVC_GAMMA, C=SVC_C).fit(x[train_idx], labels[train_idx])
    assert svc == pytest.approx(fitted.score(x[test_idx], labels[test_idx]), abs=1e-4)
    feats = clf.features(x)
    rng = np.random.default_rng(123)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    mine = np.mean([_frechet(feats[np.concatenate([rng.choice(i, 100) for i in by_class])], feats)
                    for _ in range(10)])
    assert 0 < spread < floor and abs(mine - floor) < 3 * spread, (mine, floor, spread)


def _kid_range(x, y):
    """KID of n_x = 3 reals against n_y = 4 fakes: each subset holds all 3 reals and 3 of the 4
    fakes, so the code's mean over random subsets lies between the smallest and the largest of
    these 4 unbiased MMD^2 values (cubic kernel (a.b / d + 1)^3)."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx = k(x, x)
    vals = []
    for drop in range(len(y)):
        yy = np.delete(y, drop, axis=0)
        kyy = k(yy, yy)
        vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * k(x, yy).mean())
    lo, hi = min(vals), max(vals)
    assert hi > lo
    return lo - 1e-6 * abs(lo), hi + 1e-6 * abs(hi)


def test_kid_max_images_input_mode_and_no_cache(tmp_path, weights, images, capsys, monkeypatch):
    """--max-images keeps a random subset in arr_0 (in order) but takes statistics over all images;
    --input-mode tf reaches the network; --kid is the cubic-kernel MMD written out above;
    --no-cache neither writes nor reads cached reference activations."""
    from dits.evaluate.cache import cache_dir
    from dits.evaluate.reference import _ref_cache_path, load_reference

    from dits.evaluate import reference as reference_mod

    monkeypatch.setenv("DITS_CACHE", str(tmp_path / "cache"))  # this test's own, empty cache
    # FID/sFID are not what this test is about (tests/test_evaluate_metrics.py checks them); their
    # 2048-d eigendecompositions would be most of its time
    monkeypatch.setattr(reference_mod, "frechet_distance", lambda *a, **k: 0.0)
    cached_files = lambda: sorted((cache_dir() / "ref_activations").glob("*.npz"))  # noqa: E731
    src = tmp_path / "src.npz"
    np.savez(src, arr_0=images)
    ref = tmp_path / "ref.npz"
    assert main(["evaluate", "--make-ref", str(src), "--out", str(ref), "--inception", str(weights),
                 "--max-images", "3", "--input-mode", "tf", "--no-cache", "--no-progress"]) == 0
    assert "statistics of 5 images, 3 kept" in capsys.readouterr().out
    assert cached_files() == []
    other = np.random.default_rng(1).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    pool_tf = _net_outputs(weights, np.concatenate([images, other]), "tf")[0]
    pool_fid = _net_outputs(weights, images)[0]
    with np.load(ref) as z:
        kept = z["arr_0"]
        assert json.loads(str(z["dits_meta"]))["input_mode"] == "tf"
        np.testing.assert_allclose(z["mu"], pool_tf[:5].mean(0), rtol=1e-5, atol=1e-6)  # all 5, tf mode
        assert np.abs(z["mu"] - pool_fid.mean(0)).max() > 1e-3                          # not the other mode
    rows = [next(i for i in range(5) if np.array_equal(k, images[i])) for k in kept]
    assert len(kept) == 3 and rows == sorted(set(rows))

    # a planted cache entry with wrong activations (shifted by 1): read only without --no-cache
    x, y = pool_tf[rows], pool_tf[5:]
    bogus = _ref_cache_path(load_reference(ref).path, InceptionV3.from_file(weights, input_mode="tf"))
    bogus.parent.mkdir(parents=True)
    np.savez(bogus, pool3=(x + 1).astype(np.float32), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    true, shifted = _kid_range(x, y), _kid_range(x + 1, y)
    assert true[1] < shifted[0] or shifted[1] < true[0]
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=other)
    argv = ["evaluate", str(samples), "--ref", str(ref), "--inception", str(weights), "--input-mode", "tf",
            "--kid", "--fd-method", "eigh", "--no-progress"]
    for flags, (lo, hi) in (([ "--no-cache"], true), ([], shifted)):
        assert main([*argv, *flags]) == 0
        assert "KID" in capsys.readouterr().out
        res = json.loads((tmp_path / "s.eval.ref.json").read_text())
        assert res["input_mode"] == "tf" and res["n_ref_images"] == 3
        assert lo <= res["kid"] <= hi and res["kid_std"] > 0, (flags, res["kid"], lo, hi)
        assert cached_files() == [bogus]
        with np.load(bogus) as z:  # --no-cache did not overwrite it either
            np.testing.assert_array_equal(z["pool3"], (x + 1).astype(np.float32))


def _fails(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_errors_are_one_line_exit_2(tmp_path, weights, images, capsys):
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=images)
    ref = tmp_path / "r.npz"
    np.savez(ref, arr_0=images)
    _fails(["evaluate", str(samples), "--ref", str(ref), "--no-progress"], capsys,
           "pytorch-fid", "--inception")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(weights.read_bytes()[:1000])
    _fails(["evaluate", str(samples), "--ref", str(ref), "--inception", str(bad)], capsys,
           "bad.pth")
    _fails(["evaluate"], capsys, "--make-ref")
    _fails(["evaluate", "--make-ref", str(tmp_path)], capsys, "--out")
    floats = tmp_path / "f.npz"
    np.savez(floats, arr_0=images.astype(np.float32))
    _fails(["evaluate", str(floats), "--ref", "digits"], capsys, "uint8")
    _fails(["evaluate", str(samples), "--ref", "digits"], capsys, "8×8")
    _fails(["evaluate", str(tmp_path / "missing.npz"), "--ref", "digits"], capsys, "missing.npz")
    notzip = tmp_path / "notzip.npz"
    notzip.write_bytes(b"hello")
    _fails(["evaluate", str(notzip), "--ref", "digits"], capsys, "notzip.npz")
