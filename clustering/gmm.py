"""Gaussian mixture clustering (scikit-learn's GaussianMixture) in the same result shape as k-means.

A mixture gives each point a posterior probability per component: the assigned component's posterior is the
point's confidence, and clusters may differ in size and spread, which k-means' equal spherical cells cannot.
It pays off in a low-dimensional space (UMAP coordinates, :mod:`clustering.manifold`); on a 2048-d embedding
it is a slower k-means with per-dimension variances.
"""

from __future__ import annotations

import warnings

import numpy as np

from .kmeans import ClusterResult

__all__ = ["gmm", "default_covariance"]

# Up to this many dimensions a component gets a full covariance matrix, above it a diagonal one.
FULL_COVARIANCE_MAX_DIM = 32


def default_covariance(dim: int) -> str:
    """``full`` up to 32 dimensions (UMAP coordinates: D(D+1)/2 = 55 parameters per component at 10-d, and
    UMAP's clusters are elongated and tilted), ``diag`` above (a full D x D covariance of a 2048-d embedding
    is 2 million parameters per component, singular on a few thousand points and slow)."""
    return "full" if dim <= FULL_COVARIANCE_MAX_DIM else "diag"


def gmm(x, k: int, *, covariance: str | None = None, max_iter: int = 100, n_init: int = 1, seed: int = 0,
        reg_covar: float = 1e-6) -> ClusterResult:
    """Fit a ``k``-component Gaussian mixture to the rows of ``x`` and assign each point to its most probable
    component.

    Args:
        x: (N, D) finite values.
        k: components, ``1 <= k <= N``.
        covariance: ``full``, ``diag``, ``tied`` or ``spherical``; None: :func:`default_covariance`.
        max_iter: EM iterations per initialisation (bounded: a run that has not converged by then keeps its
            last estimate, and ``converged`` says so).
        n_init: initialisations (each from a seeded k-means); the highest-likelihood one is kept.
        seed: seeds the initialisations; a fixed seed gives identical results run to run.
        reg_covar: added to every covariance diagonal (keeps constant pixels or dimensions from making a
            covariance singular).

    Returns:
        :class:`~clustering.kmeans.ClusterResult`: ``centroids`` are the component means, ``distances`` the
        Euclidean distances to the assigned mean, ``confidence`` the assigned component's posterior
        probability (>= 1/k), ``bic`` the Bayesian information criterion of the fit, ``converged`` whether EM
        converged within ``max_iter``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"gmm: x must be a 2-D (N, D) array with D >= 1, got shape {x.shape}")
    n, d = x.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= n:
        raise ValueError(f"gmm: k must be an integer in [1, N={n}], got {k!r}")
    k = int(k)
    x = np.ascontiguousarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("gmm: x contains NaN/inf values")
    if max_iter < 1 or n_init < 1:
        raise ValueError(f"gmm: max_iter and n_init must be >= 1, got {max_iter} and {n_init}")
    covariance = covariance or default_covariance(d)

    model = GaussianMixture(n_components=k, covariance_type=covariance, max_iter=int(max_iter),
                            n_init=int(n_init), random_state=int(seed), reg_covar=float(reg_covar),
                            init_params="kmeans")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported through `converged`
        model.fit(x)
    posteriors = model.predict_proba(x)
    assignments = posteriors.argmax(axis=1).astype(np.int64)
    confidence = np.clip(posteriors[np.arange(n), assignments], 0.0, 1.0).astype(np.float32)
    means = model.means_
    diff = x - means[assignments]
    sq = np.einsum("ij,ij->i", diff, diff)
    return ClusterResult(
        assignments=assignments, distances=np.sqrt(sq).astype(np.float32),
        centroids=np.ascontiguousarray(means, dtype=np.float32), inertia=float(sq.sum()),
        confidence=confidence, bic=float(model.bic(x)), converged=bool(model.converged_),
    )
