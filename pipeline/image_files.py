"""Image files: list a folder or a manifest into a :class:`Listing`, and decode files the same way everywhere.

Both data backends start here. `memory` decodes a listing on the driver (:func:`decode_listing`); `stream`
decodes it in Ray Data tasks into a pixel cache (pipeline/pixel_cache.py). Both call :func:`decode_file`,
so orientation, colour mode, the decompression-bomb guard and the reasons a file is skipped are identical.

A folder is a local path or a pyarrow filesystem URI (``s3://bucket/images``). A manifest is a CSV or
Parquet file with a ``path`` column (relative paths are relative to the manifest), an optional ``label``
column (integers, or names that become sorted classes) and an optional ``split`` column.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.images import IMAGE_EXTENSIONS, DataError, ImageSet

DEFAULT_FOLDER_IMAGE_SIZE = 64
DECODER_VERSION = 1  # bump when decode_file's output changes: it is part of the pixel cache's key
LABEL_RULES = ("auto", "folders", "none")
_MAX_DECODE_THREADS = 4
_PIL_LOCK = threading.Lock()  # PIL's bomb limit is process-global: one decode pass at a time per process


def is_uri(path: str) -> bool:
    """A pyarrow filesystem URI (s3://, gs://, hdfs://, file://) rather than a local path."""
    return "://" in str(path)


@dataclass(frozen=True)
class Listing:
    """The files of one split, before decoding: what the pixel cache's key is made of."""

    where: str  # the split folder or the manifest, for messages
    paths: list[str]
    sizes: np.ndarray  # int64 bytes; -1: the file does not exist
    mtimes: np.ndarray  # int64 ns
    labels: np.ndarray | None
    class_names: list[str] | None
    rule: str  # how labels were found, for the log

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, keep: np.ndarray) -> "Listing":
        return replace(self, paths=[self.paths[i] for i in keep.tolist()], sizes=self.sizes[keep],
                       mtimes=self.mtimes[keep], labels=None if self.labels is None else self.labels[keep])

    def digest(self) -> str:
        """sha256 of paths, sizes, mtimes and labels: a `touch` or a renamed file changes it."""
        h = hashlib.sha256()
        h.update("\0".join(self.paths).encode())
        h.update(np.ascontiguousarray(self.sizes, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.mtimes, dtype="<i8").tobytes())
        h.update(b"nolabels" if self.labels is None else np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        h.update(repr(self.class_names).encode())
        return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(root: str) -> list[tuple[str, int, int]]:
    """(path relative to root, size, mtime ns) of every image file under `root`, sorted; hidden files and
    folders are left out."""
    found: list[tuple[str, int, int]] = []
    if is_uri(root):
        import pyarrow.fs

        fs, base = pyarrow.fs.FileSystem.from_uri(root)
        base = base.rstrip("/")
        for info in fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=False)):
            rel = info.path[len(base):].lstrip("/")
            if info.type == pyarrow.fs.FileType.File and all(not p.startswith(".") for p in rel.split("/")) \
                    and _is_image_name(info.base_name):
                found.append((rel, int(info.size), int(info.mtime_ns or 0)))
    else:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, root)
            for name in filenames:
                if _is_image_name(name):
                    st = os.stat(os.path.join(dirpath, name))
                    found.append((name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"),
                                  st.st_size, st.st_mtime_ns))
    return sorted(found)


def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if is_uri(root) else str(Path(root) / rel)


def _exists(path: str) -> tuple[bool, bool]:
    """(exists, is a directory)."""
    if is_uri(path):
        import pyarrow.fs

        fs, p = pyarrow.fs.FileSystem.from_uri(path)
        t = fs.get_file_info(p).type
        return t != pyarrow.fs.FileType.NotFound, t == pyarrow.fs.FileType.Directory
    p = Path(path).expanduser()
    return p.exists(), p.is_dir()


def _split_folder(root: str, split: str, log: Callable[[str], object]) -> str:
    """`root/train` and `root/test` (or `val`) when both exist; otherwise the whole folder for every split."""
    test = next((_join(root, n) for n in ("test", "val") if _exists(_join(root, n))[1]), None)
    if _exists(_join(root, "train"))[1] and test is not None:
        return _join(root, "train") if split == "train" else test
    if split == "test":
        log(f"folder {root} has no train/ and test/ sub-folders: split 'test' uses the same images as 'train'")
    return root


