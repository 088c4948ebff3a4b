"""Weighted kNN classifier on frozen features: the standard SSL training monitor.

Same rule as InstDisc (Wu et al. 2018) and lightly's ``knn_predict``: cosine
similarity to the training bank, top-k neighbours, each neighbour votes for
its class with weight ``exp(sim / temperature)``, highest total wins. It needs
no training, so it is a cheap, hyper-parameter-light proxy for linear-probe
accuracy. numpy + faiss only, so it runs wherever the features are.
"""

from __future__ import annotations

import numpy as np

from clustering import l2_normalize
from downstream.exclusion import Exclusion
from pretext.search import inner_product_index

__all__ = ["knn_predict", "knn_accuracy", "Exclusion"]

# Bank rows normalized and indexed at a time in knn_predict: 8192 x 512 float32 is 16 MB.
BANK_CHUNK = 8192


def _normalized(x, name: str) -> np.ndarray:
    """Checked (N, D) input as C-contiguous float32 unit rows (what faiss takes)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN/inf values")
    # Zero rows stay zero (similarity 0 to everything) instead of becoming NaN.
    return np.ascontiguousarray(l2_normalize(x))


def _matrix(x, name: str):
    """A 2-D array-like (np.memmap stays a memmap: rows are read chunk by chunk)."""
    x = x if isinstance(x, np.ndarray) else np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {x.shape}")
    return x


class _Bank:
    """Exact top-k inner-product search over a bank held as it came (array or memmap): one flat index when
    the bank fits one chunk; otherwise chunk by chunk, merging each chunk's best into the running best."""

    def __init__(self, bank, k: int, use_gpu: bool | None, chunk: int):
        if chunk < 1:
            raise ValueError(f"bank_chunk must be >= 1, got {chunk}")
        self.bank, self.k, self.use_gpu, self.chunk = bank, k, use_gpu, chunk
        whole = len(bank) <= chunk
        self.whole = inner_product_index(_normalized(bank, "train_features"), k, use_gpu) if whole else None

    def search(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.whole is not None:
            return self.whole.search(q, self.k)
        best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
        best_i = np.full((len(q), 0), -1, dtype=np.int64)
        for start in range(0, len(self.bank), self.chunk):
            rows = self.bank[start:start + self.chunk]
            part = _normalized(rows, "train_features")
            _drop_pages(rows)
            s, i = inner_product_index(part, self.k, self.use_gpu).search(q, min(self.k, len(part)))
            s = np.where(i >= 0, s, -np.inf).astype(np.float32)
            i = np.where(i >= 0, i + start, -1)
            s, i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i], axis=1)
            top = np.argsort(-s, axis=1, kind="stable")[:, :self.k]
            best_s, best_i = np.take_along_axis(s, top, axis=1), np.take_along_axis(i, top, axis=1)
        return best_s, best_i


def _drop_pages(view) -> None:
    """Take a memory-mapped chunk, once copied, out of this process's resident set (MADV_DONTNEED on a file
    mapping: the pages stay in the page cache and are read again on the next access), so scanning a bank of
    any size leaves the resident size where it was. Anything but a shared, C-contiguous memmap on Linux: no-op."""
    import ctypes
    import mmap as mmap_module

    if not isinstance(view, np.memmap) or not view.flags.c_contiguous or not view.nbytes:
        return
    if getattr(view, "mode", "c") == "c":  # a private copy-on-write map: dropping would lose written pages
        return
    advice = getattr(mmap_module, "MADV_DONTNEED", None)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    if advice is None or not hasattr(libc, "madvise"):
        return
    page = mmap_module.PAGESIZE
    first = view.ctypes.data // page * page
    last = -(-(view.ctypes.data + view.nbytes) // page) * page
    libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(advice))


