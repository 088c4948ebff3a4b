"""Retrieval metrics of an embedding, leave-one-out within one labelled set (the metric-learning protocol).

Every image is a query against all the others; a retrieved image is relevant when it shares the query's
label. This is how unseen-class evaluation works (CUB/Cars/SOP): train on some classes, embed images of
other classes, and ask whether nearest neighbours share a class.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _neighbours(x: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Indices (N, k) of the k nearest other points (self excluded), nearest first."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        index = faiss.IndexFlatIP(x.shape[1])
    elif metric == "euclidean":
        index = faiss.IndexFlatL2(x.shape[1])
    else:
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    index.add(x)
    _, idx = index.search(x, min(k + 1, len(x)))
    out = np.empty((len(x), idx.shape[1] - 1), dtype=np.int64)
    for i, row in enumerate(idx):
        row = row[row != i]  # drop the query itself wherever it landed (ties with duplicates)
        out[i] = row[: out.shape[1]]
    return out


def recall_at_k(labels: np.ndarray, neighbours: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Recall@K: the fraction of queries with at least one same-label image among their K nearest."""
    hits = labels[neighbours] == labels[:, None]
    return {f"recall_at_{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def map_at_r(labels: np.ndarray, neighbours: np.ndarray) -> float:
    """MAP@R (Musgrave et al. 2020): R = number of other same-label images; precision averaged over the
    relevant positions among the first R retrieved, divided by R."""
    values = np.unique(labels, return_counts=True)
    counts = dict(zip(values[0].tolist(), values[1].tolist()))
    scores = []
    for i, row in enumerate(neighbours):
        r = counts[labels[i]] - 1
        if r <= 0:
            continue
        rel = (labels[row[:r]] == labels[i]).astype(np.float64)
        precision = np.cumsum(rel) / np.arange(1, r + 1)
        scores.append(float((precision * rel).sum() / r))
    return float(np.mean(scores)) if scores else 0.0


def retrieval_metrics(features: np.ndarray, labels: np.ndarray, *, ks: Sequence[int] = (1, 2, 4, 8),
                      metric: str = "cosine") -> dict[str, float]:
    """Recall@ks and MAP@R of `features` against themselves (leave-one-out)."""
    labels = np.asarray(labels)
    _, counts = np.unique(labels, return_counts=True)
    depth = max(max(ks), int(counts.max()) - 1)
    neighbours = _neighbours(features, depth, metric)
    out = recall_at_k(labels, neighbours, ks)
    out["map_at_r"] = map_at_r(labels, neighbours)
    return out
