"""Clustering of embedding matrices: k-means, external metrics, plots, CSV artifacts.

Pure numpy/faiss/sklearn functions (no torch, ray, mlflow or ``pipeline``
imports) so they can run in any worker and be unit-tested in isolation.
"""

from .assignments import read_assignments, write_assignments
from .kmeans import KMeansResult, kmeans
from .metrics import ari, cluster_accuracy, cluster_metrics, nmi, pair_f1, purity
from .plots import cluster_grid, embedding_2d, scatter_plot

__all__ = [
    "KMeansResult",
    "kmeans",
    "nmi",
    "ari",
    "cluster_accuracy",
    "purity",
    "pair_f1",
    "cluster_metrics",
    "embedding_2d",
    "scatter_plot",
    "cluster_grid",
    "write_assignments",
    "read_assignments",
]
