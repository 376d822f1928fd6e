"""The FID Inception-v3: key set and shapes of the standard weights file, TF quirks,
outputs, and one clear line for missing, corrupt or foreign weights.

The real ``pt_inception-2015-12-05-6726825d.pth`` is not available offline, so the
state dicts here are built from an independent description of its layout (torchvision
Inception-v3 naming, 1008 classes, no aux head) filled with random values.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dits.errors import UserError
from dits.evaluate import InceptionV3
from dits.evaluate.inception import WEIGHTS_NAME, resize_tf1, resolve_weights_path


# --------------------------------------------------------------------------- the layout
def _units():
    """(name, in, out, kh, kw) of every conv+BN unit of the FID Inception-v3."""
    units = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3),
             ("Conv2d_2b_3x3", 32, 64, 3, 3), ("Conv2d_3b_1x1", 64, 80, 1, 1),
             ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        units += [(f"{name}.{b}", i, o, h, w) for b, i, o, h, w in (
            ("branch1x1", cin, 64, 1, 1), ("branch5x5_1", cin, 48, 1, 1),
            ("branch5x5_2", 48, 64, 5, 5), ("branch3x3dbl_1", cin, 64, 1, 1),
            ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3),
            ("branch_pool", cin, pool, 1, 1))]
    units += [(f"Mixed_6a.{b}", i, o, h, w) for b, i, o, h, w in (
        ("branch3x3", 288, 384, 3, 3), ("branch3x3dbl_1", 288, 64, 1, 1),
        ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3))]
    for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        units += [(f"{name}.{b}", i, o, h, w) for b, i, o, h, w in (
            ("branch1x1", 768, 192, 1, 1), ("branch7x7_1", 768, c, 1, 1),
            ("branch7x7_2", c, c, 1, 7), ("branch7x7_3", c, 192, 7, 1),
            ("branch7x7dbl_1", 768, c, 1, 1), ("branch7x7dbl_2", c, c, 7, 1),
            ("branch7x7dbl_3", c, c, 1, 7), ("branch7x7dbl_4", c, c, 7, 1),
            ("branch7x7dbl_5", c, 192, 1, 7), ("branch_pool", 768, 192, 1, 1))]
    units += [(f"Mixed_7a.{b}", i, o, h, w) for b, i, o, h, w in (
        ("branch3x3_1", 768, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3),
        ("branch7x7x3_1", 768, 192, 1, 1), ("branch7x7x3_2", 192, 192, 1, 7),
        ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3))]
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        units += [(f"{name}.{b}", i, o, h, w) for b, i, o, h, w in (
            ("branch1x1", cin, 320, 1, 1), ("branch3x3_1", cin, 384, 1, 1),
            ("branch3x3_2a", 384, 384, 1, 3), ("branch3x3_2b", 384, 384, 3, 1),
            ("branch3x3dbl_1", cin, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
            ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1),
            ("branch_pool", cin, 192, 1, 1))]
    return units


def standard_shapes() -> dict:
    shapes = {}
    for name, cin, cout, kh, kw in _units():
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{p}"] = (cout,)
        shapes[f"{name}.bn.num_batches_tracked"] = ()
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


def random_state_dict(seed: int = 0) -> dict:
    """Random weights in the standard layout, scaled (He) so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in standard_shapes().items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0, dtype=torch.long)
        elif key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            sd[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("bn.weight"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        else:  # BN bias / running mean, fc
            sd[key] = torch.randn(shape, generator=g) * 0.1
    return sd



@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict()


@pytest.fixture(scope="module")
def net(state_dict):
    m = InceptionV3()
    m.load_state_dict(state_dict, strict=True)
    return m


@pytest.fixture(autouse=True)
def _no_weights_anywhere(tmp_path, monkeypatch):
    # Keep a real weights file in the user's home from changing what these tests see.
    monkeypatch.delenv("DITS_INCEPTION", raising=False)
    monkeypatch.setenv("DITS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


# --------------------------------------------------------------------------- key set
def test_key_set_and_shapes_are_the_standard_files():
    own = {k: tuple(v.shape) for k, v in InceptionV3().state_dict().items()}
    assert own == standard_shapes()
    assert sum(v.numel() for v in InceptionV3().state_dict().values()) == 23885486


def test_strict_load_from_file_round_trips(tmp_path, state_dict):
    sd = state_dict
    path = tmp_path / WEIGHTS_NAME
    torch.save(sd, path)
    with pytest.warns(UserWarning, match="sha256"):  # random weights: not the real file
        loaded = InceptionV3.from_file(path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not loaded.training


def test_files_without_batchnorm_counters_load_too(state_dict):
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    InceptionV3().load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------- forward
def test_outputs_and_their_definitions(net):
    acts = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: acts.__setitem__("b1x1", o))
    net.Mixed_7c.register_forward_hook(lambda m, i, o: acts.__setitem__("7c", o))
    x = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = net(x)
    net.Mixed_6d.branch1x1._forward_hooks.clear()
    net.Mixed_7c._forward_hooks.clear()
    assert out["pool3"].shape == (2, 2048)
    assert out["spatial"].shape == (2, 2023)
    assert out["logits"].shape == (2, 1008)
    assert acts["b1x1"].shape == (2, 192, 17, 17)  # 299 px in -> 17×17 at mixed_6
    # spatial = first 7 channels of Mixed_6d's 1x1 branch, flattened (row, col, channel)
    expected = acts["b1x1"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(out["spatial"], expected)
    torch.testing.assert_close(out["pool3"], acts["7c"].mean(dim=(2, 3)))
    torch.testing.assert_close(out["logits"], out["pool3"] @ net.fc.weight.T + net.fc.bias)
    torch.testing.assert_close(out["logits_unbiased"], out["logits"] - net.fc.bias)
    assert out["pool3"].std(dim=0).mean() > 0  # the two images do differ


def test_pooling_branches_follow_the_tf_graph(net):
    """A/C/first-E blocks average without counting padding; the last E block max-pools."""
    seen = {}

    def grab(name):
        return lambda m, args: seen.__setitem__(name, args[0])

    hooks = [net.Mixed_5b.branch_pool.conv.register_forward_pre_hook(grab("5b")),
             net.Mixed_6b.branch_pool.conv.register_forward_pre_hook(grab("6b")),
             net.Mixed_7b.branch_pool.conv.register_forward_pre_hook(grab("7b")),
             net.Mixed_7c.branch_pool.conv.register_forward_pre_hook(grab("7c"))]
    g = torch.Generator().manual_seed(1)
    inputs = {"5b": torch.rand(1, 192, 5, 5, generator=g), "6b": torch.rand(1, 768, 5, 5, generator=g),
              "7b": torch.rand(1, 1280, 4, 4, generator=g), "7c": torch.rand(1, 2048, 4, 4, generator=g)}
    with torch.no_grad():
        for name, x in inputs.items():
            getattr(net, f"Mixed_{name}")(x)
    for h in hooks:
        h.remove()
    for name in ("5b", "6b", "7b"):
        avg = F.avg_pool2d(inputs[name], 3, 1, 1, count_include_pad=False)
        torch.testing.assert_close(seen[name], avg)
        # corners differ from the padding-counting average: the quirk is observable
        assert not torch.allclose(seen[name], F.avg_pool2d(inputs[name], 3, 1, 1))
    torch.testing.assert_close(seen["7c"], F.max_pool2d(inputs["7c"], 3, 1, 1))


# --------------------------------------------------------------------------- an independent forward
# The TF graph's Inception-v3, written out here from its definition as a table of operations on a
# plain dict of weights, in float64: conv -> BatchNorm (eps 1e-3) -> ReLU units with SAME padding
# unless marked VALID, 3x3 stride-1 average pools that divide by the number of real pixels in the
# window (computed here as a sum over a count), max pools, channel concatenation in branch order.
_STEM = [("Conv2d_1a_3x3", 2, "valid"), ("Conv2d_2a_3x3", 1, "valid"), ("Conv2d_2b_3x3", 1, "same"), "maxpool_s2",
         ("Conv2d_3b_1x1", 1, "valid"), ("Conv2d_4a_3x3", 1, "valid"), "maxpool_s2"]
# per block kind: branches, each a list of steps; a step is a unit name (stride 1, SAME), (unit, 2)
# for a stride-2 VALID unit, or a pool
_BRANCHES = {
    "A": [["branch1x1"], ["branch5x5_1", "branch5x5_2"], ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
          ["avgpool", "branch_pool"]],
    "B": [[("branch3x3", 2)], ["branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3", 2)], ["maxpool_s2"]],
    "C": [["branch1x1"], ["branch7x7_1", "branch7x7_2", "branch7x7_3"],
          ["branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"],
          ["avgpool", "branch_pool"]],
    "D": [["branch3x3_1", ("branch3x3_2", 2)],
          ["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", ("branch7x7x3_4", 2)], ["maxpool_s2"]],
}
_BLOCKS = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
           ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E avg"),
           ("Mixed_7c", "E max")]


def _ref_unit(sd, name, x, stride=1, same=True):
    w = sd[f"{name}.conv.weight"].double()
    pad = (w.shape[2] // 2, w.shape[3] // 2) if same else 0
    x = F.conv2d(x, w, stride=stride, padding=pad)
    bn = {k: sd[f"{name}.bn.{k}"].double()[None, :, None, None]
          for k in ("weight", "bias", "running_mean", "running_var")}
    x = (x - bn["running_mean"]) / torch.sqrt(bn["running_var"] + 1e-3) * bn["weight"] + bn["bias"]
    return torch.where(x > 0, x, torch.zeros_like(x))


def _ref_avgpool(x):
    """3x3, stride 1, zero padding 1, divided by how many of the 9 window pixels are real."""
    ones = torch.ones(1, 1, *x.shape[2:], dtype=x.dtype)
    box = torch.ones(1, 1, 3, 3, dtype=x.dtype)
    count = F.conv2d(ones, box, padding=1)
    total = F.conv2d(x.reshape(-1, 1, *x.shape[2:]), box, padding=1).reshape(x.shape)
    return total / count


def _ref_maxpool(x, stride, pad):
    x = F.pad(x, (pad,) * 4, value=float("-inf"))
    return x.unfold(2, 3, stride).unfold(3, 3, stride).amax(dim=(-1, -2))


def _ref_step(sd, block, step, x):
    if step == "avgpool":
        return _ref_avgpool(x)
    if step == "maxpool":
        return _ref_maxpool(x, 1, 1)
    if step == "maxpool_s2":
        return _ref_maxpool(x, 2, 0)
    if isinstance(step, tuple):
        return _ref_unit(sd, f"{block}.{step[0]}", x, stride=step[1], same=False)
    return _ref_unit(sd, f"{block}.{step}", x)


def _ref_block(sd, block, kind, x):
    if kind.startswith("E"):  # 1x1; 1x1 -> (1x3 | 3x1); 1x1 -> 3x3 -> (1x3 | 3x1); pool -> 1x1
        u = lambda n, v: _ref_unit(sd, f"{block}.{n}", v)  # noqa: E731
        b3, bd = u("branch3x3_1", x), u("branch3x3dbl_2", u("branch3x3dbl_1", x))
        pooled = _ref_avgpool(x) if kind == "E avg" else _ref_maxpool(x, 1, 1)
        return torch.cat([u("branch1x1", x), u("branch3x3_2a", b3), u("branch3x3_2b", b3),
                          u("branch3x3dbl_3a", bd), u("branch3x3dbl_3b", bd), u("branch_pool", pooled)], 1), None
    outs = []
    for branch in _BRANCHES[kind]:
        v = x
        for step in branch:
            v = _ref_step(sd, block, step, v)
        outs.append(v)
    return torch.cat(outs, 1), outs[0]


def reference_inception(sd, x299):
    """pool3, spatial (first 7 channels of Mixed_6d's 1x1 branch, row/column/channel order) and
    logits of the TF graph on an already resized N x 3 x S x S input in [-1, 1], in float64."""
    x = x299.double()
    for step in _STEM:
        x = _ref_maxpool(x, 2, 0) if step == "maxpool_s2" else _ref_unit(sd, step[0], x, step[1], step[2] == "same")
    spatial = None
    for block, kind in _BLOCKS:
        x, first = _ref_block(sd, block, kind, x)
        if block == "Mixed_6d":
            spatial = first[:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    pool3 = x.mean(dim=(2, 3))
    logits = pool3 @ sd["fc.weight"].double().T + sd["fc.bias"].double()
    return pool3, spatial, logits


def test_forward_equals_the_graph_written_out_in_float64(net, state_dict, monkeypatch):
    """The whole forward (pytorch-fid input mode) against the reference above. The resize target
    is made 139 px instead of 299 to keep this fast; every block still sees more than 1x1
    (Mixed_7b/7c run at 3x3), so every pooling choice and padding rule shows."""
    from dits.evaluate import inception

    monkeypatch.setattr(inception, "RESIZE_TO", 139)
    x = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = net(x)
    resized = 2 * F.interpolate(x.double(), size=(139, 139), mode="bilinear", align_corners=False) - 1
    pool3, spatial, logits = reference_inception(state_dict, resized)
    assert spatial.shape == (2, 7 * 7 * 7) and pool3.std(dim=0).mean() > 1e-3  # the two images do differ
    torch.testing.assert_close(out["pool3"].double(), pool3, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["spatial"].double(), spatial, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logits"].double(), logits, rtol=1e-4, atol=1e-4)


def test_grey_input_is_treated_as_rgb(net):
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = net(x)["pool3"], net(x.expand(-1, 3, -1, -1))["pool3"]
    torch.testing.assert_close(a, b)
    with pytest.raises(UserError, match="N×3×H×W"):
        net(torch.rand(1, 4, 8, 8))


def test_resize_tf1_uses_the_legacy_grid():
    row = torch.tensor([[[[1.0, 3.0]]]])
    # output i samples input i * 2/4: 0, 0.5, 1, 1.5 -> 1, 2, 3, 3 (clamped)
    torch.testing.assert_close(resize_tf1(row, 4)[0, 0, 0], torch.tensor([1.0, 2.0, 3.0, 3.0]))
    x = torch.rand(1, 3, 299, 299)
    torch.testing.assert_close(resize_tf1(x, 299), x)
    with pytest.raises(UserError):
        InceptionV3(input_mode="keras")


# --------------------------------------------------------------------------- bad files
def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(UserError) as e:
        resolve_weights_path(None)
    msg = _one_line(e)
    assert "pytorch-fid" in msg and WEIGHTS_NAME in msg and "DITS_INCEPTION" in msg
    with pytest.raises(UserError) as e:
        InceptionV3.from_file(tmp_path / "nope.pth")
    assert "nope.pth" in _one_line(e)
    # the environment variable is honoured
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    monkeypatch.setenv("DITS_INCEPTION", str(path))
    assert resolve_weights_path(None) == path


def test_corrupt_weights_give_one_line(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"x": torch.zeros(1000)}, good)
    data = good.read_bytes()
    for name, payload in (("truncated.pth", data[: len(data) // 2]),
                          ("garbage.pth", b"\x00not a checkpoint" * 50), ("empty.pth", b"")):
        bad = tmp_path / name
        bad.write_bytes(payload)
        with pytest.raises(UserError) as e:
            InceptionV3.from_file(bad)
        assert name in _one_line(e)


def test_foreign_weights_give_one_line(tmp_path, state_dict):
    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(UserError) as e:
        InceptionV3.from_file(foreign)
    assert "not the FID Inception" in _one_line(e)
    # right keys, one wrong shape (e.g. torchvision's 1000-class head)
    sd = dict(state_dict)
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    with pytest.raises(UserError) as e:
        InceptionV3().load_state_dict(sd)
    assert "wrong shape" in _one_line(e) and "fc." in str(e.value)
    # a pickled object is refused by weights_only loading, not executed
    obj = tmp_path / "object.pth"
    torch.save(torch.nn.Linear(2, 2), obj)
    with pytest.raises(UserError) as e:
        InceptionV3.from_file(obj)
    _one_line(e)
