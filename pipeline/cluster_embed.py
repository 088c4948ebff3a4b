"""Embedding a set of images that is not in the driver's memory, on the Ray cluster, with Ray Data.

The streamed data backend hands evaluation an array-like that reads its rows from files on shared storage
(pipeline.pixel_cache.ShardedImages), not pixels in memory. The dataset here holds row ids only; an actor pool
embeds them, each actor loading the backbone artifact once and reading just the rows of its batch, with the
same preprocessing as in-process embedding (:func:`pipeline.backbones.embed_with`). The driver writes each
(row id, embedding) into a .npy memory map by row id, so it never holds pixels, and the order in which Ray
Data returns blocks does not matter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class _Embedder:
    """One actor of the pool: the artifact's module, loaded once; a call embeds the rows a batch names."""

    def __init__(self, artifact: str, images, bare: bool, batch_size: int, use_gpu: bool) -> None:
        from pipeline.backbones import load_backbone

        self.model, self.meta = load_backbone(artifact, with_meta=True, bare=bare)
        self.images, self.batch_size = images, batch_size
        # bf16 on GPUs, where it is fast and the embedding tolerates it; fp32 on CPUs, where autocast is slow
        self.device, self.precision = ("cuda", "bf16") if use_gpu else ("cpu", "fp32")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.backbones import embed_with

        rows = np.asarray(batch["id"], dtype=np.int64)
        features = embed_with(self.model, self.meta, self.images[rows], self.batch_size, device=self.device,
                              precision=self.precision)
        return {"row": rows, "embedding": features}


def embed_on_cluster(artifact: Path, images, *, batch_size: int, bare: bool, out_path: Path, use_gpu: bool,
                     concurrency: int) -> np.ndarray:
    """(N, D) float32 embeddings of `images` (anything with len() whose rows an int array selects and that
    pickles cheaply) by `concurrency` actors (one GPU each with `use_gpu`), written to `out_path` and
    returned as a read-only memory map of it, rows in row-id order.

    Every row id must come back exactly once: a lost or repeated block raises instead of leaving zeros or
    stale rows in the file.
    """
    import ray

    n = len(images)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)  # what in-process embedding gives
    dataset = ray.data.range(n).map_batches(
        _Embedder, batch_size=batch_size, batch_format="numpy", concurrency=concurrency,
        num_gpus=1 if use_gpu else None,
        fn_constructor_kwargs={"artifact": str(artifact), "images": images, "bare": bare, "batch_size": batch_size,
                               "use_gpu": use_gpu},
    )
    seen = np.zeros(n, dtype=bool)
    out = None
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        rows, features = np.asarray(batch["row"], dtype=np.int64), np.asarray(batch["embedding"], dtype=np.float32)
        if len(rows) and (rows.min() < 0 or rows.max() >= n or seen[rows].any() or len(np.unique(rows)) < len(rows)):
            raise RuntimeError(f"embedding on the cluster: row ids out of range or repeated in a batch of {len(rows)}")
        if out is None:
            out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(n, features.shape[1]))
        out[rows] = features
        seen[rows] = True
    if not seen.all():
        raise RuntimeError(f"embedding on the cluster: {int((~seen).sum())} of {n} rows never came back")
    out.flush()
    del out
    return np.load(out_path, mmap_mode="r")
