"""The `stream` backend: a pixel cache decoded by Ray Data across the cluster, read row by row by every reader.

One pass of Ray Data tasks decodes the listed files (pipeline.image_files.decode_file: the `memory` backend's
decoder, skip reasons included) into fixed-size uint8 ``.npy`` shards, one shard per block of rows, and
returns per row only what is small: whether it decoded, why not, its pixel digest and its exact pixel sums.
The driver checks that every row came back exactly once (a retried task must neither lose nor repeat one),
writes the row index (``rows.parquet``) and ``meta.json`` (written last: a cache without it is incomplete),
and renames the build folder into place, so an interrupted build leaves nothing that looks finished.

The cache's key is the file listing (paths, sizes, mtimes, labels), the load size, the bomb guard and the
decoder version, so a rerun costs one listing pass; a `touch` rebuilds the cache, but the data fingerprint
is made of the stored pixel digests and stays the same, so trained stages are reused.

Readers get :class:`ShardedImages`: it indexes like a uint8 (N, C, H, W) array, reads only the rows asked
for from the shards, and pickles as a few small arrays, so Ray workers open the shards
themselves (the cache folder must be on a path every node can read: local disk on one machine, a shared
file system on a cluster) instead of receiving pixels through the object store.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.image_files import DECODER_VERSION, Listing, decode_file, pil_limits
from pipeline.images import DataError, ImageSet, PixelMoments, row_digest
from pipeline.memory import release_free_memory

CACHE_FORMAT = 1
META_FILE = "meta.json"  # written last: its presence marks a complete cache
ROWS_FILE = "rows.parquet"
ROWS_PER_SHARD = 1024
KILL_DECODE = "SSLPIPE_TEST_KILL_DECODE"  # tests: a decode task exits its worker process once if this file exists


class ShardedImages:
    """Read-only uint8 (N, C, H, W) rows spread over ``.npy`` shards, read on demand with positioned reads.

    Not memory-mapped on purpose: pages of a mapping that a worker touches count as its resident memory,
    which would grow with the data set over an epoch; `pread` leaves them in the kernel's page cache only.
    Consecutive rows of a shard are read in one call. Pickles without its open files.
    """

    ndim = 4
    dtype = np.dtype(np.uint8)
    MAX_OPEN_FILES = 128

    def __init__(self, root: str, shard_files: list[str], shard: np.ndarray, offset: np.ndarray,
                 image_shape: tuple[int, int, int]):
        self.root = str(root)
        self.shard_files = list(shard_files)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int32)
        self.image_shape = tuple(int(v) for v in image_shape)
        self._files: OrderedDict[int, tuple[int, int]] = OrderedDict()  # shard -> (fd, data offset)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.shard), *self.image_shape)

    def __len__(self) -> int:
        return len(self.shard)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": OrderedDict()}  # each process opens the shards itself

    def __del__(self) -> None:
        for fd, _ in getattr(self, "_files", {}).values():
            os.close(fd)

    def _file(self, shard: int) -> tuple[int, int]:
        """(descriptor, byte offset of row 0) of a shard; at most MAX_OPEN_FILES stay open."""
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        path = os.path.join(self.root, self.shard_files[shard])
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            start = f.tell()
        if tuple(shape[1:]) != self.image_shape or dtype != np.uint8:
            raise ValueError(f"pixel cache shard {path} holds {dtype} {shape}, expected uint8 rows of {self.image_shape}")
        self._files[shard] = (os.open(path, os.O_RDONLY), start)
        if len(self._files) > self.MAX_OPEN_FILES:
            os.close(self._files.popitem(last=False)[1][0])
        return self._files[shard]

    def _read(self, out: np.ndarray, shards: np.ndarray, offsets: np.ndarray) -> None:
        row_bytes = int(np.prod(self.image_shape))
        flat = out.reshape(len(out), row_bytes)
        order = np.lexsort((offsets, shards))
        s, o = shards[order], offsets[order]
        # runs of consecutive rows in one shard: one read each
        breaks = np.flatnonzero((np.diff(s) != 0) | (np.diff(o) != 1)) + 1
        for run in np.split(np.arange(len(order)), breaks):
            if not len(run):
                continue
            fd, start = self._file(int(s[run[0]]))
            data = os.pread(fd, row_bytes * len(run), start + int(o[run[0]]) * row_bytes)
            if len(data) != row_bytes * len(run):
                raise OSError(f"pixel cache shard {self.shard_files[int(s[run[0]])]} is truncated")
            flat[order[run]] = np.frombuffer(data, dtype=np.uint8).reshape(len(run), row_bytes)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} images")
            return self[np.array([i])][0]
        if isinstance(key, slice):
            key = np.arange(*key.indices(len(self)))
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} images")
        out = np.empty((len(idx), *self.image_shape), dtype=np.uint8)
        if len(idx):
            self._read(out, self.shard[idx], self.offset[idx])
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Every row in memory: for small sets and tests; large sets are read in chunks (ImageSet.chunks)."""
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)

    def take(self, idx: np.ndarray) -> "ShardedImages":
        """The rows `idx`, as another view of the same shards (no pixel is read)."""
        idx = np.asarray(idx, dtype=np.int64)
        return ShardedImages(self.root, self.shard_files, self.shard[idx], self.offset[idx], self.image_shape)


