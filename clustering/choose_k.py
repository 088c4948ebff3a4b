"""Choosing k when the number of groups is unknown: k-means (or a GMM) for every k in a range, best silhouette wins.

The silhouette (mean over points of (b - a) / max(a, b), a = mean distance to the own cluster, b = to the
nearest other cluster) needs no labels and peaks at the k that gives compact, well-separated groups.
It costs O(M^2) distances, so it is measured on a seeded sample of at most ``max_points`` rows; every k
is scored on the same sample.

GMMs are scored by the silhouette too, not by BIC: BIC rewards as many Gaussians as it takes to tile each
group, and groups that are not Gaussian (UMAP's clusters, an embedding's classes) get split. Their BIC per k
is recorded next to it (``ChooseKResult.bics``) for a look.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gmm import gmm
from .kmeans import ClusterResult, kmeans, l2_normalize

__all__ = ["ChooseKResult", "choose_k"]


@dataclass
class ChooseKResult:
    """The chosen k, its clustering, and the silhouette (GMMs: and the BIC) of every k tried (in order)."""

    k: int
    silhouettes: dict[int, float]
    result: ClusterResult
    bics: dict[int, float] | None = None


def choose_k(x, k_min: int = 2, k_max: int = 20, *, spherical: bool = False, niter: int = 50, seed: int = 0,
             max_points: int = 3000, algorithm: str = "kmeans", covariance: str | None = None) -> ChooseKResult:
    """Run :func:`kmeans` (``algorithm="gmm"``: :func:`~clustering.gmm.gmm` with ``niter`` EM iterations and
    ``covariance``) for k = k_min..k_max and keep the k with the highest silhouette.

    Silhouette distances are Euclidean on the clustered points (L2-normalized when ``spherical``, where
    Euclidean order equals cosine order). Ties go to the smaller k. ``k_max`` is capped at N - 1, the
    largest k a silhouette is defined for.
    """
    from sklearn.metrics import silhouette_score

    if algorithm not in ("kmeans", "gmm"):
        raise ValueError(f"choose_k: algorithm must be 'kmeans' or 'gmm', got {algorithm!r}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"choose_k: x must be a 2-D (N, D) array, got shape {x.shape}")
    n = x.shape[0]
    if k_min < 2:
        raise ValueError(f"choose_k: k_min must be >= 2 (a silhouette needs two clusters), got {k_min}")
    if n < 3 or k_min > n - 1:
        raise ValueError(f"choose_k: {n} points cannot be split into k_min={k_min} clusters with a silhouette")
    k_max = min(int(k_max), n - 1)
    if k_max < k_min:
        raise ValueError(f"choose_k: k_max={k_max} is below k_min={k_min}")

    points = l2_normalize(x) if spherical else x
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)

    silhouettes: dict[int, float] = {}
    bics: dict[int, float] = {}
    best: tuple[float, int, ClusterResult] | None = None
    for k in range(int(k_min), k_max + 1):
        if algorithm == "gmm":
            res = gmm(points, k, covariance=covariance, max_iter=niter, seed=seed)
            bics[k] = float(res.bic)
        else:
            res = kmeans(x, k, niter=niter, seed=seed, spherical=spherical)
        labels = res.assignments[sample]
        if not 2 <= len(np.unique(labels)) <= len(sample) - 1:  # silhouette undefined on this sample
            score = -1.0
        else:
            score = float(silhouette_score(points[sample], labels, metric="euclidean"))
        silhouettes[k] = score
        if best is None or score > best[0]:
            best = (score, k, res)
    assert best is not None
    return ChooseKResult(k=best[1], silhouettes=silhouettes, result=best[2], bics=bics or None)
