"""Data sources for pretraining and evaluation.

Every source is turned into one in-memory :class:`ImageSet` of uint8 NCHW arrays, so the rest of the
pipeline (pretext training, embedding, clustering) never has to know where pixels came from, and
:meth:`ImageSet.fingerprint` can identify exactly which data a model saw.

Bad or missing inputs raise :class:`DataError` (the CLI maps it to exit code 2) with a message that
names the source and path and says how to fix it.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.images import IMAGE_EXTENSIONS, DataError, ImageSet  # re-exported: the types every source returns

__all__ = [
    "DataError",
    "ImageSet",
    "SOURCES",
    "SPLITS",
    "IMAGE_EXTENSIONS",
    "load_images",
    "to_rgb",
]


SOURCES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "stl10", "digits", "photos", "folder", "manifest")
FILE_SOURCES = ("folder", "manifest")  # decoded from image files (pipeline/image_files.py); either backend

# Splits each source understands; STL10 also ships a large unlabeled split meant for pretraining.
SPLITS: dict[str, tuple[str, ...]] = {s: ("train", "test") for s in SOURCES}
SPLITS["stl10"] = ("train", "test", "unlabeled")


DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# Same order as torchvision.datasets.FashionMNIST.classes (hard-coded: no dataset object needed).
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [
    "0 - zero",
    "1 - one",
    "2 - two",
    "3 - three",
    "4 - four",
    "5 - five",
    "6 - six",
    "7 - seven",
    "8 - eight",
    "9 - nine",
]
# Fallback when stl10_binary/class_names.txt is absent (torchvision then sets no .classes).
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _cache_root(source: str) -> Path:
    """Default download/cache location, kept per source so datasets never collide."""
    return Path("~/.cache/sslpipe").expanduser() / source


# ----------------------------------------------------------------------------------------------
# ImageSet
# ----------------------------------------------------------------------------------------------


def to_rgb(images: np.ndarray) -> np.ndarray:
    """Repeat a single channel to 3 (N, 1, H, W) -> (N, 3, H, W); 3-channel input is returned as is.

    Many backbones expect RGB; doing this lazily keeps grayscale sets 3x smaller in memory.
    """
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W), got shape {images.shape}")
    if images.shape[1] == 3:
        return images
    if images.shape[1] == 1:
        return np.repeat(images, 3, axis=1)
    raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def load_images(
    source: str,
    split: str = "train",
    *,
    root: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    subset: int | None = None,
    seed: int = 0,
    classes: list[int] | None = None,
    max_image_pixels: int = 89_478_485,
    labels: str = "auto",
    log: Callable[[str], object] = print,
) -> ImageSet:
    """Load one split of a data source as an :class:`ImageSet`.

    - ``image_size``: array sources keep their native size when None, otherwise they are resized
      (shorter side, bilinear with antialias) and center-cropped to a square; folders always are,
      default 64.
    - ``classes``: keep only these label values (labels are not renumbered, so they still match
      ``class_names``).
    - ``subset``: seeded random subset of that size, stratified by label when there are labels,
      returned in original order. For folders it is drawn before decoding (so huge folders stay
      cheap); files that then fail to decode make the result a little smaller.
    - ``max_image_pixels``: folder images larger than this are skipped (decompression-bomb guard).
    - ``labels``: how a folder's labels are found (``auto | folders | none``, see
      :func:`pipeline.image_files.list_folder`); a manifest's ``none`` ignores its label column.

    Folders and manifests are decoded here, on this machine (the `memory` backend); the `stream` backend
    builds a pixel cache with Ray Data instead (pipeline/pixel_cache.py).
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; known sources: {', '.join(SOURCES)}")
    if source != "manifest" and split not in SPLITS[source]:  # a manifest's split column names its own
        raise DataError(f"unknown split {split!r} for source {source!r}; known splits: {', '.join(SPLITS[source])}")
    if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if subset is not None and (not isinstance(subset, (int, np.integer)) or subset < 1):
        raise DataError(f"subset must be a positive integer, got {subset!r}")
    if classes is not None:
        if isinstance(classes, (str, bytes)) or not all(isinstance(c, (int, np.integer)) for c in classes):
            raise DataError(f"classes must be a list of integer labels, got {classes!r}")
        if len(classes) == 0:
            raise DataError("classes is an empty list; leave it out to keep all classes")

    if source in FILE_SOURCES:
        from pipeline.image_files import decode_listing, list_folder, read_manifest

        lister = list_folder if source == "folder" else read_manifest
        listing = select_listing(lister(root, split, labels, log), classes, subset, seed)
        return decode_listing(listing, source=source, split=split, image_size=image_size,
                              max_image_pixels=max_image_pixels, log=log)

    if source in ("fashion-mnist", "mnist"):
        images, labels, class_names, where = _load_idx_source(source, split, root, download, log)
    elif source in ("cifar10", "cifar100"):
        images, labels, class_names, where = _load_cifar(source, split, root, download)
    elif source == "stl10":
        images, labels, class_names, where = _load_stl10(split, root, download)
    elif source == "photos":
        images, labels, class_names, where, ids = _load_photos(split, image_size or 64)
    else:  # digits
        images, labels, class_names, where = _load_digits(split)
    if source != "photos":
        ids = None

    keep = _select(labels, class_names, classes, subset, seed, source, len(images))
    if keep is not None:
        images = images[keep]
        labels = None if labels is None else labels[keep]
        ids = None if ids is None else [ids[i] for i in keep]
    if len(images) == 0:
        raise DataError(f"{source} {split}: no images left after filtering (classes={classes})")
    if image_size is not None and images.shape[2:] != (image_size, image_size):
        images = _resize_array(images, image_size)

    out = ImageSet(
        images=np.ascontiguousarray(images),
        labels=labels,
        ids=ids,
        class_names=class_names,
        source=source,
        split=split,
        skipped=[],
    )
    log(f"loaded {source}/{split}: {len(out)} images {out.channels}x{out.image_size[0]}x{out.image_size[1]} from {where}")
    return out