def list_folder(root: str | None, split: str, labels: str = "auto", log: Callable[[str], object] = print) -> Listing:
    """The image files of one split of a folder, with labels by `labels`:

    - ``folders``: each top-level sub-folder is a class (ImageFolder); loose images at the top are an error.
    - ``none``: every image anywhere in the tree, unlabeled.
    - ``auto``: ``folders`` when the folder holds no images itself and at least two sub-folders do, else
      ``none``. The log says which rule applied.
    """
    if labels not in LABEL_RULES:
        raise DataError(f"data.labels must be one of {', '.join(LABEL_RULES)}, got {labels!r}")
    if root is None:
        raise DataError("source 'folder' needs root: the directory that holds the images")
    root = root if is_uri(root) else str(Path(root).expanduser())
    exists, is_dir = _exists(root)
    if not exists:
        raise DataError(f"folder {root} does not exist")
    if not is_dir:
        raise DataError(f"folder source root {root} is not a directory")
    folder = _split_folder(root, split, log)
    try:
        files = _walk(folder)
    except OSError as e:
        raise DataError(f"cannot list folder {folder}: {e}") from e
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")

    loose = [f for f in files if "/" not in f[0]]
    classes = sorted({f[0].split("/", 1)[0] for f in files if "/" in f[0]})
    rule = labels
    if labels == "auto":
        rule = "folders" if not loose and len(classes) >= 2 else "none"
    if rule == "folders" and loose:
        raise DataError(f"data.labels: folders, but {folder} holds {len(loose)} image(s) outside any class "
                        f"sub-folder (first: {loose[0][0]}); move them or use data.labels: none")
    paths = [_join(folder, f[0]) for f in files]
    sizes = np.array([f[1] for f in files], dtype=np.int64)
    mtimes = np.array([f[2] for f in files], dtype=np.int64)
    if rule == "folders":
        index = {name: i for i, name in enumerate(classes)}
        label_arr = np.array([index[f[0].split("/", 1)[0]] for f in files], dtype=np.int64)
        why = "labels: auto found class sub-folders" if labels == "auto" else "labels: folders"
        log(f"folder {folder}: {len(classes)} classes from its sub-folder names ({why})")
        return Listing(folder, paths, sizes, mtimes, label_arr, classes, "folders")
    why = ("labels: auto found no class sub-folders" if labels == "auto" else "labels: none")
    log(f"folder {folder}: {len(paths)} unlabeled images, the whole tree as one collection ({why})")
    return Listing(folder, paths, sizes, mtimes, None, None, "none")


def read_manifest(path: str | None, split: str, labels: str = "auto", log: Callable[[str], object] = print) -> Listing:
    """The rows of a CSV/Parquet manifest (a `split` column, when present, selects the rows of `split`)."""
    import pyarrow.csv
    import pyarrow.parquet

    if path is None:
        raise DataError("source 'manifest' needs root: the CSV or Parquet file that lists the images")
    path = path if is_uri(path) else str(Path(path).expanduser())
    exists, is_dir = _exists(path)
    if not exists or is_dir:
        raise DataError(f"manifest {path} {'is a directory' if exists else 'does not exist'}; "
                        "data.root must name a .csv or .parquet file with a 'path' column")
    try:
        table = (pyarrow.parquet.read_table(path) if path.lower().endswith((".parquet", ".pq"))
                 else pyarrow.csv.read_csv(path))
    except Exception as e:  # noqa: BLE001 - any parser error means the file is not a manifest we can read
        raise DataError(f"cannot read manifest {path}: {type(e).__name__}: {e}") from e
    columns = set(table.column_names)
    if "path" not in columns:
        raise DataError(f"manifest {path} has no 'path' column (columns: {', '.join(table.column_names)})")
    if "split" in columns:
        splits = [str(s) for s in table.column("split").to_pylist()]
        if split not in splits:
            raise DataError(f"manifest {path}: no rows with split {split!r} (splits: {', '.join(sorted(set(splits)))})")
        table = table.filter(pyarrow.array([s == split for s in splits]))
    base = path.rsplit("/", 1)[0] if is_uri(path) else str(Path(path).parent)
    rel = [str(p) for p in table.column("path").to_pylist()]
    if not rel:
        raise DataError(f"manifest {path} lists no images")
    paths = [p if is_uri(p) or os.path.isabs(p) else _join(base, p) for p in rel]
    sizes, mtimes = _stat_all(paths)

    label_arr, class_names, rule = None, None, "none"
    if "label" in columns and labels != "none":
        values = table.column("label").to_pylist()
        if any(v is None for v in values):
            raise DataError(f"manifest {path}: the label column has empty values; fill them or use data.labels: none")
        if all(isinstance(v, int) for v in values):
            label_arr = np.asarray(values, dtype=np.int64)
        else:
            class_names = sorted({str(v) for v in values})
            index = {name: i for i, name in enumerate(class_names)}
            label_arr = np.array([index[str(v)] for v in values], dtype=np.int64)
        rule = "folders"
    elif labels == "folders":
        raise DataError(f"data.labels: folders, but manifest {path} has no 'label' column")
    log(f"manifest {path}: {len(paths)} images, " + ("labels from its label column" if label_arr is not None
                                                     else "unlabeled"))
    return Listing(path, paths, sizes, mtimes, label_arr, class_names, rule)


