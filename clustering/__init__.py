"""Clustering of embedding matrices: k-means, external metrics, plots, CSV artifacts.

Pure numpy/faiss/sklearn functions (no torch, ray, mlflow or ``pipeline``
imports) so they can run in any worker and be unit-tested in isolation.
"""

from .assignments import read_assignments, write_assignments
from .choose_k import ChooseKResult, choose_k
from .kmeans import KMeansResult, kmeans, l2_normalize
from .metrics import ari, cluster_accuracy, cluster_metrics, nmi, pair_f1, purity
from .plots import cluster_grid, cluster_pages, embedding_2d, scatter_plot, silhouette_plot
from .report import html_report

__all__ = [
    "KMeansResult",
    "kmeans",
    "l2_normalize",
    "ChooseKResult",
    "choose_k",
    "nmi",
    "ari",
    "cluster_accuracy",
    "purity",
    "pair_f1",
    "cluster_metrics",
    "embedding_2d",
    "scatter_plot",
    "cluster_grid",
    "cluster_pages",
    "silhouette_plot",
    "html_report",
    "write_assignments",
    "read_assignments",
]
