"""Embedding a set of images that is not in the driver's memory, on the Ray cluster, with Ray Data.

The streamed data backend hands evaluation an array-like that reads its rows from files on shared storage
(pipeline.pixel_cache.ShardedImages), not pixels in memory. The dataset here holds row ids only; an actor pool
embeds them, each actor loading the backbone artifact once and reading just the rows of its batch, with the
same preprocessing as in-process embedding (:func:`pipeline.backbones.embed_with`).

Each actor writes its batch's (row ids, embeddings) to a part file next to the pixel cache (shared storage,
like the cache) and hands Ray Data only the row ids and the part's name. The driver copies each part into a
.npy memory map by row id and deletes it, so it never holds pixels, and its memory stays flat however many
batches pass: Ray Data's driver-side buffers grow with the bytes of the blocks it returns, and here those are
a few KB.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np


class _Embedder:
    """One actor of the pool: the artifact's module, loaded once; a call embeds the rows a batch names."""

    def __init__(self, artifact: str, images, bare: bool, batch_size: int, use_gpu: bool, parts: str,
                 pooling: str = "avg") -> None:
        from pipeline.backbones import load_backbone

        self.model, self.meta = load_backbone(artifact, with_meta=True, bare=bare, pooling=pooling)
        self.images, self.batch_size, self.parts = images, batch_size, parts
        # bf16 on GPUs, where it is fast and the embedding tolerates it; fp32 on CPUs, where autocast is slow
        self.device, self.precision = ("cuda", "bf16") if use_gpu else ("cpu", "fp32")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.backbones import embed_with

        rows = np.asarray(batch["id"], dtype=np.int64)
        features = embed_with(self.model, self.meta, self.images[rows], self.batch_size, device=self.device,
                              precision=self.precision)
        name = f"part-{int(rows[0]) if len(rows) else 0:012d}-{uuid.uuid4().hex[:8]}.npz"
        tmp = os.path.join(self.parts, f".{name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, row=rows, embedding=np.asarray(features, dtype=np.float32))
        os.replace(tmp, os.path.join(self.parts, name))  # complete or absent
        return {"row": rows, "part": np.full(len(rows), name)}


def _open_npy(path: Path, n: int, dim: int) -> tuple[int, int, int]:
    """Create the (n, dim) float32 .npy at `path` and open it for positioned writes: rows are written with
    pwrite, not through a memory map, so the driver's resident size does not grow with the file."""
    header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))  # header + size only
    offset = header.offset
    del header
    return os.open(path, os.O_WRONLY), offset, dim * 4


def _write_rows(out: tuple[int, int, int], rows: np.ndarray, features: np.ndarray) -> None:
    """Write `features[i]` at row `rows[i]` of the open .npy (one write per run of consecutive rows)."""
    fd, offset, row_bytes = out
    order = np.argsort(rows, kind="stable")
    rows, features = rows[order], features[order]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        data, at = memoryview(features[lo:hi].tobytes()), offset + int(rows[lo]) * row_bytes
        while data:  # pwrite may write less than asked
            done = os.pwrite(fd, data, at)
            data, at = data[done:], at + done


def parts_folder(images, out_path: Path) -> Path:
    """Where actors write their parts: next to the images' pixel cache (a path every node reads and writes),
    else next to `out_path`."""
    root = getattr(images, "root", None)
    base = Path(root).parent if root else Path(out_path).parent
    return base / f".embed-parts-{uuid.uuid4().hex[:12]}"


def embed_on_cluster(artifact: Path, images, *, batch_size: int, bare: bool, out_path: Path, use_gpu: bool,
                     concurrency: int, pooling: str = "avg") -> np.ndarray:
    """(N, D) float32 embeddings of `images` (anything with len() whose rows an int array selects and that
    pickles cheaply) by `concurrency` actors (one GPU each with `use_gpu`), written to `out_path` and
    returned as a read-only memory map of it, rows in row-id order.

    Every row id must come back exactly once: a lost or repeated block raises instead of leaving zeros or
    stale rows in the file.
    """
    import ray

    from pipeline.memory import release_free_memory

    n = len(images)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)  # what in-process embedding gives
    parts = parts_folder(images, out_path)
    parts.mkdir(parents=True)
    out = None  # (file descriptor, header bytes, row bytes) of the .npy being filled
    try:
        dataset = ray.data.range(n).map_batches(
            _Embedder, batch_size=batch_size, batch_format="numpy", concurrency=concurrency,
            num_gpus=1 if use_gpu else None,
            fn_constructor_kwargs={"artifact": str(artifact), "images": images, "bare": bare, "pooling": pooling,
                                   "batch_size": batch_size, "use_gpu": use_gpu, "parts": str(parts)},
        )
        seen = np.zeros(n, dtype=bool)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for name in np.unique(batch["part"]):
                expected = np.asarray(batch["row"], dtype=np.int64)[batch["part"] == name]
                with np.load(parts / str(name)) as part:
                    rows, features = part["row"], part["embedding"]
                if len(rows) != len(expected) or not np.array_equal(np.sort(rows), np.sort(expected)) or \
                        (len(rows) and (rows.min() < 0 or rows.max() >= n or seen[rows].any()
                                        or len(np.unique(rows)) < len(rows))):
                    raise RuntimeError(f"embedding on the cluster: part {name} does not hold the rows its batch "
                                       "names, or they are out of range or repeated")
                if out is None:
                    out = _open_npy(out_path, n, features.shape[1])
                _write_rows(out, rows, np.ascontiguousarray(features, dtype=np.float32))
                seen[rows] = True
                (parts / str(name)).unlink()
        if not seen.all():
            raise RuntimeError(f"embedding on the cluster: {int((~seen).sum())} of {n} rows never came back")
    finally:
        if out is not None:
            os.close(out[0])
        shutil.rmtree(parts, ignore_errors=True)  # parts of failed attempts included
    release_free_memory()
    return np.load(out_path, mmap_mode="r")