def cache_key(listing: Listing, size: int, max_pixels: int) -> str:
    from pipeline.store import fingerprint

    return fingerprint(listing.digest(), size, max_pixels, DECODER_VERSION, CACHE_FORMAT)


def _shard_name(first_row: int) -> str:
    return f"shard-{first_row:010d}.npy"


def _decode_block(batch: dict[str, np.ndarray], *, out_dir: str, size: int, max_pixels: int,
                  kill_marker: str | None) -> dict[str, np.ndarray]:
    """One Ray Data block of rows -> one shard of the rows that decode, plus per-row results."""
    if kill_marker:
        try:
            os.rename(kill_marker, kill_marker + ".taken")  # exactly one task wins the rename
        except OSError:
            pass
        else:
            os._exit(1)
    rows = np.asarray(batch["row"], dtype=np.int64)
    n = len(rows)
    pixels = np.empty((n, 3, size, size), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    reasons = np.full(n, "", dtype=object)
    digests = np.zeros((n, 16), dtype=np.uint8)
    sums = np.zeros((n, 3), dtype=np.int64)
    cross = np.zeros((n, 9), dtype=np.int64)
    with pil_limits(max_pixels):
        for i, (path, file_size) in enumerate(zip(batch["path"], batch["size"])):
            arr, reason = decode_file(str(path), size, max_pixels, int(file_size))
            if arr is None:
                reasons[i] = reason
                continue
            ok[i] = True
            pixels[i] = arr
            digests[i] = np.frombuffer(row_digest(arr), dtype=np.uint8)
            m = PixelMoments.of(arr[None])
            sums[i], cross[i] = m.sums, m.cross.reshape(-1)
    offsets = np.full(n, -1, dtype=np.int32)
    offsets[ok] = np.arange(int(ok.sum()), dtype=np.int32)
    if ok.any():
        path = os.path.join(out_dir, _shard_name(int(rows[0])))
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, pixels[ok])
        os.replace(tmp, path)  # a retried task rewrites the same shard whole
    return {"row": rows, "ok": ok, "reason": reasons, "digest": digests, "offset": offsets,
            "first_row": np.full(n, int(rows[0]), dtype=np.int64), "sums": sums, "cross": cross}


