"""k-means over embedding matrices, backed by faiss.

Pure numpy in / numpy out so it can run inside any worker (Ray task, notebook,
test) without pulling in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

__all__ = ["ClusterResult", "KMeansResult", "kmeans", "l2_normalize", "margin_confidence"]

# Rows per block when recomputing exact distances; bounds the temporary
# (block, D) difference matrices to ~200 MiB for D <= 1024.
_DIST_BLOCK = 16384


@dataclass
class ClusterResult:
    """Outcome of :func:`kmeans` and :func:`clustering.gmm.gmm`: one shape for every clustering algorithm.

    ``distances`` are plain Euclidean (not squared) from each point to its assigned centroid (a GMM's component
    mean), in the space that was clustered, so they can be used directly for "nearest to centroid" rankings and
    written to assignment CSVs; ``inertia`` is the sum of their squares (the k-means objective).
    ``confidence`` in [0, 1] says how sure the assignment is, low near a boundary between clusters: for k-means
    the relative margin ``1 - d1 / d2`` between the distances to the nearest and second-nearest centroid
    (:func:`margin_confidence`), for a GMM the posterior probability of the assigned component. ``bic`` and
    ``converged`` are set by GMMs only.
    """

    assignments: np.ndarray  # int64, (N,)
    distances: np.ndarray  # float32, (N,)
    centroids: np.ndarray  # float32, (k, D)
    inertia: float
    confidence: np.ndarray | None = None  # float32, (N,), in [0, 1]
    bic: float | None = None
    converged: bool | None = None


# The name callers used before GMMs returned the same type.
KMeansResult = ClusterResult


def margin_confidence(d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """``1 - d1 / d2`` clipped to [0, 1] (float32): 1 at a centroid, 0 midway between the two nearest centroids.

    ``d1`` / ``d2`` are the (non-squared) distances to the nearest and second-nearest centroid. Being a ratio it
    does not depend on the scale of the space, so it reads the same on pixels, embeddings and UMAP coordinates.
    Where both are 0 (a point on two coinciding centroids) the assignment is a coin toss: 0.
    """
    d1 = np.asarray(d1, dtype=np.float64)
    d2 = np.asarray(d2, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        conf = np.where(d2 > 0, 1.0 - d1 / np.where(d2 > 0, d2, 1.0), 0.0)
    return np.clip(conf, 0.0, 1.0).astype(np.float32)


def l2_normalize(x: np.ndarray, *, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Row-normalize (N, D) in ``x``'s own precision, returned as ``dtype`` (float32 unless asked for
    another); all-zero rows stay zero instead of turning into NaN. The one copy of this helper:
    downstream's kNN and retrieval use it too."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, np.finfo(np.float32).tiny)).astype(dtype, copy=False)


def _resolve_gpu(use_gpu: bool | None) -> bool:
    ngpu = faiss.get_num_gpus()
    if use_gpu is None:
        return ngpu > 0
    if use_gpu and ngpu == 0:
        raise RuntimeError("use_gpu=True but faiss sees no GPU (faiss.get_num_gpus() == 0)")
    return bool(use_gpu)


def _exact_sq_distances(
    x: np.ndarray, centroids: np.ndarray, assignments: np.ndarray
) -> np.ndarray:
    """||x_i - c_{a_i}||^2 (float64) computed from the explicit difference.

    faiss' flat L2 search expands ||x||^2 + ||c||^2 - 2<x, c>, which loses
    precision (and can go slightly negative) for nearby points; the explicit
    difference is exact to float32 rounding and cheap compared to clustering.
    """
    out = np.empty(x.shape[0], dtype=np.float64)
    for start in range(0, x.shape[0], _DIST_BLOCK):
        stop = start + _DIST_BLOCK
        diff = (x[start:stop] - centroids[assignments[start:stop]]).astype(np.float64)
        out[start:stop] = np.einsum("ij,ij->i", diff, diff)
    return out


def kmeans(
    x,
    k: int,
    *,
    niter: int = 50,
    nredo: int = 1,
    seed: int = 0,
    spherical: bool = False,
    use_gpu: bool | None = None,
    max_points_per_centroid: int | None = None,
    init_centroids=None,
) -> ClusterResult:
    """Cluster the rows of ``x`` into ``k`` groups with ``faiss.Kmeans``.

    Args:
        x: (N, D) array-like of finite values; converted to contiguous float32.
        k: number of clusters, ``1 <= k <= N``.
        niter: Lloyd iterations per run.
        nredo: independent runs; faiss keeps the one with the lowest objective.
        seed: faiss RNG seed (initialisation and subsampling); a fixed seed gives
            identical results run to run on the same hardware.
        spherical: L2-normalize ``x`` first and keep centroids on the unit
            sphere (cosine k-means, the usual choice for SSL embeddings).
            Distances/inertia are then measured on the normalized points.
        use_gpu: ``None`` = GPU iff ``faiss.get_num_gpus() > 0``; ``True``
            requires a GPU (RuntimeError otherwise); ``False`` forces CPU.
        max_points_per_centroid: faiss subsamples the training set to
            ``k * max_points_per_centroid`` points; ``None`` keeps faiss'
            default (256). All N points are assigned regardless.
        init_centroids: optional (k, D) starting centroids instead of faiss'
            random points (e.g. to compare implementations from one start);
            with ``nredo > 1`` every run starts from them.

    Returns:
        :class:`ClusterResult` with the final assignment of every point to its
        nearest centroid and its margin confidence (1.0 everywhere when k == 1).

    Raises:
        ValueError: x is not 2-D / has no columns / has non-finite values, or
            k is not in ``[1, N]``.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"kmeans: x must be a 2-D (N, D) array, got shape {x.shape}")
    n, d = x.shape
    if d < 1:
        raise ValueError(f"kmeans: x must have at least one column, got shape {x.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"kmeans: k must be an integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"kmeans: k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"kmeans: k={k} exceeds the number of points N={n}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"kmeans: x contains NaN/inf values in {bad} of {n} rows")
    if niter < 1 or nredo < 1:
        raise ValueError(f"kmeans: niter and nredo must be >= 1, got niter={niter}, nredo={nredo}")
    if spherical:
        x = np.ascontiguousarray(l2_normalize(x))

    gpu = _resolve_gpu(use_gpu)
    params = dict(
        niter=int(niter),
        nredo=int(nredo),
        seed=int(seed),
        spherical=bool(spherical),
        verbose=False,
        # Small evaluation sets (e.g. 10 clusters of a few hundred points) are
        # normal here; faiss' "please provide at least 39*k points" warning is noise.
        min_points_per_centroid=1,
    )
    if max_points_per_centroid is not None:
        if max_points_per_centroid < 1:
            raise ValueError(
                f"kmeans: max_points_per_centroid must be >= 1, got {max_points_per_centroid}"
            )
        params["max_points_per_centroid"] = int(max_points_per_centroid)
    if gpu:
        params["gpu"] = True

    init = None
    if init_centroids is not None:
        init = np.ascontiguousarray(init_centroids, dtype=np.float32)
        if init.shape != (k, d):
            raise ValueError(f"kmeans: init_centroids must have shape ({k}, {d}), got {init.shape}")
        if spherical:
            init = np.ascontiguousarray(l2_normalize(init))

    km = faiss.Kmeans(d, k, **params)
    km.train(x, init_centroids=init)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(k, d)
    if spherical:
        # faiss already renormalizes each iteration; redo it so the invariant
        # also holds for its k == N shortcut, which copies the points verbatim.
        centroids = np.ascontiguousarray(l2_normalize(centroids))

    # Assign with an L2 index even in spherical mode (km.index is then an inner
    # product index): for unit-norm points and centroids argmin L2 == argmax IP,
    # and L2 keeps the non-normalized case on the same code path.
    index = faiss.IndexFlatL2(d)
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    nearest = min(2, k)
    _, idx = index.search(x, nearest)
    assignments = idx[:, 0].astype(np.int64)

    sq = _exact_sq_distances(x, centroids, assignments)
    distances = np.sqrt(sq).astype(np.float32)
    if k >= 2:
        # the second-nearest centroid's exact distance; where faiss' expanded distances misorder a near-tie
        # (sq2 < sq) the margin clips to 0, which is what a tie is
        sq2 = _exact_sq_distances(x, centroids, idx[:, 1].astype(np.int64))
        confidence = margin_confidence(np.sqrt(sq), np.sqrt(sq2))
    else:
        confidence = np.ones(n, dtype=np.float32)
    inertia = float(sq.sum())
    return ClusterResult(
        assignments=assignments, distances=distances, centroids=centroids, inertia=inertia,
        confidence=confidence,
    )
