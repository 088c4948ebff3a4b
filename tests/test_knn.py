"""Tests for the weighted kNN monitor (downstream/knn.py); expected votes worked out by hand."""

from __future__ import annotations

import math
import warnings

import faiss
import numpy as np
import pytest

from downstream.knn import knn_accuracy, knn_predict

# Query q = (1, 0). Train points are unit vectors chosen by their cosine to q:
#   a  = (0.9,  sqrt(0.19))  class 0, sim 0.9   (one close neighbour)
#   b1 = (0.5,  sqrt(0.75))  class 1, sim 0.5   (two farther neighbours)
#   b2 = (0.5, -sqrt(0.75))  class 1, sim 0.5
#   z  = (-1, 0)             class 2, sim -1    (only reached with k >= 4)
TRAIN = np.array(
    [
        [0.9, math.sqrt(0.19)],
        [0.5, math.sqrt(0.75)],
        [0.5, -math.sqrt(0.75)],
        [-1.0, 0.0],
    ]
)
LABELS = np.array([0, 1, 1, 2])
QUERY = np.array([[1.0, 0.0]])


def reference_votes(train, labels, query, k, temperature):
    """The rule written out the slow way, independently of downstream.knn (no faiss, no max-shift, a dict of
    classes): per query, cosine to every train row, the k largest, exp(sim / T) summed per class."""
    train = np.asarray(train, dtype=np.float64)
    query = np.asarray(query, dtype=np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    votes = []
    for q in query:
        sims = [float(np.dot(q, t)) for t in train]
        nearest = sorted(range(len(train)), key=lambda i: -sims[i])[: min(k, len(train))]
        totals: dict = {}
        for i in nearest:
            totals[labels[i]] = totals.get(labels[i], 0.0) + math.exp(sims[i] / temperature)
        votes.append(totals)
    return votes


def reference_predict(train, labels, query, k, temperature):
    return [max(sorted(v), key=lambda c: v[c]) for v in reference_votes(train, labels, query, k, temperature)]


def test_weighted_vote_beats_majority_at_low_temperature():
    # T = 0.1: class 0 gets exp(0.9/0.1) = e^9 ~= 8103.1,
    #          class 1 gets 2*exp(0.5/0.1) = 2e^5 ~= 296.8  -> predict 0
    votes = reference_votes(TRAIN, LABELS, QUERY, k=3, temperature=0.1)[0]
    assert votes == {0: pytest.approx(8103.08, rel=1e-5), 1: pytest.approx(296.83, rel=1e-4)}
    assert knn_predict(TRAIN, LABELS, QUERY, k=3, temperature=0.1).tolist() == [0]
    # T = 1: class 0 gets e^0.9 ~= 2.460, class 1 gets 2e^0.5 ~= 3.297 -> predict 1
    votes = reference_votes(TRAIN, LABELS, QUERY, k=3, temperature=1.0)[0]
    assert votes == {0: pytest.approx(2.4596, rel=1e-4), 1: pytest.approx(3.2974, rel=1e-4)}
    assert knn_predict(TRAIN, LABELS, QUERY, k=3, temperature=1.0).tolist() == [1]
    # T -> large: every weight ~1, i.e. plain majority vote (2 vs 1) -> predict 1
    assert knn_predict(TRAIN, LABELS, QUERY, k=3, temperature=1e6).tolist() == [1]


def test_features_are_l2_normalised():
    # Scaling rows must not change cosine similarities, hence the prediction.
    scaled = TRAIN * np.array([[100.0], [0.01], [3.0], [7.0]])
    assert knn_predict(scaled, LABELS, 5 * QUERY, k=3, temperature=0.1).tolist() == [0]
    assert knn_predict(scaled, LABELS, 5 * QUERY, k=3, temperature=1.0).tolist() == [1]


def test_tiny_temperature_does_not_overflow():
    # exp(0.9 / 1e-3) = exp(900) overflows float64; the vote must still work.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert knn_predict(TRAIN, LABELS, QUERY, k=3, temperature=1e-3).tolist() == [0]


def test_k_larger_than_train_set():
    # k=1000 is capped at the 4 train points; z adds exp(-1/0.1) = e^-10 to
    # class 2, negligible next to e^9, so the answer is still class 0.
    assert knn_predict(TRAIN, LABELS, QUERY, k=1000, temperature=0.1).tolist() == [0]
    # With T = 1 the totals are 0: e^0.9 ~= 2.46, 1: 2e^0.5 ~= 3.30, 2: e^-1 ~= 0.37 -> 1
    assert knn_predict(TRAIN, LABELS, QUERY, k=1000, temperature=1.0).tolist() == [1]


def test_k1_and_string_labels():
    names = np.array(["cat", "dog", "dog", "eel"])
    pred = knn_predict(TRAIN, names, np.array([[1.0, 0.0], [-1.0, 0.1]]), k=1)
    assert pred.tolist() == ["cat", "eel"]


# Four unit-ish points, query == train:
#   p0 = (1, 0)        class 0    nearest other point: p1
#   p1 = (0.99, 0.14)  class 1    nearest other point: p0
#   p2 = (0, 1)        class 1    nearest other point: p3
#   p3 = (0.1, 0.99)   class 0    nearest other point: p2
SELF_X = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.1, 0.99]])
SELF_Y = np.array([0, 1, 1, 0])


