"""Retrieval metrics of an embedding: every query ranks a gallery; a gallery image is relevant when it shares
the query's label.

Two protocols:

* leave-one-out (the metric-learning protocol, CUB/Cars/SOP): the evaluation split is both the queries and
  the gallery, each query's own row is removed from its ranking. With disjoint train/eval classes this is
  unseen-class evaluation.
* queries = evaluation split, gallery = training split (``gallery_x``/``gallery_labels``).

Either way a query must not find its own image: ``exclude`` (a :class:`downstream.exclusion.Exclusion`, e.g.
built from image ids or pixel digests) lists per query the gallery items that ARE the query's image. They are
left out of the ranking (reported as index -1 at its end) and of R, so an evaluation split that overlaps
the gallery cannot score by finding itself. Leave-one-out without ``exclude`` removes the query's own row by
position.

Distances: ``euclidean``, ``cosine`` (L2-normalised, inner product) and ``mahalanobis`` (Euclidean after
whitening with the mean and shrunk inverse-square-root covariance of the TRAINING embeddings, so the
evaluation split never shapes its own metric).

Queries whose label has no relevant gallery image (R = 0) cannot score and are left out of every metric, as
in pytorch-metric-learning's AccuracyCalculator; ``retrieval_queries`` says how many remained.

Past the exact limit the cost can also be bounded (:func:`retrieval_metrics` ``max_queries``, ``max_depth``): a
seeded sample of queries, and a search depth that does not grow with R. R-precision and MAP@R with R capped at
that depth are other metrics than the exact ones and are reported as ``r_precision_capped`` / ``map_at_r_capped``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from downstream.exclusion import Exclusion

DISTANCES = ("euclidean", "cosine", "mahalanobis", "lmnn")
DEFAULT_RECALL_AT = (1, 2, 4, 8)
LARGE_SET_RECALL_AT = (10, 100)
LARGE_SET = 1000  # galleries larger than this also get Recall@10/@100 by default
# Galleries up to this size are ranked in full (exact mAP); larger ones go through a faiss k-NN search
# to the depth MAP@R and Recall@K need (a full ranking is O(N^2) memory and sort time).
EXACT_RANKING_MAX = 20_000

# Queries per block of the full ranking: the (block, gallery) distance, index and relevance arrays together
# stay near this many bytes.
_BLOCK_BYTES = 64 * 2**20


# --------------------------------------------------------------------------------------------- whitening


@dataclass
class Whitening:
    """x -> (x - mean) @ matrix: Euclidean distance after it is the Mahalanobis distance of the fitted set."""

    mean: np.ndarray  # (D,)
    matrix: np.ndarray  # (D, D): diag(1 / std) @ shrunk_correlation ** -1/2
    shrinkage: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.ascontiguousarray((x - self.mean) @ self.matrix, dtype=np.float32)


def fit_whitening(x: np.ndarray, shrinkage: float | str = "auto", eps: float = 1e-8) -> Whitening:
    """Mean and inverse square root of the covariance, shrunk towards its own diagonal.

    Each dimension is standardised first and the correlation matrix is shrunk towards the identity,
    ``corr_s = (1 - s) * corr + s * I``, so the shrinkage does not depend on the units of each dimension
    (shrinking the raw covariance towards a multiple of I would drown a small-variance dimension that
    carries the signal). Shrinkage keeps the inverse bounded when the covariance is (near) singular:
    ReLU features with dead units, or fewer images than dimensions. ``"auto"`` takes s from the
    Ledoit-Wolf estimate on the standardised data; 0 is the plain sample covariance (whitened training
    data then has exactly identity covariance); 1 only rescales each dimension to unit variance.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"fit_whitening: need a 2-D array with at least 2 rows, got shape {x.shape}")
    mean = x.mean(axis=0)
    centred = x - mean
    std = centred.std(axis=0)
    std = np.where(std > max(float(std.max()), 1e-30) * eps, std, np.inf)  # constant dims map to 0
    z = centred / std
    if shrinkage == "auto":
        from sklearn.covariance import ledoit_wolf_shrinkage

        s = float(ledoit_wolf_shrinkage(z, assume_centered=True))
    elif isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool) and 0.0 <= float(shrinkage) <= 1.0:
        s = float(shrinkage)
    else:
        raise ValueError(f"fit_whitening: shrinkage must be 'auto' or a number in [0, 1], got {shrinkage!r}")
    d = z.shape[1]
    corr = z.T @ z / len(z)
    shrunk = (1.0 - s) * corr + s * np.eye(d)
    values, vectors = np.linalg.eigh(shrunk)
    floor = max(float(values.max()), 1e-30) * eps  # a singular direction is not blown up to infinity
    inv_sqrt = (vectors / np.sqrt(np.maximum(values, floor))) @ vectors.T
    return Whitening(mean=mean, matrix=inv_sqrt / std[:, None], shrinkage=s)


