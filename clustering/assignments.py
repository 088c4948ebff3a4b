"""Per-image cluster assignment CSVs (the artifact people actually open).

Columns: ``id,cluster,distance`` plus ``label`` when ground truth is known, then ``confidence`` (in [0, 1],
low near a boundary between clusters; see :class:`~clustering.kmeans.ClusterResult`) when given.
``id`` is either a dataset index or a file path; paths are quoted by the csv
module so commas, quotes and newlines in file names survive a round trip.
Files are written atomically so a crashed or concurrent job never leaves a
half-written CSV where an artifact logger or a reader could pick it up.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from .files import atomic_output

__all__ = ["write_assignments", "read_assignments"]

_INT_CHARS = set("0123456789")


def _to_id(value) -> int | str:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"ids must be ints or strings/paths, got bool {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise ValueError(f"ids must be ints or strings/paths, got {type(value).__name__}: {value!r}")


def _parse_scalar(text: str) -> int | str:
    """Decimal integer literals come back as int, anything else stays a string."""
    body = text[1:] if text[:1] == "-" else text
    if body and set(body) <= _INT_CHARS:
        return int(text)
    return text


def write_assignments(path, ids, assignments, distances, labels=None, confidence=None) -> str:
    """Write one row per point and return ``path`` (as str).

    Args:
        path: destination CSV (its folder is created if missing).
        ids: N dataset indices (ints) or file paths (str / PathLike).
        assignments: N cluster ids (ints).
        distances: N distances to the assigned centroid; written with float32
            precision (shortest round-tripping repr), matching KMeansResult.
        labels: optional N ground-truth labels (ints or strings) -> ``label`` column.
        confidence: optional N assignment confidences in [0, 1] -> ``confidence`` column, the last one
            (float32 precision, like distances).
    """
    ids = list(ids)
    assignments = np.asarray(assignments)
    distances = np.asarray(distances, dtype=np.float32)
    n = len(ids)
    if assignments.ndim != 1 or distances.ndim != 1:
        raise ValueError("assignments and distances must be 1-D")
    if not np.issubdtype(assignments.dtype, np.integer):
        raise ValueError(f"assignments must be integers, got dtype {assignments.dtype}")
    lengths = {"ids": n, "assignments": assignments.shape[0], "distances": distances.shape[0]}
    if labels is not None:
        labels = list(labels.tolist() if isinstance(labels, np.ndarray) else labels)
        lengths["labels"] = len(labels)
    if confidence is not None:
        confidence = np.asarray(confidence, dtype=np.float32)
        if confidence.ndim != 1:
            raise ValueError("confidence must be 1-D")
        lengths["confidence"] = confidence.shape[0]
    if len(set(lengths.values())) != 1:
        raise ValueError(f"length mismatch: {lengths}")

    header = (["id", "cluster", "distance"] + (["label"] if labels is not None else [])
              + (["confidence"] if confidence is not None else []))
    path = os.fspath(path)
    with atomic_output(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(n):
            row = [_to_id(ids[i]), int(assignments[i]), str(distances[i])]
            if labels is not None:
                row.append(labels[i])
            if confidence is not None:
                row.append(str(confidence[i]))
            writer.writerow(row)
    return path


def read_assignments(path) -> list[dict]:
    """Read a CSV written by :func:`write_assignments`.

    Returns one dict per row: ``id`` (int when it is a decimal integer, else
    str), ``cluster`` (int), ``distance`` (float) and, when present, ``label``
    (int when it is a decimal integer, else str) and ``confidence`` (float).
    """
    with open(os.fspath(path), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = []
        for rec in reader:
            row = {
                "id": _parse_scalar(rec["id"]),
                "cluster": int(rec["cluster"]),
                "distance": float(rec["distance"]),
            }
            if "label" in rec:
                row["label"] = _parse_scalar(rec["label"])
            if "confidence" in rec:
                row["confidence"] = float(rec["confidence"])
            rows.append(row)
    return rows