# ----------------------------------------------------------------------------------------------
# Selection (classes filter + stratified subset)
# ----------------------------------------------------------------------------------------------


def _select(
    labels: np.ndarray | None,
    class_names: list[str] | None,
    classes: list[int] | None,
    subset: int | None,
    seed: int,
    what: str,
    n: int,
) -> np.ndarray | None:
    """Indices to keep (sorted), or None to keep everything."""
    idx = np.arange(n)
    if classes is not None:
        if labels is None:
            raise DataError(f"{what}: 'classes' was given but this source has no labels")
        wanted = sorted({int(c) for c in classes})
        if class_names is not None:
            bad = [c for c in wanted if not 0 <= c < len(class_names)]
            if bad:
                raise DataError(
                    f"{what}: unknown class labels {bad}; valid labels are 0..{len(class_names) - 1}"
                )
        idx = idx[np.isin(labels, wanted)]
    if subset is not None and subset < len(idx):
        idx = _stratified_subset(idx, None if labels is None else labels[idx], subset, seed)
    if len(idx) == n:
        return None
    return idx


def select_listing(listing, classes: list[int] | None, subset: int | None, seed: int):
    """A file listing filtered by `classes` and a seeded stratified `subset`, before anything is decoded."""
    keep = _select(listing.labels, listing.class_names, classes, subset, seed, listing.where, len(listing))
    if keep is None:
        return listing
    if len(keep) == 0:
        raise DataError(f"{listing.where}: no images left after filtering (classes={classes})")
    return listing.take(keep)


