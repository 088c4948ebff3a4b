"""UMAP to a few dimensions before clustering (N2D: McConville et al. 2020, "N2D: (Not Too) Deep Clustering
via Clustering the Local Manifold of an Autoencoded Embedding").

k-means on an embedding assumes round clusters of equal size in the embedding's own geometry; UMAP keeps each
point's nearest neighbours together and pulls apart groups that are only connected through thin bridges, so
k-means (or a Gaussian mixture) on UMAP coordinates follows the manifold of the data instead. UMAP is fitted on
a seeded sample of at most ``fit_sample`` points (its cost grows faster than linearly) and every point is then
placed with ``transform``, a chunk at a time.
"""

from __future__ import annotations

import numpy as np

__all__ = ["umap_reduce"]

# Rows per `transform` call: bounds its temporary neighbour graph.
_TRANSFORM_CHUNK = 10_000


def _import_umap():
    try:
        import umap  # slow to import (numba) -> only when asked for
    except Exception as e:  # missing, or a broken numba/llvmlite install failing at import
        raise ImportError(
            f"cluster_space: umap could not import umap-learn ({type(e).__name__}: {e}); pip install umap-learn"
        ) from e
    return umap


def umap_reduce(x, n_components: int = 10, *, metric: str = "cosine", n_neighbors: int = 15,
                min_dist: float = 0.0, fit_sample: int = 20_000, seed: int = 0,
                chunk: int = _TRANSFORM_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """UMAP coordinates of every row of ``x`` for clustering.

    Args:
        x: (N, D) finite features.
        n_components: output dimensions (N2D uses the number of clusters; 10 is a good default: enough room
            for ten groups, few enough for k-means and a full-covariance GMM).
        metric: the input space's distance; ``cosine`` for SSL embeddings.
        n_neighbors: the neighbourhood UMAP preserves: small values keep fine local structure (and split
            clusters), large ones more of the global layout. Capped at M - 1 for M fitted points.
        min_dist: how tightly points may pack in the output; 0 (N2D's choice) gives compact clusters, the
            right thing for clustering (the 0.1 default is for pictures).
        fit_sample: at most this many points (a seeded sample) are fitted; with N above it, all N are placed
            by ``transform`` in chunks of ``chunk`` rows (the fitted ones too, so every point is treated
            alike). With N at or below it, the fitted layout itself is returned.
        seed: seeds the sample and UMAP (which then runs single-threaded: reproducible, not parallel).

    Returns:
        ``(coords, fitted)``: float32 (N, n_components) and the sorted int64 indices of the fitted points.

    Raises:
        ValueError: bad shapes or values, or too few points for ``n_components`` (UMAP's spectral start needs
            more points than output dimensions plus one).
        ImportError: umap-learn cannot be imported.
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"umap_reduce: x must be a 2-D (N, D) array with D >= 1, got shape {x.shape}")
    if n_components < 1 or n_neighbors < 2 or fit_sample < 2 or chunk < 1:
        raise ValueError(f"umap_reduce: need n_components >= 1, n_neighbors >= 2, fit_sample >= 2 and chunk >= 1, "
                         f"got {n_components}, {n_neighbors}, {fit_sample} and {chunk}")
    n = x.shape[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("umap_reduce: x contains NaN/inf values")
    rng = np.random.default_rng(seed)
    fitted = (np.sort(rng.choice(n, size=fit_sample, replace=False)) if n > fit_sample else np.arange(n)).astype(np.int64)
    m = fitted.size
    if m < n_components + 2:
        raise ValueError(f"umap_reduce: {m} points are too few for {n_components} UMAP dimensions "
                         f"(at least {n_components + 2} are needed)")

    umap = _import_umap()
    reducer = umap.UMAP(n_components=int(n_components), metric=metric, n_neighbors=int(min(n_neighbors, m - 1)),
                        min_dist=float(min_dist), random_state=int(seed), transform_seed=int(seed), n_jobs=1)
    if m == n:
        return np.asarray(reducer.fit_transform(x), dtype=np.float32), fitted
    reducer.fit(x[fitted])
    coords = np.empty((n, int(n_components)), dtype=np.float32)
    for start in range(0, n, chunk):
        coords[start:start + chunk] = reducer.transform(x[start:start + chunk])
    return coords, fitted
