"""Image folders: labels from class folders, ADM centre crop, flips, bad input."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dits.data.folder import ImageFolderDataset, center_crop_arr, scan_folder
from dits.errors import UserError


def photo(h=120, w=160, which=0, top=0, left=0):
    from sklearn.datasets import load_sample_images
    return load_sample_images().images[which][top:top + h, left:left + w]


def make_folder(root, classes=("dog", "cat"), per_class=3, size=(60, 80)):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            ext = ("jpg", "PNG", "jpeg", "bmp", "webp")[k % 5]
            Image.fromarray(photo(*size, which=c % 2, top=10 * k, left=20 * k)).save(root / name / f"im{k}.{ext}")
    return root


def test_class_folders_give_sorted_labels(tmp_path):
    root = make_folder(tmp_path / "data", classes=("dog", "cat", "ant"), per_class=5)
    (root / ".hidden").mkdir()
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".DS_Store.jpg").write_bytes(b"")
    ds = ImageFolderDataset(root, 32)
    assert ds.classes == ["ant", "cat", "dog"] and ds.num_classes == 3
    assert len(ds) == 15 and ds.labels == [0] * 5 + [1] * 5 + [2] * 5
    x, y = ds[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.01


def test_flat_folder_is_unconditional(tmp_path):
    for k in range(3):
        Image.fromarray(photo(50, 50, left=30 * k)).save(tmp_path / f"{k}.png")
    ds = ImageFolderDataset(tmp_path, 16, channels=1)
    assert ds.classes == [] and ds.num_classes == 0 and len(ds) == 3
    x, y = ds[0]
    assert x.shape == (1, 16, 16) and y == 0


def test_nested_images_count_for_their_class_and_loose_files_warn(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=1)
    (root / "b" / "sub").mkdir()
    Image.fromarray(photo(40, 40)).save(root / "b" / "sub" / "deep.jpg")
    Image.fromarray(photo(40, 40)).save(root / "loose.jpg")
    with pytest.warns(UserWarning, match="ignoring 1 image"):
        files, labels, classes = scan_folder(root)
    assert [f.name for f in files] == ["im0.jpg", "im0.jpg", "deep.jpg"] and labels == [0, 1, 1]


def test_center_crop_arr_follows_adm():
    # Box halving while the short side >= 2x target, then bicubic to the target, then centre.
    img = Image.fromarray(photo(300, 420))
    out = center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    half = img.resize((210, 150), resample=Image.BOX)             # 300 >= 128: halve
    quarter = half.resize((105, 75), resample=Image.BOX)          # 150 >= 128: halve again
    small = quarter.resize((round(105 * 64 / 75), 64), resample=Image.BICUBIC)  # 75 < 128: bicubic
    left = (small.width - 64) // 2
    np.testing.assert_array_equal(out, np.asarray(small)[:, left:left + 64])
    # An image already at the target size is unchanged; a smaller one is upscaled.
    sq = photo(32, 32)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(sq), 32), sq)
    assert center_crop_arr(Image.fromarray(photo(20, 30)), 32).shape == (32, 32, 3)
    # Centred: a wide image split left red / right blue keeps equal halves.
    arr = np.zeros((40, 100, 3), np.uint8)
    arr[:, :50, 0] = 255
    arr[:, 50:, 2] = 255
    crop = center_crop_arr(Image.fromarray(arr), 40)
    assert (crop[:, :20, 0] == 255).all() and (crop[:, 20:, 2] == 255).all()


def test_flips_are_random_seedable_and_mirror(tmp_path):
    root = make_folder(tmp_path / "d", per_class=1)
    plain = ImageFolderDataset(root, 32, flip=False)
    flipping = ImageFolderDataset(root, 32, flip=True)
    base = plain[0][0]
    torch.manual_seed(0)
    seq1 = [torch.equal(flipping[0][0], base) for _ in range(20)]
    torch.manual_seed(0)
    seq2 = [torch.equal(flipping[0][0], base) for _ in range(20)]
    assert seq1 == seq2 and 0 < sum(seq1) < 20
    mirrored = [flipping[0][0] for _ in range(10)]
    assert any(torch.equal(m, base.flip(-1)) for m in mirrored)
    g = torch.Generator().manual_seed(5)
    own = ImageFolderDataset(root, 32, generator=g)
    assert len({torch.equal(own[0][0], base) for _ in range(20)}) == 2


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", 32)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        ImageFolderDataset(tmp_path / "f.txt", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", 32)
    root = make_folder(tmp_path / "d", per_class=1)
    (root / "zebra").mkdir()
    with pytest.raises(UserError, match="zebra has no images"):
        ImageFolderDataset(root, 32)


def test_small_images(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2, size=(60, 80))
    Image.fromarray(photo(20, 40)).save(root / "cat" / "tiny.png")
    with pytest.raises(UserError, match=r"tiny\.png is 40x20, smaller than the 32px crop"):
        ImageFolderDataset(root, 32, small="error")
    with pytest.warns(UserWarning, match="1 image.*upscaled"):
        assert len(ImageFolderDataset(root, 32)) == 5
    with pytest.warns(UserWarning, match="skipped"):
        assert len(ImageFolderDataset(root, 32, small="skip")) == 4


def test_corrupt_files_are_skipped_or_replaced(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2)
    (root / "cat" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        ds = ImageFolderDataset(root, 32)
    assert len(ds) == 4 and all(f.name != "broken.jpg" for f in ds.files)
    # A file that fails only when decoded (truncated data; or any bad file without the
    # header scan): training gets the next image, with its own label, and a warning.
    good = root / "dog" / "im0.jpg"
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 3])
    ds = ImageFolderDataset(root, 32, flip=False, verify=False)
    i = ds.files.index(good)
    with pytest.warns(UserWarning, match="cannot decode"):
        x, y = ds[i]
    assert torch.equal(x, ds[i + 1][0]) and y == ds.labels[i + 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[i]  # warned once per file


def test_bad_arguments(tmp_path):
    root = make_folder(tmp_path / "d", per_class=1)
    for kwargs, message in ((dict(channels=4), "channels"), (dict(small="crop"), "small"),
                            (dict(image_size=0), "positive")):
        args = dict(image_size=32) | kwargs
        with pytest.raises(UserError, match=message):
            ImageFolderDataset(root, **args)
