"""Retrieval metrics against values worked out by hand."""

import numpy as np
import pytest

from downstream.retrieval import map_at_r, recall_at_k, retrieval_metrics


def test_recall_and_map_at_r_by_hand():
    # 1-D points; labels A A A B B. Euclidean neighbours (self excluded), nearest first:
    x = np.array([[0.0], [1.0], [5.0], [1.6], [6.0]], dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    # q0 (0):   1.0(A) 1.6(B) 5.0(A) 6.0(B)  -> R=2: first 2 = A,B -> AP = (1/1)/2 = 0.5
    # q1 (1):   1.6(B) 0.0(A) 5.0(A) 6.0(B)  -> first 2 = B,A -> AP = (1/2)/2 = 0.25
    # q2 (5):   6.0(B) 1.6(B) 1.0(A) 0.0(A)  -> first 2 = B,B -> AP = 0
    # q3 (1.6): 1.0(A) 0.0(A) 5.0(A) 6.0(B)  -> R=1: first = A -> AP = 0
    # q4 (6):   5.0(A) 1.6(B) ...            -> R=1: first = A -> AP = 0
    m = retrieval_metrics(x, labels, ks=(1, 2, 4), metric="euclidean")
    # R@1: q0 yes, q1 no, q2 no, q3 no, q4 no -> 1/5; R@2: q0, q1, q4 -> 3/5; R@4: all but q3? q3's 4 nearest include 6.0(B) -> yes -> 5/5
    assert m["recall_at_1"] == pytest.approx(1 / 5)
    assert m["recall_at_2"] == pytest.approx(3 / 5)
    assert m["recall_at_4"] == pytest.approx(5 / 5)
    assert m["map_at_r"] == pytest.approx((0.5 + 0.25 + 0 + 0 + 0) / 5)


def test_perfect_embedding_scores_one():
    rng = np.random.default_rng(0)
    centers = np.eye(4, dtype=np.float32) * 10
    labels = np.repeat(np.arange(4), 5)
    x = centers[labels] + rng.normal(scale=0.1, size=(20, 4)).astype(np.float32)
    m = retrieval_metrics(x, labels)
    assert m["recall_at_1"] == 1.0 and m["map_at_r"] == pytest.approx(1.0)


def test_helpers_directly():
    labels = np.array([0, 0, 1])
    neighbours = np.array([[2, 1], [0, 2], [0, 1]])
    assert recall_at_k(labels, neighbours, [1, 2]) == {"recall_at_1": pytest.approx(1 / 3), "recall_at_2": pytest.approx(2 / 3)}
    # q0: R=1, first = label 1 -> 0; q1: R=1, first = label 0 -> 1; q2: R=0 -> skipped
    assert map_at_r(labels, neighbours) == pytest.approx(0.5)
