"""Tests for pipeline.data: every source through its real loader path, on local or tiny fake data.

No network: torchvision datasets are fed files in their on-disk format; only their md5 check is
relaxed to "file exists" because fake files cannot match the published checksums.
"""

from __future__ import annotations

import gzip
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import DataError, ImageSet, SOURCES, load_images, to_rgb

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)


class Logs(list):
    """Collects log lines; pass the instance as `log=`."""

    def __call__(self, line: str) -> None:
        self.append(line)


@pytest.fixture
def logs() -> Logs:
    return Logs()


# ----------------------------------------------------------------------------------------------
# fashion-mnist (Debian package)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist_train() -> ImageSet:
    return load_images("fashion-mnist", "train", log=lambda s: None)


@needs_fmnist
def test_fashion_mnist_full_splits(fmnist_train):
    ds = fmnist_train
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == set(range(10))
    assert ds.channels == 1 and ds.image_size == (28, 28) and len(ds) == 60000
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert ds.ids is None and ds.skipped == [] and ds.source == "fashion-mnist" and ds.split == "train"
    test = load_images("fashion-mnist", "test", log=lambda s: None)
    assert test.images.shape == (10000, 1, 28, 28) and np.bincount(test.labels).tolist() == [1000] * 10


@needs_fmnist
def test_fashion_mnist_subset_is_stratified_and_deterministic(fmnist_train):
    a = load_images("fashion-mnist", subset=1000, seed=3, log=lambda s: None)
    b = load_images("fashion-mnist", subset=1000, seed=3, log=lambda s: None)
    c = load_images("fashion-mnist", subset=1000, seed=4, log=lambda s: None)
    assert len(a) == 1000 and np.bincount(a.labels).tolist() == [100] * 10
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    # Kept images are the originals, in original order: find each in the full set. Fashion-MNIST has a few
    # exact duplicates, so each kept image takes the first copy after the previous image's position; that
    # succeeds for every image exactly when the kept images are the originals in their original order.
    copies: dict[bytes, list[int]] = {}
    for i, image in enumerate(fmnist_train.images):
        copies.setdefault(image.tobytes(), []).append(i)
    positions, previous = [], -1
    for image in a.images:
        later = [i for i in copies.get(image.tobytes(), []) if i > previous]
        assert later, f"image {len(positions)} of the subset is not an original after position {previous}"
        previous = later[0]
        positions.append(previous)
    assert np.all(np.diff(positions) > 0)
    np.testing.assert_array_equal(fmnist_train.labels[positions], a.labels)


@needs_fmnist
def test_fashion_mnist_classes_filter_keeps_label_values():
    ds = load_images("fashion-mnist", "test", classes=[0, 1, 2, 3, 4], log=lambda s: None)
    assert len(ds) == 5000 and set(np.unique(ds.labels)) == {0, 1, 2, 3, 4}
    ds = load_images("fashion-mnist", "test", classes=[7, 9], subset=10, log=lambda s: None)
    assert sorted(ds.labels.tolist()) == [7] * 5 + [9] * 5
    with pytest.raises(DataError, match="unknown class"):
        load_images("fashion-mnist", "test", classes=[10], log=lambda s: None)


def test_fashion_mnist_empty_root_is_data_error(tmp_path):
    with pytest.raises(DataError) as err:
        load_images("fashion-mnist", root=str(tmp_path), log=lambda s: None)
    msg = str(err.value)
    assert str(tmp_path) in msg and "dataset-fashion-mnist" in msg and "download" in msg


@needs_fmnist
def test_fingerprint_stable_and_sensitive():
    a = load_images("fashion-mnist", "test", subset=500, seed=0, log=lambda s: None)
    b = load_images("fashion-mnist", "test", subset=500, seed=0, log=lambda s: None)
    c = load_images("fashion-mnist", "test", subset=500, seed=1, log=lambda s: None)
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0
    assert a.fingerprint() != c.fingerprint()


