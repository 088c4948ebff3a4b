"""External clustering quality metrics (ground-truth labels vs. cluster ids).

Everything is derived from the (clusters x classes) contingency matrix so the
cost is O(N + K*C) even for pair-counting scores. All functions return plain
python floats so results can be logged to MLflow / JSON without conversion.
Labels and cluster ids may be any hashable numpy-compatible values (ints,
strings); only equality matters.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = ["nmi", "ari", "cluster_accuracy", "purity", "pair_f1", "cluster_metrics"]


def _check(labels, clusters) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    clusters = np.asarray(clusters)
    if labels.ndim != 1 or clusters.ndim != 1:
        raise ValueError(
            f"labels and clusters must be 1-D, got shapes {labels.shape} and {clusters.shape}"
        )
    if labels.shape[0] != clusters.shape[0]:
        raise ValueError(
            f"labels and clusters differ in length: {labels.shape[0]} vs {clusters.shape[0]}"
        )
    if labels.shape[0] == 0:
        raise ValueError("labels and clusters are empty")
    return labels, clusters


def _contingency(labels, clusters) -> np.ndarray:
    """Counts ``m[j, i]`` = #points in cluster j (row) with class i (column)."""
    labels, clusters = _check(labels, clusters)
    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    n_y, n_c = int(y.max()) + 1, int(c.max()) + 1
    flat = np.bincount(c.ravel() * n_y + y.ravel(), minlength=n_c * n_y)
    return flat.reshape(n_c, n_y).astype(np.int64)


def _pairs(counts: np.ndarray) -> int:
    """sum of n*(n-1)/2 over counts, exact in python ints."""
    counts = counts.astype(np.int64).ravel()
    return int((counts * (counts - 1) // 2).sum())


def nmi(labels, clusters) -> float:
    """Normalized mutual information ``2 I(Y;C) / (H(Y) + H(C))``.

    Arithmetic normalization matches the convention of most SSL clustering
    papers (DeepCluster, SCAN). Two single-cluster partitions score 1.0.
    """
    labels, clusters = _check(labels, clusters)
    return float(normalized_mutual_info_score(labels, clusters, average_method="arithmetic"))


def ari(labels, clusters) -> float:
    """Adjusted Rand index: pair agreement corrected for chance (0 ~ random, 1 = identical)."""
    labels, clusters = _check(labels, clusters)
    return float(adjusted_rand_score(labels, clusters))


def cluster_accuracy(labels, clusters) -> float:
    """Accuracy under the best one-to-one cluster -> class mapping (Hungarian).

    With more clusters than classes the unmatched clusters count as errors
    (and vice versa), which is the standard "unsupervised clustering accuracy";
    use :func:`purity` for the many-to-one view.
    """
    m = _contingency(labels, clusters)
    rows, cols = linear_sum_assignment(m, maximize=True)
    return float(m[rows, cols].sum() / m.sum())


def purity(labels, clusters) -> float:
    """Fraction of points whose class is the majority class of their cluster.

    Many-to-one, so it grows trivially with the number of clusters; report it
    next to NMI/ACC, never alone.
    """
    m = _contingency(labels, clusters)
    return float(m.max(axis=1).sum() / m.sum())


def pair_f1(labels, clusters) -> float:
    """F1 of "same cluster" as a predictor of "same class" over all point pairs.

    precision = TP / #pairs sharing a cluster, recall = TP / #pairs sharing a
    class, with TP = #pairs sharing both; counted from the contingency matrix
    instead of enumerating the O(N^2) pairs. When neither partition has any
    same-group pair (all singletons on both sides) the partitions are
    identical and the score is 1.0; otherwise an empty denominator gives 0.
    """
    m = _contingency(labels, clusters)
    tp = _pairs(m)
    same_cluster = _pairs(m.sum(axis=1))
    same_class = _pairs(m.sum(axis=0))
    if same_cluster == 0 and same_class == 0:
        return 1.0
    if tp == 0:
        return 0.0
    precision = tp / same_cluster
    recall = tp / same_class
    return float(2 * precision * recall / (precision + recall))


def cluster_metrics(labels, clusters) -> dict[str, float]:
    """All metrics above in one dict (keys: nmi, ari, cluster_accuracy, purity, pair_f1)."""
    return {
        "nmi": nmi(labels, clusters),
        "ari": ari(labels, clusters),
        "cluster_accuracy": cluster_accuracy(labels, clusters),
        "purity": purity(labels, clusters),
        "pair_f1": pair_f1(labels, clusters),
    }