def knn_predict(
    train_features,
    train_labels,
    query_features,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    use_gpu: bool | None = None,
    batch_size: int = 4096,
    exclude_self: bool = False,
    exclude: Exclusion | None = None,
    bank_chunk: int = BANK_CHUNK,
) -> np.ndarray:
    """Predict a label for every query row by similarity-weighted kNN vote.

    Args:
        train_features: (N, D) feature bank; L2-normalized internally.
        train_labels: (N,) labels. Any values work (ints, strings); predictions
            are returned in the same label space.
        query_features: (Q, D) features to classify.
        k: neighbours per query, capped at the number of usable train points
            (so a tiny bank still works).
        temperature: softmax-style sharpness; smaller trusts the closest
            neighbours more. Weights are computed as
            ``exp((sim - max_sim) / temperature)`` per query, which ranks classes
            exactly like ``exp(sim / temperature)`` but cannot overflow.
        num_classes: optional; when given, labels must be integers in
            ``[0, num_classes)`` (a cheap check against mismatched label maps).
        use_gpu: ``None`` = GPU index iff faiss sees a GPU; ``False`` forces
            CPU; ``True`` requires a GPU. k > 2048 always runs on CPU.
        batch_size: queries per faiss search (bounds the (batch, k) buffers).
        exclude_self: the query set *is* the train set (same rows, same order),
            e.g. leave-one-out monitoring: each query's own row is dropped from
            its neighbours (the duplicate with the same index, not just "the
            first hit", so exact duplicates elsewhere in the bank still count).
        exclude: per query, the bank rows that are the query's own image
            (:class:`downstream.exclusion.Exclusion`, e.g. ``Exclusion.by_key(query_ids,
            bank_ids)``): they are never neighbours. The search asks for
            ``k + exclude.max_per_query`` neighbours and keeps the first k that
            are not excluded; a query with fewer than k bank rows left votes with
            all of them. Positional ``exclude_self`` is ``Exclusion.self_rows``.
        bank_chunk: bank rows normalized and indexed at a time (a bank larger than this is searched chunk by
            chunk and the per-chunk neighbours merged), so a memory-mapped bank of any size costs a bounded
            amount of memory; queries are normalized `batch_size` rows at a time for the same reason.

    Returns:
        (Q,) array of predicted labels (dtype of ``train_labels``). Ties between
        classes resolve to the smallest label.
    """
    train, query = _matrix(train_features, "train_features"), _matrix(query_features, "query_features")
    labels = np.asarray(train_labels)
    n, d = train.shape
    if labels.shape != (n,):
        raise ValueError(f"train_labels must have shape ({n},), got {labels.shape}")
    if query.shape[1] != d:
        raise ValueError(f"feature dims differ: train D={d}, query D={query.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_classes is not None:
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"num_classes given but train_labels are not integers ({labels.dtype})")
        if n and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"train_labels must lie in [0, num_classes={num_classes}), got range "
                f"[{labels.min()}, {labels.max()}]"
            )
    if exclude_self:
        if exclude is not None:
            raise ValueError("give exclude_self or exclude, not both")
        if query.shape[0] != n:
            raise ValueError(
                f"exclude_self=True needs query == train, got {query.shape[0]} queries vs {n} train rows"
            )
        exclude = Exclusion.self_rows(n)
    if exclude is not None:
        exclude.check(query.shape[0], n)
        if exclude.total == 0:
            exclude = None
    if n < 1:
        raise ValueError("not enough train points to find any neighbour")
    if exclude is not None and np.any(exclude.counts >= n):
        first = int(np.flatnonzero(exclude.counts >= n)[0])
        raise ValueError(f"not enough train points to find any neighbour: query {first} excludes all {n} "
                         "train rows as its own image")
    k_eff = min(int(k), n)
    k_search = min(n, k_eff + (exclude.max_per_query if exclude is not None else 0))

    classes, codes = np.unique(labels, return_inverse=True)
    codes = codes.ravel().astype(np.int64)
    c = len(classes)
    bank = _Bank(train, k_search, use_gpu, bank_chunk)

    out = np.empty(query.shape[0], dtype=np.int64)
    for start in range(0, query.shape[0], batch_size):
        q = _normalized(query[start : start + batch_size], "query_features")
        b = q.shape[0]
        sims, nbrs = bank.search(q)
        sims = sims.astype(np.float64)
        keep = nbrs >= 0
        if exclude is not None:
            keep &= ~exclude.mask(start, nbrs)
            # the first k_eff neighbours that are not the query's own image (fewer where fewer are left)
            keep &= np.cumsum(keep, axis=1) <= k_eff
        nbrs = np.where(keep, nbrs, 0)
        top = np.where(keep, sims, -np.inf).max(axis=1, keepdims=True)
        weights = np.where(keep, np.exp((np.where(keep, sims, top) - top) / temperature), 0.0)
        flat = (np.arange(b)[:, None] * c + codes[nbrs]).ravel()
        scores = np.bincount(flat, weights=weights.ravel(), minlength=b * c).reshape(b, c)
        out[start : start + b] = scores.argmax(axis=1)
    return classes[out]


def knn_accuracy(train_features, train_labels, query_features, query_labels, **kw) -> float:
    """Fraction of queries whose :func:`knn_predict` label equals ``query_labels``."""
    query_labels = np.asarray(query_labels)
    pred = knn_predict(train_features, train_labels, query_features, **kw)
    if query_labels.shape != pred.shape:
        raise ValueError(
            f"query_labels must have shape {pred.shape}, got {query_labels.shape}"
        )
    if pred.size == 0:
        raise ValueError("no queries")
    return float(np.mean(pred == query_labels))


def nearest_neighbours(features, k: int, *, use_gpu: bool | None = None, batch_size: int = 4096) -> np.ndarray:
    """(N, k) int64: each row's k most cosine-similar other rows (itself left out by position), nearest first.

    What SCAN mines once from a pretrained embedding: neighbours in a good embedding usually share a class."""
    x = _normalized(features, "features")
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"nearest_neighbours: k must be in [1, {n - 1}] for {n} rows, got {k}")
    index = inner_product_index(x, k + 1, use_gpu)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, batch_size):
        _, found = index.search(x[start:start + batch_size], k + 1)
        for i, row in enumerate(found, start):
            others = row[(row != i) & (row >= 0)]
            out[i] = others[:k]
    return out