@needs_fmnist
def test_fingerprint_fast_on_full_train(fmnist_train):
    t = time.perf_counter()
    fp = fmnist_train.fingerprint()
    assert time.perf_counter() - t < 2.0
    relabeled = ImageSet(
        fmnist_train.images, (fmnist_train.labels + 1) % 10, None, None, "fashion-mnist", "train", []
    )
    assert relabeled.fingerprint() != fp


# ----------------------------------------------------------------------------------------------
# mnist (idx files written here)
# ----------------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + np.asarray(arr.shape, dtype=">i4").tobytes()
    return header + arr.tobytes()


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    data = _idx_bytes(arr)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_mnist(folder: Path, rng) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n, gz in (("train", 30, True), ("t10k", 20, False)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[prefix] = (images, labels)
    return out


def test_mnist_from_idx_files_gz_and_plain(tmp_path, logs):
    want = _fake_mnist(tmp_path, np.random.default_rng(0))
    train = load_images("mnist", "train", root=str(tmp_path), log=logs)  # .gz files
    test = load_images("mnist", "test", root=str(tmp_path), log=logs)  # plain files
    assert train.images.shape == (30, 1, 28, 28) and test.images.shape == (20, 1, 28, 28)
    assert np.array_equal(train.images[:, 0], want["train"][0])
    assert np.array_equal(test.labels, want["t10k"][1].astype(np.int64))
    assert train.labels.dtype == np.int64 and len(train.class_names) == 10
    assert any("mnist/train" in line for line in logs)


def test_mnist_torchvision_layout_and_resize(tmp_path):
    _fake_mnist(tmp_path / "MNIST" / "raw", np.random.default_rng(1))
    ds = load_images("mnist", "test", root=str(tmp_path), image_size=32, log=lambda s: None)
    assert ds.images.shape == (20, 1, 32, 32) and ds.images.dtype == np.uint8


def test_mnist_truncated_idx_is_data_error(tmp_path):
    _fake_mnist(tmp_path, np.random.default_rng(2))
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_images("mnist", "test", root=str(tmp_path), log=lambda s: None)


def test_mnist_missing_is_data_error(tmp_path):
    with pytest.raises(DataError, match="download"):
        load_images("mnist", root=str(tmp_path / "nothing"), log=lambda s: None)


# ----------------------------------------------------------------------------------------------
# cifar10 / cifar100 / stl10 (torchvision's on-disk formats, written here)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def relaxed_md5(monkeypatch):
    """Fake files cannot match published md5 sums: accept any *existing* file instead.

    Patching the module-level helper (rather than `_check_integrity` alone) also covers CIFAR's
    metadata check, and a missing file still fails exactly as it would for real.
    """
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.stl10 as tv_stl10

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(tv_cifar, "check_integrity", exists)
    monkeypatch.setattr(tv_stl10, "check_integrity", exists)


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10_from_batch_files(tmp_path, relaxed_md5):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=4).tolist()
        _pickle(folder / name, {"data": imgs.reshape(4, -1), "labels": labels})
        batches[name] = (imgs, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names})

    train = load_images("cifar10", "train", root=str(tmp_path), log=lambda s: None)
    test = load_images("cifar10", "test", root=str(tmp_path), log=lambda s: None)
    assert train.images.shape == (20, 3, 32, 32) and train.images.flags.c_contiguous
    assert np.array_equal(train.images[:4], batches["data_batch_1"][0])
    assert np.array_equal(test.images, batches["test_batch"][0])
    assert test.labels.tolist() == batches["test_batch"][1] and test.labels.dtype == np.int64
    assert train.class_names == names