def test_exclude_self():
    # Without exclusion each point finds itself (sim 1) first: 100% "accuracy".
    assert knn_accuracy(SELF_X, SELF_Y, SELF_X, SELF_Y, k=1) == 1.0
    # Excluding itself, each point takes its partner's (opposite) label.
    pred = knn_predict(SELF_X, SELF_Y, SELF_X, k=1, exclude_self=True)
    assert pred.tolist() == [1, 0, 0, 1]
    assert knn_accuracy(SELF_X, SELF_Y, SELF_X, SELF_Y, k=1, exclude_self=True) == 0.0
    # k is capped at N - 1 = 3 when excluding self; batching does not matter.
    a = knn_predict(SELF_X, SELF_Y, SELF_X, k=50, exclude_self=True, batch_size=1)
    b = knn_predict(SELF_X, SELF_Y, SELF_X, k=3, exclude_self=True)
    np.testing.assert_array_equal(a, b)


def test_exclude_self_with_exact_duplicates():
    # Two identical points with different labels tie at sim 1; whichever comes
    # back first, the query's own row is the one dropped, so each point sees
    # its twin's label.
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = np.array([0, 1, 1])
    pred = knn_predict(x, y, x, k=1, exclude_self=True)
    assert pred[:2].tolist() == [1, 0]


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0, 10.0])
def test_predictions_match_the_reference_vote(temperature):
    """knn_predict against the slow reference on random data where the weighting decides many queries."""
    rng = np.random.default_rng(1)
    train = rng.normal(size=(60, 5))
    labels = rng.integers(0, 4, 60)
    query = rng.normal(size=(40, 5))
    for k in (1, 5, 15):
        expected = reference_predict(train, labels, query, k, temperature)
        assert knn_predict(train, labels, query, k=k, temperature=temperature).tolist() == expected, (k, temperature)
    # the weighting matters on this data: a plain majority vote disagrees with the weighted one somewhere
    majority = reference_predict(train, labels, query, 15, 1e9)
    if temperature <= 0.1:
        assert majority != reference_predict(train, labels, query, 15, temperature)


def test_batching_matches_single_batch():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(120, 6))
    labels = rng.integers(0, 4, 120)
    query = rng.normal(size=(37, 6))
    full = knn_predict(train, labels, query, k=10)
    for bs in (1, 5, 36):
        np.testing.assert_array_equal(knn_predict(train, labels, query, k=10, batch_size=bs), full)


def test_knn_accuracy_by_hand():
    # Queries near a (class 0), near b1 (class 1), near z (class 2); with k=1
    # the nearest points are a, b1, z -> predictions [0, 1, 2].
    queries = np.array([[0.9, 0.45], [0.5, 0.85], [-1.0, 0.05]])
    assert knn_predict(TRAIN, LABELS, queries, k=1).tolist() == [0, 1, 2]
    # true labels [0, 1, 1]: 2 of 3 correct
    acc = knn_accuracy(TRAIN, LABELS, queries, [0, 1, 1], k=1)
    assert type(acc) is float and acc == pytest.approx(2 / 3)


def test_validation():
    with pytest.raises(ValueError, match="query == train"):
        knn_predict(TRAIN, LABELS, QUERY, exclude_self=True)
    with pytest.raises(ValueError, match="num_classes"):
        knn_predict(TRAIN, LABELS, QUERY, num_classes=2)
    with pytest.raises(ValueError, match="dims differ"):
        knn_predict(TRAIN, LABELS, np.ones((1, 3)))
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(TRAIN, LABELS[:3], QUERY)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(TRAIN, LABELS, QUERY, temperature=0)
    assert knn_predict(TRAIN, LABELS, QUERY, k=3, num_classes=3).tolist() == [0]


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="host has a GPU")
def test_use_gpu_true_without_gpu_is_an_error():
    with pytest.raises(RuntimeError, match="no GPU"):
        knn_predict(TRAIN, LABELS, QUERY, use_gpu=True)


def test_chunked_bank_matches_one_index_and_reads_a_memmap(tmp_path):
    """A bank searched chunk by chunk (bounded memory for memory-mapped banks of any size) predicts exactly what
    one flat index over the whole bank predicts, own-image exclusion included."""
    from downstream.knn import Exclusion

    rng = np.random.default_rng(3)
    centers = rng.normal(size=(4, 16))
    labels = rng.integers(0, 4, 700)
    bank = (centers[labels] + rng.normal(scale=1.5, size=(700, 16))).astype(np.float32)
    path = tmp_path / "bank.npy"
    np.save(path, bank)
    mapped = np.load(path, mmap_mode="r")
    queries, qlabels = bank[:150] + 0.01, labels[:150]
    exclude = Exclusion.by_key(np.arange(150), np.arange(700))  # query i is bank row i
    whole = knn_predict(bank, labels, queries, k=15, exclude=exclude)
    for chunk in (1, 64, 199, 700):
        chunked = knn_predict(mapped, labels, queries, k=15, exclude=exclude, bank_chunk=chunk, batch_size=37)
        np.testing.assert_array_equal(chunked, whole)
    assert (whole == qlabels).mean() > 0.5  # a bank that carries signal, so equality is not trivial


def _rss_file_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_scanning_a_memory_mapped_bank_leaves_the_resident_size_flat(tmp_path):
    """A 64 MB memory-mapped bank read chunk by chunk: each chunk's pages leave the resident set once copied,
    so the scan does not keep the file's pages mapped (a bank of millions would otherwise pin gigabytes)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "bank.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(250_000, 64))
    for start in range(0, len(out), 50_000):
        out[start:start + 50_000] = rng.normal(size=(50_000, 64))
    del out
    bank = np.load(path, mmap_mode="r")
    labels = np.arange(len(bank)) % 10
    before = _rss_file_mb()
    knn_predict(bank, labels, np.asarray(bank[:50]), k=5, bank_chunk=8192)
    assert _rss_file_mb() - before < 16  # 64 MB were read
    np.asarray(bank).sum()  # the same read through the map, without dropping: the pages do stay
    assert _rss_file_mb() - before > 48
