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
    assert res["n_samples"] == 5 and res["is_splits"] == 1 and res["inception_score"] >= 1.0
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
    assert d["accuracy"] > 0.95 and d["svc_accuracy"] > 0.95 and d["fd"] >= 0


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