# --------------------------------------------------------------------------------------------- ranking


def _prepare(queries: np.ndarray, gallery: np.ndarray, distance: str, whitening: Whitening | None):
    """The vectors to compare, in float64: whitened for mahalanobis, unit-norm for cosine."""
    if distance not in DISTANCES:
        raise ValueError(f"retrieval distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
    if distance in ("mahalanobis", "lmnn"):
        if whitening is None:
            raise ValueError(f"{distance} distance needs a linear map fitted on the training embeddings")
        queries, gallery = whitening(queries), whitening(gallery)
    queries = np.asarray(queries, dtype=np.float64)
    gallery = np.asarray(gallery, dtype=np.float64)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"retrieval: queries {queries.shape} and gallery {gallery.shape} must be (N, D) with one D")
    if distance == "cosine":
        from clustering import l2_normalize

        queries, gallery = l2_normalize(queries, dtype=np.float64), l2_normalize(gallery, dtype=np.float64)
    return queries, gallery


def _excluded_gallery(queries: np.ndarray, gallery: np.ndarray | None, exclude: Exclusion | None):
    """(gallery or the queries, leave-one-out by position?, exclusion or None) after checking the sizes."""
    if exclude is None:
        return gallery, gallery is None, None
    n_gallery = len(queries) if gallery is None else len(gallery)
    exclude.check(len(queries), n_gallery)
    return (queries if gallery is None else gallery), False, exclude