def build(listing: Listing, *, size: int, max_pixels: int, directory: Path, log: Callable[[str], object],
          rows_per_shard: int | None = None) -> None:
    """Decode `listing` with Ray Data into a complete cache at `directory` (Ray must be running); one task and
    one shard per `rows_per_shard` rows (default ROWS_PER_SHARD)."""
    import pyarrow as pa
    import ray.data

    n = len(listing)
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(f"{directory.name}.building-*"):  # an interrupted build: start over
        shutil.rmtree(stale, ignore_errors=True)
    work = directory.parent / f"{directory.name}.building-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    started = time.time()
    rows_per_shard = rows_per_shard or ROWS_PER_SHARD
    blocks = [pa.table({"row": np.arange(s, min(n, s + rows_per_shard), dtype=np.int64),
                        "path": listing.paths[s:s + rows_per_shard],
                        "size": listing.sizes[s:s + rows_per_shard]})
              for s in range(0, n, rows_per_shard)]
    log(f"pixel cache: decoding {n} files of {listing.where} at {size}px in {len(blocks)} Ray Data tasks "
        f"into {directory}")
    kill_marker = os.environ.get(KILL_DECODE) or None
    ds = ray.data.from_arrow(blocks).map_batches(
        _decode_block, batch_size=None, batch_format="numpy",
        fn_kwargs={"out_dir": str(work), "size": size, "max_pixels": max_pixels, "kill_marker": kill_marker})
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for name, values in batch.items():
            parts.setdefault(name, []).append(values)
    res = {name: np.concatenate(values) for name, values in parts.items()}

    counts = np.bincount(res["row"], minlength=n) if n else np.zeros(0, dtype=np.int64)
    if len(counts) != n or not (counts == 1).all():
        lost, repeated = int((counts[:n] == 0).sum()), int((counts > 1).sum())
        raise RuntimeError(f"pixel cache build of {listing.where}: {lost} row(s) missing and {repeated} "
                           "repeated after the Ray Data pass; nothing was kept, rerun to rebuild")
    order = np.argsort(res["row"], kind="stable")
    res = {name: values[order] for name, values in res.items()}
    ok = res["ok"].astype(bool)
    skipped = [(listing.paths[i], str(res["reason"][i])) for i in np.flatnonzero(~ok).tolist()]
    for path, reason in skipped[:20]:
        log(f"skipped {path}: {reason}")
    if len(skipped) > 20:
        log(f"... and {len(skipped) - 20} more unreadable files (all listed in skipped_files.tsv)")
    if not ok.any():
        shutil.rmtree(work, ignore_errors=True)
        raise DataError(f"{listing.where}: none of {n} image files could be read; first: "
                        f"{skipped[0][0]}: {skipped[0][1]}")

    firsts = sorted({int(f) for f in res["first_row"][ok]})
    shard_of_first = {f: i for i, f in enumerate(firsts)}
    keep = np.flatnonzero(ok)
    labels = None if listing.labels is None else listing.labels[keep]
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "row": keep.astype(np.int64),
        "path": [listing.paths[i] for i in keep.tolist()],
        "label": pa.array(labels if labels is not None else [None] * len(keep), type=pa.int64()),
        "shard": np.array([shard_of_first[int(f)] for f in res["first_row"][keep]], dtype=np.int32),
        "offset": res["offset"][keep].astype(np.int32),
        "digest": pa.array([bytes(d) for d in res["digest"][keep]], type=pa.binary(16)),
    }), work / ROWS_FILE)
    meta = {
        "format": CACHE_FORMAT, "decoder_version": DECODER_VERSION, "where": listing.where,
        "listing_digest": listing.digest(), "image_shape": [3, size, size], "max_image_pixels": max_pixels,
        "rows": int(len(keep)), "listed": n, "labeled": labels is not None, "class_names": listing.class_names,
        "shard_files": [_shard_name(f) for f in firsts], "skipped": skipped,
        "moments": {"count": int(len(keep)) * size * size, "sums": res["sums"][keep].sum(0).tolist(),
                    "cross": res["cross"][keep].sum(0).reshape(3, 3).tolist()},
        "build_seconds": round(time.time() - started, 2),
    }
    (work / META_FILE).write_text(json.dumps(meta))
    if directory.exists():
        shutil.rmtree(directory)  # incomplete (no meta.json): the check in `load` said so
    os.replace(work, directory)
    log(f"pixel cache: {len(keep)} images, {len(skipped)} unreadable file(s) skipped, "
        f"{len(firsts)} shard(s), built in {meta['build_seconds']:.1f}s")


def open_cache(directory: Path, *, source: str, split: str) -> ImageSet:
    """An ImageSet over a complete cache: pixels read on demand, digests and moments as stored."""
    import pyarrow.parquet as pq

    meta = json.loads((directory / META_FILE).read_text())
    table = pq.read_table(directory / ROWS_FILE)
    images = ShardedImages(str(directory), meta["shard_files"], table.column("shard").to_numpy(),
                           table.column("offset").to_numpy(), tuple(meta["image_shape"]))
    digests = np.array(table.column("digest").to_pylist(), dtype="S16")
    labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64) if meta["labeled"] else None
    m = meta["moments"]
    return ImageSet(images=images, labels=labels, ids=table.column("path").to_pylist(),
                    class_names=meta["class_names"], source=source, split=split,
                    skipped=[tuple(s) for s in meta["skipped"]], digests=digests,
                    moments=PixelMoments(int(m["count"]), np.array(m["sums"], dtype=np.int64),
                                         np.array(m["cross"], dtype=np.int64)))


def load(listing: Listing, *, source: str, split: str, size: int, max_pixels: int, cache_root: Path,
         start_ray: Callable[[], None], log: Callable[[str], object]) -> ImageSet:
    """The split as an ImageSet over its pixel cache, built first (with Ray) when there is none yet."""
    directory = Path(cache_root) / cache_key(listing, size, max_pixels)
    if (directory / META_FILE).exists():
        log(f"pixel cache: reusing {directory}")
    else:
        start_ray()
        build(listing, size=size, max_pixels=max_pixels, directory=directory, log=log)
    out = open_cache(directory, source=source, split=split)
    release_free_memory()  # what a build's per-block results, the Parquet read and the lists on the way freed
    log(f"loaded {listing.where} ({split}) from the pixel cache: {len(out)} images "
        f"{'x'.join(map(str, out.images.shape[1:]))}"
        + (f", {len(out.class_names)} classes" if out.class_names else
           (", labeled" if out.labels is not None else ", unlabeled")))
    return out
