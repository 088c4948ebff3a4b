"""Seeded, class-stratified subsets of a labeled set (the one copy: data subsets and label fractions)."""

from __future__ import annotations

import numpy as np

__all__ = ["stratified_sample"]


def stratified_sample(labels, count: int | None = None, seed: int = 0, *, fraction: float | None = None,
                      min_per_class: int = 0) -> np.ndarray:
    """Sorted positions into ``labels`` of a seeded subset that keeps the class balance.

    Give exactly one of ``count`` and ``fraction``; they select how per-class quotas are rounded:

    - ``count``: exactly ``count`` images in all. Quotas ``n_c * count / N`` are floored and the
      remainder goes by largest fractional part (ties to the smaller label, seed-free).
    - ``fraction``: each class keeps ``round(fraction * n_c)`` images (half to even), so the total
      follows the classes rather than a fixed number.

    Either way a quota is raised to ``min_per_class`` (capped at the class size), e.g. 1 so that rare
    classes are not dropped; that can make the total exceed ``count``. Within a class the images are
    drawn without replacement from one ``numpy.random.default_rng(seed)`` in label order; a class whose
    quota is 0 draws nothing (the draws of the others do not depend on it).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if (count is None) == (fraction is None):
        raise ValueError("give exactly one of count and fraction")
    values, counts = np.unique(labels, return_counts=True)
    if count is not None:
        if not 0 <= count <= len(labels):
            raise ValueError(f"count must lie in [0, {len(labels)}], got {count}")
        exact = counts * (count / counts.sum()) if len(labels) else counts.astype(np.float64)
        quota = np.floor(exact).astype(np.int64)
        remainder = count - int(quota.sum())
        if remainder:
            # Largest fractional parts first; ties go to the smaller label (deterministic, seed-free).
            order = np.lexsort((values, -(exact - quota)))
            quota[order[:remainder]] += 1
    else:
        quota = np.array([int(round(fraction * int(n))) for n in counts], dtype=np.int64)
    quota = np.minimum(np.maximum(quota, min_per_class), counts)
    rng = np.random.default_rng(seed)
    picked = [np.zeros(0, dtype=np.int64)]
    for value, q in zip(values, quota):
        if q:
            members = np.flatnonzero(labels == value)
            picked.append(rng.choice(members, size=int(q), replace=False))
    return np.sort(np.concatenate(picked))