def _stratified_subset(idx: np.ndarray, labels: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    """Seeded subset of `k` from `idx`; per-label quotas by largest remainder so class balance is kept."""
    from downstream.sampling import stratified_sample

    if labels is None:
        labels = np.zeros(len(idx), dtype=np.int64)  # one class: a plain seeded draw of k
    return np.sort(idx[stratified_sample(labels, k, seed)])


def _resize_array(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Resize uint8 NCHW so the shorter side is `size`, then center-crop to size x size."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = images.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    out = np.empty((n, c, size, size), dtype=np.uint8)
    for start in range(0, n, chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk])).float()
        y = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        y = y[:, :, top : top + size, left : left + size]
        out[start : start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


# ----------------------------------------------------------------------------------------------
# idx sources: fashion-mnist, mnist
# ----------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (plain or .gz): 2 zero bytes, dtype code, ndim, big-endian int32 dims, data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read idx file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: idx data has {len(raw) - header} bytes, header {dims} implies {expected}")
    # Copy: frombuffer over bytes is read-only, and callers may modify images in place.
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).copy()


def _find_idx_pair(folder: Path, prefix: str) -> tuple[Path, Path] | None:
    """Images/labels idx files for `prefix` ("train" or "t10k") in `folder`, plain preferred over .gz."""

    def find(stem: str) -> Path | None:
        for name in (stem, stem + ".gz"):
            p = folder / name
            if p.is_file():
                return p
        return None

    images = find(f"{prefix}-images-idx3-ubyte")
    labels = find(f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    return images, labels


def _idx_candidates(base: Path, tv_name: str) -> list[Path]:
    """A folder holding the idx files directly, or torchvision's <base>/<Name>/raw layout."""
    return [base, base / tv_name / "raw"]


def _load_idx_source(
    source: str, split: str, root: str | None, download: bool, log: Callable[[str], object]
) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """fashion-mnist / mnist: find the idx files (or download them via torchvision) and parse them."""
    tv_name = "FashionMNIST" if source == "fashion-mnist" else "MNIST"
    class_names = FASHION_MNIST_CLASSES if source == "fashion-mnist" else MNIST_CLASSES
    prefix = "train" if split == "train" else "t10k"

    if root is not None:
        base = Path(root).expanduser()
        candidates = _idx_candidates(base, tv_name)
        download_root = base
    else:
        candidates = []
        if source == "fashion-mnist":
            candidates.append(Path(DEBIAN_FASHION_MNIST))
        base = _cache_root(source)
        candidates += _idx_candidates(base, tv_name)
        download_root = base

    pair = None
    for folder in candidates:
        pair = _find_idx_pair(folder, prefix)
        if pair is not None:
            break

    if pair is None and download:
        import torchvision.datasets as tvd

        log(f"downloading {source} to {download_root}")
        try:
            getattr(tvd, tv_name)(root=str(download_root), train=(split == "train"), download=True)
        except Exception as e:  # network/disk problems all mean "could not get the data"
            raise DataError(f"{source}: download to {download_root} failed: {e}") from e
        pair = _find_idx_pair(download_root / tv_name / "raw", prefix)

    if pair is None:
        looked = ", ".join(str(c) for c in candidates)
        hints = []
        if source == "fashion-mnist":
            hints.append(f"install the Debian package dataset-fashion-mnist (files in {DEBIAN_FASHION_MNIST})")
        hints.append("pass root: a folder with the idx files")
        hints.append("or set download: true")
        raise DataError(
            f"{source} {split} idx files ({prefix}-images-idx3-ubyte[.gz], {prefix}-labels-idx1-ubyte[.gz]) "
            f"not found; looked in {looked}. Fix: " + "; ".join(hints)
        )

    images_path, labels_path = pair
    images = _read_idx(images_path)
    labels = _read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: {labels.shape} labels for {len(images)} images in {images_path}")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(f"{labels_path}: labels outside 0..{len(class_names) - 1}")
    return images[:, None, :, :], labels, list(class_names), str(images_path.parent)


# ----------------------------------------------------------------------------------------------
# torchvision sources: cifar10, cifar100, stl10
# ----------------------------------------------------------------------------------------------

# Errors torchvision raises for missing, partial or corrupt files, and for failed downloads.
_TV_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError)


def _tv_root(source: str, root: str | None) -> Path:
    return Path(root).expanduser() if root is not None else _cache_root(source)


def _tv_error(source: str, base: Path, download: bool, e: Exception) -> DataError:
    if download:
        return DataError(f"{source}: could not download or read the dataset in {base}: {e}")
    return DataError(
        f"{source}: dataset not found or corrupted in {base} ({e}). "
        f"Fix: pass root: a folder containing torchvision's {source} files, or set download: true"
    )