def _stat_all(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Sizes and mtimes of `paths`; (-1, 0) for a file that does not exist (decoding then skips it)."""
    sizes = np.full(len(paths), -1, dtype=np.int64)
    mtimes = np.zeros(len(paths), dtype=np.int64)
    remote = [i for i, p in enumerate(paths) if is_uri(p)]
    for i, p in enumerate(paths):
        if is_uri(p):
            continue
        try:
            st = os.stat(p)
        except OSError:
            continue
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    if remote:
        import pyarrow.fs

        fs, _ = pyarrow.fs.FileSystem.from_uri(paths[remote[0]])
        infos = fs.get_file_info([pyarrow.fs.FileSystem.from_uri(paths[i])[1] for i in remote])
        for i, info in zip(remote, infos):
            if info.type == pyarrow.fs.FileType.File:
                sizes[i], mtimes[i] = info.size, info.mtime_ns or 0
    return sizes, mtimes


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


class _Skip(Exception):
    """A file that is unreadable for a reason we can state plainly."""


def _to_rgb_pil(im):
    """Any PIL mode -> RGB. Alpha is composited on white; 16/32-bit grayscale is rescaled, not clipped."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if mode.startswith("I;16"):
            arr = arr.astype(np.float64) / 257.0
        elif mode == "I" and arr.size and arr.max() > 255:
            # PNG 16-bit grayscale can arrive as 'I' with values up to 65535.
            arr = arr.astype(np.float64) / 257.0
        gray = np.rint(np.clip(arr, 0, 255)).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


@contextlib.contextmanager
def pil_limits(max_pixels: int) -> Iterator[None]:
    """PIL's process-wide settings for one decode pass: the bomb limit (its warning raised, so it becomes a
    skip) and truncated files refused rather than half-decoded."""
    from PIL import Image, ImageFile

    with _PIL_LOCK:
        old_limit, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS = max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_limit, old_truncated


def _readable(path: str):
    """What PIL opens: a local path as is (its messages name the file), a URI's bytes read through pyarrow."""
    if not is_uri(path):
        return path
    import io

    import pyarrow.fs

    fs, p = pyarrow.fs.FileSystem.from_uri(path)
    with fs.open_input_file(p) as f:
        return io.BytesIO(f.read())


def _decode(path: str, size: int, max_pixels: int, file_size: int) -> np.ndarray:
    """One file to uint8 (3, size, size): RGB, EXIF-oriented, shorter side resized to `size`, center-cropped."""
    from PIL import Image, ImageOps

    if file_size < 0:
        raise _Skip("file not found")
    if file_size == 0:
        raise _Skip("empty file (0 bytes)")
    with Image.open(_readable(path)) as im:
        w, h = im.size
        if w * h > max_pixels:
            # Checked on the header, before any pixel is decoded.
            raise _Skip(
                f"image size {w}x{h} = {w * h} pixels exceeds max_image_pixels={max_pixels} "
                "(decompression bomb guard)"
            )
        im.draft(None, (size, size))  # JPEG: let libjpeg downscale while decoding (never below size)
        im.load()
        im = ImageOps.exif_transpose(im)
        im = _to_rgb_pil(im)
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise _Skip(f"decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_file(path: str, size: int, max_pixels: int, file_size: int) -> tuple[np.ndarray | None, str | None]:
    """(pixels (3, size, size) uint8, None) or (None, the reason the file is skipped). Call inside
    :func:`pil_limits`."""
    from PIL import Image

    try:
        return _decode(path, size, max_pixels, file_size), None
    except _Skip as e:
        return None, str(e)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL checks while reading the header; its message carries the pixel count.
        return None, f"exceeds max_image_pixels={max_pixels} (decompression bomb guard): {e}"
    except MemoryError:
        raise
    except FileNotFoundError:
        return None, "file not found"
    except Exception as e:  # any decoder failure means "this file is unreadable": skip it
        return None, f"{type(e).__name__}: {e}"


def decode_listing(listing: Listing, *, source: str, split: str, image_size: int | None, max_image_pixels: int,
                   log: Callable[[str], object]) -> ImageSet:
    """The `memory` backend: decode every listed file on this machine (a few threads) into one ImageSet."""
    size = DEFAULT_FOLDER_IMAGE_SIZE if image_size is None else int(image_size)
    images = np.empty((len(listing), 3, size, size), dtype=np.uint8)
    ok = np.zeros(len(listing), dtype=bool)
    skipped: list[tuple[str, str]] = []
    with pil_limits(max_image_pixels):
        workers = max(1, min(_MAX_DECODE_THREADS, len(listing)))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(lambda i: decode_file(listing.paths[i], size, max_image_pixels,
                                                     int(listing.sizes[i])), range(len(listing)))
            for i, (arr, reason) in enumerate(results):
                if arr is None:
                    skipped.append((listing.paths[i], reason))
                    log(f"skipped {listing.paths[i]}: {reason}")
                else:
                    images[i] = arr
                    ok[i] = True
    if not ok.any():
        raise DataError(f"{listing.where}: none of {len(listing)} image files could be read; first: "
                        f"{skipped[0][0]}: {skipped[0][1]}")
    kept = listing.take(np.flatnonzero(ok)) if skipped else listing
    log(f"loaded {listing.where} ({split}): {len(kept)} images 3x{size}x{size}"
        + (f", {len(kept.class_names)} classes" if kept.class_names else
           (", labeled" if kept.labels is not None else ", unlabeled"))
        + f"; skipped {len(skipped)} unreadable file(s)")
    return ImageSet(images=images[ok] if skipped else images, labels=kept.labels, ids=list(kept.paths),
                    class_names=kept.class_names, source=source, split=split, skipped=skipped)