def ranked_gallery(queries: np.ndarray, gallery: np.ndarray | None = None, *, distance: str = "cosine",
                   whitening: Whitening | None = None, block: int | None = None, exclude: Exclusion | None = None):
    """Yield ``(rows, ranking)`` blocks: the whole gallery's indices (block, G) per query, nearest first.

    ``gallery=None`` is leave-one-out: the gallery is the queries and each query's own row is removed
    (by index, so exact duplicates of it stay in the ranking). With ``exclude`` (see the module docstring)
    its pairs are removed instead (``gallery=None`` then means the gallery is the queries): each ranking
    keeps its G columns, the excluded items come last as -1. Ties keep gallery order (stable sort), so
    rankings are reproducible. mAP needs the full ranking, which is why this sorts BLAS distances instead
    of asking faiss for k = G neighbours (its heap search measured 4x slower on CPU for 5000 x 5000).
    """
    gallery, loo, exclude = _excluded_gallery(queries, gallery, exclude)
    q, g = _prepare(queries, queries if loo else gallery, distance, whitening)
    n_gallery = len(g) - (int(loo) if exclude is None else exclude.min_per_query)
    if n_gallery < 1 or (exclude is not None and exclude.max_per_query >= len(g)):
        raise ValueError(f"retrieval needs at least one gallery image per query, got a gallery of "
                         f"{min(n_gallery, len(g) - (exclude.max_per_query if exclude is not None else 0))}")
    # Per query the ranking only needs ||g||^2 - 2 q.g (euclidean) or -q.g (cosine: unit vectors).
    g_sq = (g * g).sum(axis=1) if distance != "cosine" else np.zeros(len(g))
    block = block or max(1, _BLOCK_BYTES // (40 * len(g)))
    for start in range(0, len(q), block):
        rows = np.arange(start, min(start + block, len(q)))
        scores = g_sq[None, :] - 2.0 * (q[rows] @ g.T)
        if loo:
            scores[np.arange(len(rows)), rows] = np.inf  # self sorts last, then is cut off
        if exclude is not None:
            scores[exclude.pairs(start, start + len(rows))] = np.inf  # sort last, then become -1
        ranking = np.argsort(scores, axis=1, kind="stable")
        if exclude is not None:
            left = len(g) - exclude.counts[rows]
            ranking[np.arange(len(g))[None, :] >= left[:, None]] = -1
        yield rows, ranking[:, :n_gallery] if loo else ranking


def faiss_ranked_gallery(queries: np.ndarray, gallery: np.ndarray | None = None, *, depth: int,
                         distance: str = "cosine", whitening: Whitening | None = None, use_gpu: bool | None = None,
                         exclude: Exclusion | None = None):
    """Like :func:`ranked_gallery`, but only each query's `depth` nearest gallery images, from a faiss flat
    index (on all GPUs when faiss sees one): what large galleries use. Leave-one-out drops the query's own
    row (searching one neighbour deeper); ``exclude`` drops its pairs (searching ``max_per_query`` deeper),
    a query with fewer than `depth` gallery items left gets -1 at the end of its ranking."""
    import faiss

    gallery, loo, exclude = _excluded_gallery(queries, gallery, exclude)
    q, g = _prepare(queries, queries if loo else gallery, distance, whitening)
    q, g = np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(g, dtype=np.float32)
    fewest_excluded = int(loo) if exclude is None else exclude.min_per_query
    depth = min(int(depth), len(g) - fewest_excluded)
    if depth < 1 or (exclude is not None and exclude.max_per_query >= len(g)):
        raise ValueError(f"retrieval needs at least one gallery image per query, got a gallery of {len(g) - fewest_excluded}")
    k = depth + int(loo) if exclude is None else min(len(g), depth + exclude.max_per_query)
    index = faiss.IndexFlatIP(g.shape[1]) if distance == "cosine" else faiss.IndexFlatL2(g.shape[1])
    if faiss.get_num_gpus() > 0 and use_gpu is not False and k <= 2048:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(g)
    block = max(1, _BLOCK_BYTES // (16 * k))
    for start in range(0, len(q), block):
        rows = np.arange(start, min(start + block, len(q)))
        _, found = index.search(q[rows], k)
        if loo:
            not_self = found != rows[:, None]
            # the first `depth` entries that are not the query itself (if it was not found, the last is cut)
            order = np.argsort(~not_self, axis=1, kind="stable")[:, :depth]
            found = np.take_along_axis(found, order, axis=1)
        elif exclude is not None:
            dropped = exclude.mask(start, found) | (found < 0)
            order = np.argsort(dropped, axis=1, kind="stable")[:, :depth]
            found = np.where(np.take_along_axis(dropped, order, axis=1), -1, np.take_along_axis(found, order, axis=1))
        yield rows, found.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------- metrics


def relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, leave_one_out: bool,
                    exclude: Exclusion | None = None) -> np.ndarray:
    """R per query: how many gallery images share its label (itself excluded in leave-one-out, the query's
    own images in ``exclude`` excluded when given)."""
    values, counts = np.unique(gallery_labels, return_counts=True)
    lookup = dict(zip(values.tolist(), counts.tolist()))
    query_labels = np.asarray(query_labels)
    r = np.array([lookup.get(v, 0) for v in query_labels.tolist()], dtype=np.int64)
    if exclude is not None:
        exclude.check(len(query_labels), len(gallery_labels))
        rows, banks = exclude.pairs(0, exclude.n_queries)
        same = np.asarray(gallery_labels)[banks] == query_labels[rows]
        return r - np.bincount(rows[same], minlength=len(r))
    return r - 1 if leave_one_out else r


def ranking_metrics(relevant: np.ndarray, r: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-query metrics from a boolean relevance matrix (queries, depth) in rank order.

    ``r``: the number of relevant gallery images per query (> 0). mAP needs ``depth`` = the whole gallery;
    MAP@R and R-precision need ``depth >= r``.
      recall_at_k  1 if any of the first k is relevant
      r_precision  (#relevant among the first R) / R
      map_at_r     sum over relevant positions i <= R of precision@i, divided by R (Musgrave et al. 2020)
      map          sum over all relevant positions i of precision@i, divided by R (average precision)
    """
    relevant = np.asarray(relevant, dtype=bool)
    n, depth = relevant.shape
    if np.any(r < 1):
        raise ValueError("ranking_metrics: every query needs at least one relevant gallery image")
    if np.any(r > depth):
        raise ValueError(f"ranking_metrics: the ranking depth {depth} is shorter than R={int(r.max())}")
    positions = np.arange(1, depth + 1)
    hits = np.cumsum(relevant, axis=1)
    precision_at_hits = np.where(relevant, hits / positions, 0.0)
    within_r = positions[None, :] <= r[:, None]
    out = {f"recall_at_{k}": relevant[:, :k].any(axis=1).astype(np.float64) for k in ks}
    out["r_precision"] = (relevant & within_r).sum(axis=1) / r
    out["map_at_r"] = (precision_at_hits * within_r).sum(axis=1) / r
    out["map"] = precision_at_hits.sum(axis=1) / r
    return out


def default_recall_at(gallery_size: int) -> list[int]:
    """Recall@1/2/4/8, plus @10/@100 on galleries of more than 1000 images."""
    ks = list(DEFAULT_RECALL_AT)
    if gallery_size > LARGE_SET:
        ks += list(LARGE_SET_RECALL_AT)
    return ks


def retrieval_metrics(features: np.ndarray, labels: np.ndarray, *, ks: Sequence[int] | None = None,
                      metric: str = "cosine", gallery_features: np.ndarray | None = None,
                      gallery_labels: np.ndarray | None = None, train_features: np.ndarray | None = None,
                      shrinkage: float | str = "auto", exact_max: int = EXACT_RANKING_MAX,
                      exclude: Exclusion | None = None, max_queries: int | None = None,
                      max_depth: int | None = None, seed: int = 0,
                      train_labels: np.ndarray | None = None) -> dict[str, float]:
    """Recall@ks, R-precision, MAP@R and mAP (full ranking) of `features` as queries.

    Galleries larger than `exact_max` are searched with faiss to the depth Recall@K and MAP@R need; mAP
    (which needs the whole ranking) is then left out. There, since that depth grows with R (all queries:
    O(N^2 / classes)), two bounds apply when given: ``max_queries`` scores a uniform sample of that many
    queries drawn with ``seed`` against the whole gallery (``retrieval_sampled_queries`` says how many were
    drawn; an unbiased estimate of the all-query means), and ``max_depth`` caps the search depth (never below
    max(ks)). When some query's R exceeds the depth, R-precision and MAP@R are computed with R capped at it
    and reported as ``r_precision_capped`` and ``map_at_r_capped`` instead of the exact names, with
    ``retrieval_depth_cap`` the depth. Galleries up to ``exact_max`` are unaffected by either.

    Without a gallery, leave-one-out on `features`; with one, queries search the gallery. `metric` is the
    distance; ``mahalanobis`` whitens with `train_features` (falling back to the gallery when it is the
    training split); ``lmnn`` learns a linear map from `train_features` and `train_labels` (downstream.lmnn). ``ks=None``: see :func:`default_recall_at`. ``exclude``: per query, the gallery items
    (the queries themselves when there is no gallery) that are the query's own image; they are neither ranked
    nor counted in R (``retrieval_excluded_matches`` says how many pairs were removed).
    """
    labels = np.asarray(labels)
    features = np.asarray(features)
    if len(labels) != len(features):
        raise ValueError(f"retrieval: {len(features)} embeddings but {len(labels)} labels")
    if exclude is not None and gallery_features is None:
        gallery_features, gallery_labels = features, labels  # the exclusion replaces the positional self-removal
    loo = gallery_features is None
    if loo:
        g_labels = labels
    else:
        if gallery_labels is None:
            raise ValueError("retrieval: a gallery needs its labels")
        g_labels = np.asarray(gallery_labels)
        if len(g_labels) != len(gallery_features):
            raise ValueError(f"retrieval: {len(gallery_features)} gallery embeddings but {len(g_labels)} labels")
    if exclude is not None:
        exclude.check(len(features), len(g_labels))
    n_gallery = len(g_labels) - (int(loo) if exclude is None else exclude.min_per_query)
    ks = sorted({int(k) for k in (default_recall_at(n_gallery) if ks is None else ks)})
    if not ks or ks[0] < 1:
        raise ValueError(f"retrieval: recall_at values must be >= 1, got {ks}")

    whitening = None
    out: dict[str, float] = {}
    if metric == "mahalanobis":
        source = train_features if train_features is not None else gallery_features
        if source is None:
            raise ValueError("retrieval: mahalanobis distance needs the training embeddings (train_features)")
        whitening = fit_whitening(source, shrinkage)
        out["retrieval_whitening_shrinkage"] = whitening.shrinkage
    elif metric == "lmnn":
        from downstream.lmnn import fit_lmnn

        if train_features is None or train_labels is None:
            raise ValueError("retrieval: lmnn learns its distance from labeled training embeddings "
                             "(train_features and train_labels)")
        mean, matrix = fit_lmnn(train_features, train_labels, seed=seed)
        whitening = Whitening(mean=mean, matrix=matrix, shrinkage=0.0)

    reports_exclusion = exclude is not None
    exact = n_gallery <= exact_max
    queries, q_labels = features, labels
    if not exact and max_queries is not None and len(features) > max_queries:
        if loo:  # a sample of the queries is no longer the gallery: its own rows are left out by index
            exclude, gallery_features, g_labels, loo = Exclusion.self_rows(len(features)), features, labels, False
        sample = np.sort(np.random.default_rng(seed).choice(len(features), int(max_queries), replace=False))
        queries, q_labels = features[sample], labels[sample]
        exclude = exclude.subset(sample) if exclude is not None else None
        out["retrieval_sampled_queries"] = float(len(sample))

    r_all = relevant_counts(q_labels, g_labels, loo, exclude)
    sums: dict[str, float] = {}
    scored = 0
    capped = False
    if exact:
        rankings = ranked_gallery(queries, None if loo else gallery_features, distance=metric, whitening=whitening,
                                  exclude=exclude)
    else:
        r_max = int(r_all.max())
        depth = max(max(ks), r_max if max_depth is None else min(r_max, int(max_depth)))
        capped = r_max > depth
        rankings = faiss_ranked_gallery(queries, None if loo else gallery_features, depth=depth, distance=metric,
                                        whitening=whitening, exclude=exclude)
    for rows, ranking in rankings:
        r = r_all[rows]
        keep = r > 0
        if not keep.any():
            continue
        found = ranking[keep]
        relevant = (g_labels[np.maximum(found, 0)] == q_labels[rows[keep]][:, None]) & (found >= 0)
        for name, values in ranking_metrics(relevant, np.minimum(r[keep], depth) if capped else r[keep], ks).items():
            if name == "map" and not exact:
                continue  # a truncated ranking cannot give the full average precision
            if capped and name in ("r_precision", "map_at_r"):
                name += "_capped"
            sums[name] = sums.get(name, 0.0) + float(values.sum())
        scored += int(keep.sum())
    if scored == 0:
        raise ValueError("retrieval: no query has a relevant gallery image (every label occurs once)")
    out.update({name: total / scored for name, total in sums.items()})
    out["retrieval_queries"] = float(scored)
    if capped:
        out["retrieval_depth_cap"] = float(depth)
    if reports_exclusion:
        out["retrieval_excluded_matches"] = float(exclude.total)
    return out
