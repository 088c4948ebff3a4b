"""Clustering of embedding matrices: k-means, GMMs, UMAP reduction, external metrics, plots, CSV artifacts.

Pure numpy/faiss/sklearn (and, lazily, umap-learn) functions (no torch, ray, mlflow or ``pipeline``
imports) so they can run in any worker and be unit-tested in isolation.
"""

from .assignments import read_assignments, write_assignments
from .choose_k import ChooseKResult, choose_k
from .gmm import gmm
from .kmeans import ClusterResult, KMeansResult, kmeans, l2_normalize, margin_confidence
from .manifold import umap_reduce
from .metrics import ari, cluster_accuracy, cluster_metrics, nmi, pair_f1, purity
from .plots import cluster_grid, cluster_pages, embedding_2d, image_page, scatter_plot, silhouette_plot
from .report import html_report

__all__ = [
    "ClusterResult",
    "KMeansResult",
    "kmeans",
    "margin_confidence",
    "gmm",
    "umap_reduce",
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
    "image_page",
    "silhouette_plot",
    "html_report",
    "write_assignments",
    "read_assignments",
]