def test_cifar100_from_pickles(tmp_path, relaxed_md5):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    imgs = rng.integers(0, 256, size=(6, 3, 32, 32), dtype=np.uint8)
    fine = [0, 5, 99, 42, 7, 5]
    for name in ("train", "test"):
        _pickle(folder / name, {"data": imgs.reshape(6, -1), "fine_labels": fine, "coarse_labels": [0] * 6})
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    ds = load_images("cifar100", "test", root=str(tmp_path), classes=[5, 99], log=lambda s: None)
    assert ds.labels.tolist() == [5, 99, 5]
    assert np.array_equal(ds.images, imgs[[1, 2, 5]]) and len(ds.class_names) == 100


def test_cifar_missing_root_is_data_error(tmp_path):
    root = tmp_path / "no-cifar-here"
    with pytest.raises(DataError) as err:
        load_images("cifar10", root=str(root), log=lambda s: None)
    assert str(root) in str(err.value)


def test_stl10_binary_files(tmp_path, relaxed_md5):
    rng = np.random.default_rng(2)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    want = {}
    for name, n in (("train", 5), ("test", 3), ("unlabeled", 2)):
        imgs = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        # STL-10 stores each channel column-major; torchvision transposes back to (N, C, H, W).
        (folder / f"{name}_X.bin").write_bytes(imgs.transpose(0, 1, 3, 2).tobytes())
        labels = rng.integers(1, 11, size=n).astype(np.uint8)  # 1-based on disk
        if name != "unlabeled":
            (folder / f"{name}_y.bin").write_bytes(labels.tobytes())
        want[name] = (imgs, labels.astype(np.int64) - 1)

    train = load_images("stl10", "train", root=str(tmp_path), log=lambda s: None)
    assert train.images.shape == (5, 3, 96, 96) and train.images.flags.c_contiguous
    assert np.array_equal(train.images, want["train"][0])
    assert np.array_equal(train.labels, want["train"][1])
    assert train.class_names[0] == "airplane" and len(train.class_names) == 10  # no class_names.txt
    test = load_images("stl10", "test", root=str(tmp_path), log=lambda s: None)
    assert np.array_equal(test.images, want["test"][0])
    unl = load_images("stl10", "unlabeled", root=str(tmp_path), log=lambda s: None)
    assert unl.labels is None and np.array_equal(unl.images, want["unlabeled"][0])
    with pytest.raises(DataError, match="no labels"):
        load_images("stl10", "unlabeled", root=str(tmp_path), classes=[1], log=lambda s: None)


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


def test_digits_split_disjoint_and_complete():
    train = load_images("digits", "train", log=lambda s: None)
    test = load_images("digits", "test", log=lambda s: None)
    assert train.images.shape[1:] == (1, 8, 8) and test.images.shape[1:] == (1, 8, 8)
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.2 * 1797) < 10
    assert train.images.dtype == np.uint8 and train.images.max() == 255 and train.images.min() == 0
    # Stratified and independent of `seed`.
    assert set(np.unique(test.labels)) == set(range(10))
    again = load_images("digits", "test", seed=123, log=lambda s: None)
    assert np.array_equal(again.images, test.images)


def test_digits_split_is_partition():
    """train + test together hold every sklearn digit exactly once (multiset of rows), so they are disjoint."""
    from pipeline import data as D

    tr, _, _, _ = D._load_digits("train")
    te, _, _, _ = D._load_digits("test")
    allimgs = np.concatenate([tr, te])
    assert len(allimgs) == 1797
    from sklearn.datasets import load_digits

    raw = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)[:, None]
    # Multiset equality of rows means train and test together are exactly the dataset, once.
    a = np.sort(allimgs.reshape(1797, -1).view("S64").ravel())
    b = np.sort(raw.reshape(1797, -1).view("S64").ravel())
    assert np.array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------------------------


