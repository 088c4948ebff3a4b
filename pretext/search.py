"""Exact nearest-neighbour search over embeddings with faiss (numpy and faiss only: no torch), for kNN
evaluation, SCAN's mined neighbours and STML's neighbourhood batches."""

from __future__ import annotations

import numpy as np


# faiss' GPU flat index supports k up to this value; larger k falls back to CPU.
GPU_MAX_K = 2048


def inner_product_index(x: np.ndarray, k: int, use_gpu: bool | None = None):
    """An exact faiss inner-product index over the rows of `x` (C-contiguous float32), searched for up to `k`
    neighbours: on every GPU faiss sees (``use_gpu=None``) unless k exceeds GPU_MAX_K; ``use_gpu=False``
    forces CPU and ``True`` requires a GPU."""
    import faiss

    ngpu = faiss.get_num_gpus()
    if use_gpu and ngpu == 0:
        raise RuntimeError("use_gpu=True but faiss sees no GPU (faiss.get_num_gpus() == 0)")
    index = faiss.IndexFlatIP(x.shape[1])
    if ngpu > 0 and use_gpu is not False and k <= GPU_MAX_K:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index