def _load_cifar(
    source: str, split: str, root: str | None, download: bool
) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """CIFAR-10/100 through torchvision; its `.data` is already a uint8 NHWC array, so just transpose."""
    import torchvision.datasets as tvd

    base = _tv_root(source, root)
    cls = tvd.CIFAR10 if source == "cifar10" else tvd.CIFAR100
    try:
        ds = cls(root=str(base), train=(split == "train"), download=download)
    except _TV_ERRORS as e:
        raise _tv_error(source, base, download, e) from e
    data = np.asarray(ds.data, dtype=np.uint8)
    if data.ndim != 4 or data.shape[-1] != 3:
        raise DataError(f"{source} in {base}: unexpected data shape {data.shape}")
    images = np.ascontiguousarray(data.transpose(0, 3, 1, 2))
    labels = np.asarray(ds.targets, dtype=np.int64)
    return images, labels, list(ds.classes), str(base / cls.base_folder)


def _load_stl10(
    split: str, root: str | None, download: bool
) -> tuple[np.ndarray, np.ndarray | None, list[str], str]:
    """STL-10 through torchvision: "train" is the 5k labeled split, "unlabeled" the 100k one."""
    import torchvision.datasets as tvd

    base = _tv_root("stl10", root)
    try:
        ds = tvd.STL10(root=str(base), split=split, download=download)
    except _TV_ERRORS as e:
        raise _tv_error("stl10", base, download, e) from e
    images = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8))  # torchvision gives a transposed view
    labels = None if split == "unlabeled" else np.asarray(ds.labels, dtype=np.int64)
    class_names = list(getattr(ds, "classes", None) or STL10_CLASSES)
    return images, labels, class_names, str(base / tvd.STL10.base_folder)


# ----------------------------------------------------------------------------------------------
# digits (sklearn, bundled with the package: always available offline)
# ----------------------------------------------------------------------------------------------

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


# Natural colour photos that scikit-image ships (no download); the last two are held out as "test".
_PHOTOS_TRAIN = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
_PHOTOS_TEST = ("coffee", "stereo_motorcycle")


def _load_photos(split: str, tile: int) -> tuple[np.ndarray, None, None, str, list[str]]:
    """scikit-image's sample photos cut into square tiles: an offline colour data set for colorization.

    Each photo is scaled so its shorter side holds 4 tiles, then cut into non-overlapping tiles of
    `tile` px (ids `photo:row:col`). Unlabeled. Train and test come from different photos.
    """
    import skimage.data
    import torch
    import torch.nn.functional as F

    names = _PHOTOS_TEST if split == "test" else _PHOTOS_TRAIN
    tiles, ids = [], []
    for name in names:
        photo = getattr(skimage.data, name)()
        photo = photo[0] if isinstance(photo, tuple) else photo
        x = torch.from_numpy(np.ascontiguousarray(photo[..., :3])).permute(2, 0, 1)[None].float()
        scale = 4 * tile / min(x.shape[-2:])
        size = (max(tile, int(x.shape[-2] * scale)), max(tile, int(x.shape[-1] * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        x = x.round().clamp(0, 255).to(torch.uint8).numpy()
        for r in range(x.shape[1] // tile):
            for c in range(x.shape[2] // tile):
                tiles.append(x[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile])
                ids.append(f"{name}:{r}:{c}")
    return np.stack(tiles), None, None, "skimage.data sample photos", ids


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """8x8 sklearn digits scaled 0..16 -> 0..255, with a fixed stratified 80/20 split.

    The split seed is fixed (not the caller's `seed`) so train and test never overlap.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        n_test = int(round(len(members) * _DIGITS_TEST_FRACTION))
        is_test[rng.permutation(members)[:n_test]] = True
    keep = np.flatnonzero(is_test if split == "test" else ~is_test)
    return images[keep], labels[keep], [str(i) for i in range(10)], "sklearn.datasets.load_digits"
