"""Which bank (gallery) items a nearest-neighbour query must not find: the ones that ARE the query's image.

When the evaluation split is (or overlaps) the training split, a kNN query finds its own copy in the memory
bank at similarity 1 and votes for its own label: raw pixels then score near 1.0 on labels that carry no
information. :class:`Exclusion` lists, for every query, the bank indices that are the same image, so
:func:`downstream.knn.knn_predict` and the retrieval rankings can drop them.

The list is sparse (CSR: ``indptr`` (Q + 1,) and ``indices``, bank indices ascending within each query), built
by sorting the keys, O((Q + N) log N); nothing forms a (Q, N) mask. Searches ask for ``k + max_per_query``
neighbours and drop the excluded ones, so every query still gets its k nearest *other* images.

Identity is by key: the caller passes one key per row for queries and bank (image ids such as source paths,
or per-row pixel digests); equal keys are the same image. :meth:`Exclusion.self_rows` is the positional form
(query i is bank row i), what ``exclude_self`` / leave-one-out mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Exclusion"]


@dataclass(frozen=True)
class Exclusion:
    """For each of ``n_queries`` queries, the bank indices (into a bank of ``n_bank``) it must not match."""

    n_queries: int
    n_bank: int
    indptr: np.ndarray  # (n_queries + 1,) int64: query q excludes indices[indptr[q]:indptr[q + 1]]
    indices: np.ndarray  # (total,) int64 bank indices, ascending within each query

    def __post_init__(self) -> None:
        if self.indptr.shape != (self.n_queries + 1,) or self.indptr[0] != 0 or \
                self.indptr[-1] != len(self.indices) or np.any(np.diff(self.indptr) < 0):
            raise ValueError("Exclusion: indptr must be (n_queries + 1,), non-decreasing, from 0 to len(indices)")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= self.n_bank):
            raise ValueError(f"Exclusion: bank indices must lie in [0, {self.n_bank})")

    # ------------------------------------------------------------------------------------------- builders

    @classmethod
    def by_key(cls, query_keys, bank_keys) -> "Exclusion":
        """Exclude, for each query, every bank item whose key equals the query's (ids, pixel digests, ...)."""
        q = np.asarray(query_keys)
        b = np.asarray(bank_keys)
        if q.ndim != 1 or b.ndim != 1:
            raise ValueError(f"Exclusion.by_key: keys must be 1-D, got shapes {q.shape} and {b.shape}")
        order = np.argsort(b, kind="stable")  # equal keys keep bank order: indices come out ascending
        sorted_b = b[order]
        lo = np.searchsorted(sorted_b, q, side="left")
        hi = np.searchsorted(sorted_b, q, side="right")
        counts = (hi - lo).astype(np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(indptr[-1])
        positions = np.repeat(lo - indptr[:-1], counts) + np.arange(total)
        return cls(len(q), len(b), indptr, order[positions].astype(np.int64))

    @classmethod
    def self_rows(cls, n: int) -> "Exclusion":
        """Positional: query i is bank row i (the query set is the bank, same order)."""
        return cls(n, n, np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64))

    @classmethod
    def from_lists(cls, lists, n_bank: int) -> "Exclusion":
        """From one sequence of bank indices per query."""
        arrays = [np.unique(np.asarray(x, dtype=np.int64).reshape(-1)) for x in lists]
        counts = np.array([len(a) for a in arrays], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        indices = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
        return cls(len(arrays), int(n_bank), indptr, indices)

    @classmethod
    def none(cls, n_queries: int, n_bank: int) -> "Exclusion":
        return cls(n_queries, n_bank, np.zeros(n_queries + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))

    def subset(self, rows) -> "Exclusion":
        """The exclusion of queries ``rows`` only (in that order), same bank: what a sample of queries uses."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = self.counts[rows]
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        positions = np.repeat(self.indptr[rows] - indptr[:-1], counts) + np.arange(int(indptr[-1]))
        return Exclusion(len(rows), self.n_bank, indptr, self.indices[positions])

    # ------------------------------------------------------------------------------------------- queries

    @property
    def counts(self) -> np.ndarray:
        """(n_queries,) how many bank items each query excludes."""
        return np.diff(self.indptr)

    @property
    def total(self) -> int:
        """How many query-bank pairs are excluded (the `*_excluded_matches` metrics)."""
        return int(self.indptr[-1])

    @property
    def max_per_query(self) -> int:
        return int(self.counts.max()) if self.n_queries else 0

    @property
    def min_per_query(self) -> int:
        return int(self.counts.min()) if self.n_queries else 0

    def check(self, n_queries: int, n_bank: int) -> None:
        if (self.n_queries, self.n_bank) != (n_queries, n_bank):
            raise ValueError(f"exclusion is for {self.n_queries} queries x {self.n_bank} bank items, "
                             f"got {n_queries} queries x {n_bank} bank items")

    def pairs(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The excluded pairs of queries start..stop-1: (row within the block, bank index)."""
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        rows = np.repeat(np.arange(stop - start, dtype=np.int64), self.counts[start:stop])
        return rows, self.indices[lo:hi]

    def mask(self, start: int, found: np.ndarray) -> np.ndarray:
        """Boolean (b, k): is ``found[i, j]`` (a bank index, or -1 for none) excluded for query ``start + i``?"""
        found = np.asarray(found, dtype=np.int64)
        b = found.shape[0]
        rows, banks = self.pairs(start, start + b)
        if len(banks) == 0:
            return np.zeros(found.shape, dtype=bool)
        width = np.int64(self.n_bank + 1)
        codes = rows * width + banks  # ascending: rows ascending, indices ascending within a row
        asked = np.arange(b, dtype=np.int64)[:, None] * width + found
        at = np.minimum(np.searchsorted(codes, asked), len(codes) - 1)
        return (codes[at] == asked) & (found >= 0)