def _img(path: Path, size=(20, 12), color=(200, 30, 60), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def test_folder_class_subfolders(tmp_path, logs):
    _img(tmp_path / "dog" / "a.png")
    _img(tmp_path / "dog" / "nested" / "b.jpg")
    _img(tmp_path / "cat" / "c.PNG")
    _img(tmp_path / "cat" / "d.jpeg", size=(30, 40))
    (tmp_path / "cat" / "notes.txt").write_text("not an image, not listed")
    (tmp_path / "empty-class").mkdir()
    ds = load_images("folder", root=str(tmp_path), image_size=16, log=logs)
    assert ds.class_names == ["cat", "dog"]
    assert ds.images.shape == (4, 3, 16, 16) and ds.images.dtype == np.uint8
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert [Path(p).name for p in ds.ids] == ["c.PNG", "d.jpeg", "a.png", "b.jpg"]
    assert ds.skipped == [] and ds.split == "train"
    assert any("2 classes" in line for line in logs)
    dogs = load_images("folder", root=str(tmp_path), classes=[1], image_size=8, log=logs)
    assert dogs.labels.tolist() == [1, 1] and all("dog" in p for p in dogs.ids)


def test_folder_flat_unlabeled_default_size(tmp_path):
    for i in range(3):
        _img(tmp_path / f"{i}.png", size=(50 + i, 70))
    ds = load_images("folder", root=str(tmp_path), log=lambda s: None)
    assert ds.images.shape == (3, 3, 64, 64) and ds.labels is None and ds.class_names is None
    # Without train/ and test/ sub-folders, "test" is the same collection.
    test = load_images("folder", "test", root=str(tmp_path), log=lambda s: None)
    assert np.array_equal(test.images, ds.images) and test.split == "test"
    with pytest.raises(DataError, match="no labels"):
        load_images("folder", root=str(tmp_path), classes=[0], log=lambda s: None)


def test_folder_recursive_unlabeled(tmp_path):
    _img(tmp_path / "top.png")
    _img(tmp_path / "2021" / "x.png")
    _img(tmp_path / "2021" / "deeper" / "y.webp", fmt="WEBP")
    _img(tmp_path / "2022" / "z.bmp")
    _img(tmp_path / ".hidden" / "ignored.png")
    ds = load_images("folder", root=str(tmp_path), image_size=12, log=lambda s: None)
    assert len(ds) == 4 and ds.labels is None  # loose image at the top: not class folders
    assert not any(".hidden" in p for p in ds.ids)
    # A single sub-folder of images is a collection, not a one-class dataset.
    one = tmp_path / "one"
    _img(one / "photos" / "a.png")
    _img(one / "photos" / "sub" / "b.png")
    ds = load_images("folder", root=str(one), image_size=12, log=lambda s: None)
    assert len(ds) == 2 and ds.labels is None


def test_folder_explicit_splits(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                _img(tmp_path / split / cls / f"{i}.png")
    train = load_images("folder", "train", root=str(tmp_path), image_size=8, log=lambda s: None)
    test = load_images("folder", "test", root=str(tmp_path), image_size=8, log=lambda s: None)
    assert len(train) == 6 and len(test) == 4 and test.class_names == ["a", "b"]
    assert all("/val/" in p for p in test.ids)
    sub = load_images("folder", "train", root=str(tmp_path), image_size=8, subset=2, log=lambda s: None)
    assert sorted(sub.labels.tolist()) == [0, 1]


def test_folder_mixed_modes_become_rgb(tmp_path):
    _img(tmp_path / "rgba.png", mode="RGBA", color=(255, 0, 0, 0))  # fully transparent -> white
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(tmp_path / "palette.png")
    gray16 = Image.fromarray(np.full((24, 24), 32896, dtype=np.uint16))  # 128 * 257
    assert gray16.mode.startswith("I;16")
    gray16.save(tmp_path / "gray16.png")
    _img(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0), fmt="JPEG")
    _img(tmp_path / "la.png", mode="LA", color=(10, 255))
    _img(tmp_path / "bw.bmp", mode="1", color=1)
    _img(tmp_path / "gray.jpg", mode="L", color=77, size=(100, 33))
    ds = load_images("folder", root=str(tmp_path), image_size=16, log=lambda s: None)
    assert ds.skipped == [] and ds.images.shape == (7, 3, 16, 16) and ds.images.dtype == np.uint8
    by_name = {Path(p).stem: ds.images[i] for i, p in enumerate(ds.ids)}
    assert (by_name["rgba"] == 255).all()
    assert tuple(by_name["palette"][:, 0, 0]) == (0, 255, 0)
    assert (by_name["gray16"] == 128).all()
    r, g, b = by_name["cmyk"][:, 8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert (by_name["la"] == 10).all() and (by_name["bw"] == 255).all()
    assert abs(int(by_name["gray"].mean()) - 77) <= 1


def test_folder_skips_unreadable_files(tmp_path, logs):
    good = [_img(tmp_path / "good1.png"), _img(tmp_path / "good2.jpg")]
    (tmp_path / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.png").write_bytes(b"")
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(big)
    (tmp_path / "truncated.png").write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    big.unlink()
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG\n" * 20)

    ds = load_images("folder", root=str(tmp_path), image_size=16, log=logs)
    assert sorted(ds.ids) == sorted(str(p) for p in good) and len(ds) == 2
    bad = {Path(p).name: reason for p, reason in ds.skipped}
    assert set(bad) == {"corrupt.jpg", "empty.png", "truncated.png", "text.jpg"}
    assert "0 bytes" in bad["empty.png"]
    assert all(reason for reason in bad.values())
    for path, reason in ds.skipped:
        assert f"skipped {path}: {reason}" in logs
    assert any("skipped 4" in line for line in logs)


def test_folder_decompression_bomb_guard(tmp_path, logs):
    _img(tmp_path / "small.png", size=(20, 20))
    _img(tmp_path / "large.png", size=(100, 100))
    before = Image.MAX_IMAGE_PIXELS
    ds = load_images("folder", root=str(tmp_path), image_size=8, max_image_pixels=1000, log=logs)
    assert Image.MAX_IMAGE_PIXELS == before
    assert len(ds) == 1 and Path(ds.ids[0]).name == "small.png"
    [(path, reason)] = ds.skipped
    assert Path(path).name == "large.png" and "10000" in reason and "max_image_pixels=1000" in reason


def test_folder_errors(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError, match=str(missing)):
        load_images("folder", root=str(missing), log=lambda s: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="no image files"):
        load_images("folder", root=str(empty), log=lambda s: None)
    allbad = tmp_path / "allbad"
    allbad.mkdir()
    (allbad / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of 1"):
        load_images("folder", root=str(allbad), log=lambda s: None)
    with pytest.raises(DataError, match="needs root"):
        load_images("folder", log=lambda s: None)


def test_folder_fingerprint_stable(tmp_path):
    for i in range(4):
        _img(tmp_path / f"{i}.png", color=(i * 40, 0, 0))
    a = load_images("folder", root=str(tmp_path), image_size=8, log=lambda s: None)
    b = load_images("folder", root=str(tmp_path), image_size=8, log=lambda s: None)
    assert a.fingerprint() == b.fingerprint()
    assert a.subset([0, 1]).fingerprint() != a.fingerprint()


# ----------------------------------------------------------------------------------------------
# validation and helpers
# ----------------------------------------------------------------------------------------------


def test_unknown_source_and_split():
    with pytest.raises(DataError) as err:
        load_images("imagenet")
    assert all(s in str(err.value) for s in SOURCES)
    with pytest.raises(DataError, match="unlabeled"):
        load_images("stl10", "validation")
    with pytest.raises(DataError, match="train, test"):
        load_images("digits", "unlabeled")
    with pytest.raises(DataError, match="subset"):
        load_images("digits", subset=0)


def test_imageset_subset_and_to_rgb():
    images = np.arange(5 * 1 * 2 * 2, dtype=np.uint8).reshape(5, 1, 2, 2)
    ds = ImageSet(images, np.array([0, 1, 2, 3, 4]), list("abcde"), ["x"] * 5, "folder", "train", [("z", "bad")])
    sub = ds.subset([4, 1])
    assert sub.labels.tolist() == [4, 1] and sub.ids == ["e", "b"] and sub.skipped == [("z", "bad")]
    assert np.array_equal(sub.images, images[[4, 1]])
    mask = ds.subset(np.array([True, False, True, False, False]))
    assert mask.ids == ["a", "c"]
    rgb = to_rgb(images)
    assert rgb.shape == (5, 3, 2, 2) and (rgb[:, 2] == images[:, 0]).all()
    assert to_rgb(rgb) is rgb
    assert ds.channels == 1 and ds.image_size == (2, 2) and len(ds) == 5
    with pytest.raises(ValueError):
        ImageSet(images, np.array([0, 1]), None, None, "x", "train", [])


def test_photos_are_colour_tiles_with_disjoint_splits():
    train = load_images("photos", "train", image_size=32, log=lambda *_: None)
    test = load_images("photos", "test", image_size=32, log=lambda *_: None)
    assert train.images.shape[1:] == (3, 32, 32) and train.labels is None
    assert len(train) > 100 and len(test) > 20
    assert {i.split(":")[0] for i in train.ids}.isdisjoint({i.split(":")[0] for i in test.ids})
    # real colour: the channels differ
    assert np.abs(train.images[:, 0].astype(int) - train.images[:, 2].astype(int)).mean() > 5


def test_folder_label_rules(tmp_path):
    """`labels: none` makes any tree one unlabeled collection; `folders` labels by sub-folder name and refuses
    loose images; `auto` says in the log which rule it applied."""
    _img(tmp_path / "2021" / "a.png")
    _img(tmp_path / "2021" / "deep" / "b.png")
    _img(tmp_path / "2022" / "c.png")
    auto_log: list[str] = []
    auto = load_images("folder", root=str(tmp_path), image_size=8, log=auto_log.append)
    assert auto.class_names == ["2021", "2022"] and auto.labels.tolist() == [0, 0, 1]
    assert any("labels: auto found class sub-folders" in line for line in auto_log)
    none_log: list[str] = []
    none = load_images("folder", root=str(tmp_path), image_size=8, labels="none", log=none_log.append)
    assert none.labels is None and none.class_names is None and len(none) == 3
    assert any("unlabeled" in line and "labels: none" in line for line in none_log)
    assert np.array_equal(none.images, auto.images)
    with pytest.raises(DataError, match="classes"):
        load_images("folder", root=str(tmp_path), classes=[0], labels="none", log=lambda s: None)
    _img(tmp_path / "loose.png")
    with pytest.raises(DataError, match=r"labels: folders.*loose\.png"):
        load_images("folder", root=str(tmp_path), labels="folders", log=lambda s: None)
    assert load_images("folder", root=str(tmp_path), log=lambda s: None).labels is None  # auto: a collection


def test_manifest_source(tmp_path):
    """A CSV or Parquet manifest: relative paths, named labels as sorted classes, a split column, a row whose
    file is missing is a counted skip; bad manifests are DataErrors that name the file and the problem."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in ("a", "b", "c", "d"):
        _img(tmp_path / "imgs" / f"{name}.png", color=(ord(name), 0, 0))
    (tmp_path / "m.csv").write_text("path,label,split\nimgs/a.png,zebra,train\nimgs/b.png,ant,train\n"
                                    "imgs/gone.png,ant,train\nimgs/c.png,zebra,test\n")
    train = load_images("manifest", root=str(tmp_path / "m.csv"), image_size=8, log=lambda s: None)
    assert train.class_names == ["ant", "zebra"] and train.labels.tolist() == [1, 0]
    assert [Path(p).name for p in train.ids] == ["a.png", "b.png"]
    assert [(Path(p).name, why) for p, why in train.skipped] == [("gone.png", "file not found")]
    test = load_images("manifest", "test", root=str(tmp_path / "m.csv"), image_size=8, log=lambda s: None)
    assert len(test) == 1 and test.images[0, 0, 0, 0] == ord("c")
    pq.write_table(pa.table({"path": [str(tmp_path / "imgs" / "d.png")], "label": [3]}), tmp_path / "m.parquet")
    parquet = load_images("manifest", root=str(tmp_path / "m.parquet"), image_size=8, log=lambda s: None)
    assert parquet.labels.tolist() == [3] and parquet.class_names is None
    assert load_images("manifest", root=str(tmp_path / "m.parquet"), labels="none", log=lambda s: None).labels is None

    (tmp_path / "nopath.csv").write_text("file,label\nimgs/a.png,1\n")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really")
    for root, message in ((tmp_path / "nopath.csv", "no 'path' column"), (tmp_path / "missing.csv", "does not exist"),
                          (tmp_path / "garbage.parquet", "cannot read manifest"), (tmp_path / "imgs", "is a directory")):
        with pytest.raises(DataError, match=message):
            load_images("manifest", root=str(root), log=lambda s: None)
    with pytest.raises(DataError, match="no rows with split 'val'"):
        load_images("manifest", "val", root=str(tmp_path / "m.csv"), log=lambda s: None)


def test_sharded_images_read_exactly_the_rows_asked_for(tmp_path):
    """The stream backend's reader: any index (int, negative, slice, mask, unsorted with repeats) gives the rows
    a numpy array would, across shards and with few files open; a truncated shard is an error, not garbage."""
    import copy

    from pipeline.pixel_cache import ShardedImages

    rng = np.random.default_rng(0)
    full = rng.integers(0, 256, (23, 3, 4, 5), dtype=np.uint8)
    cuts = [0, 10, 17, 23]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        np.save(tmp_path / f"s{i}.npy", full[a:b])
    shard = np.repeat(np.arange(3), np.diff(cuts))
    offset = np.concatenate([np.arange(b - a) for a, b in zip(cuts, cuts[1:])])
    images = ShardedImages(str(tmp_path), [f"s{i}.npy" for i in range(3)], shard, offset, (3, 4, 5))
    images.MAX_OPEN_FILES = 2  # forces closing and reopening files
    assert images.shape == full.shape and len(images) == 23
    for key in (5, -1, slice(3, 19, 2), slice(None), np.array([22, 0, 9, 10, 9, 16, 17]), full[:, 0, 0, 0] > 128):
        np.testing.assert_array_equal(images[key], full[key])
    view = copy.deepcopy(images.take(np.array([4, 18, 11])))  # through __getstate__, as pickling to a worker
    np.testing.assert_array_equal(np.asarray(view), full[[4, 18, 11]])
    with pytest.raises(IndexError):
        images[np.array([23])]
    np.save(tmp_path / "s1.npy", full[10:17])
    (tmp_path / "s1.npy").write_bytes((tmp_path / "s1.npy").read_bytes()[:-30])
    fresh = ShardedImages(str(tmp_path), [f"s{i}.npy" for i in range(3)], shard, offset, (3, 4, 5))
    with pytest.raises(OSError, match="truncated"):
        fresh[np.array([16])]


def test_folder_by_uri(tmp_path):
    """A folder given as a pyarrow filesystem URI lists and decodes like the same local path."""
    for cls in ("a", "b"):
        for i in range(2):
            _img(tmp_path / cls / f"{i}.png", color=(40 * i, 100, 200 if cls == "b" else 0))
    local = load_images("folder", root=str(tmp_path), image_size=8, log=lambda s: None)
    remote = load_images("folder", root=f"file://{tmp_path}", image_size=8, log=lambda s: None)
    np.testing.assert_array_equal(remote.images, local.images)
    assert remote.labels.tolist() == local.labels.tolist() and remote.class_names == ["a", "b"]
    assert remote.ids[0].startswith("file://") and remote.fingerprint() == local.fingerprint()
