"""Retrieval metrics against values worked out by hand, and the Mahalanobis whitening."""

import numpy as np
import pytest

from downstream.retrieval import (
    default_recall_at,
    fit_whitening,
    ranked_gallery,
    ranking_metrics,
    relevant_counts,
    retrieval_metrics,
)

# 1-D points; labels A A A B B. Euclidean rankings (self excluded), nearest first:
#   q0 (0.0): 1.0(A) 1.6(B) 5.0(A) 6.0(B)
#   q1 (1.0): 1.6(B) 0.0(A) 5.0(A) 6.0(B)
#   q2 (5.0): 6.0(B) 1.6(B) 1.0(A) 0.0(A)
#   q3 (1.6): 1.0(A) 0.0(A) 5.0(A) 6.0(B)
#   q4 (6.0): 5.0(A) 1.6(B) 1.0(A) 0.0(A)
X5 = np.array([[0.0], [1.0], [5.0], [1.6], [6.0]], dtype=np.float32)
Y5 = np.array([0, 0, 0, 1, 1])


def test_leave_one_out_ranking_by_hand():
    (rows, ranking), = list(ranked_gallery(X5, distance="euclidean"))
    assert rows.tolist() == [0, 1, 2, 3, 4]
    assert ranking.tolist() == [[1, 3, 2, 4], [3, 0, 2, 4], [4, 3, 1, 0], [1, 0, 2, 4], [2, 3, 1, 0]]


def test_every_metric_by_hand():
    # Relevance (1 = same label) per rank, and R = other images of the query's label:
    #   q0 A: 1 0 1 0  R=2   q1 A: 0 1 1 0  R=2   q2 A: 0 0 1 1  R=2
    #   q3 B: 0 0 0 1  R=1   q4 B: 0 1 0 0  R=1
    m = retrieval_metrics(X5, Y5, ks=(1, 2, 4), metric="euclidean")
    # Recall@1: only q0 -> 1/5.  Recall@2: q0, q1, q4 -> 3/5.  Recall@4: everyone -> 1.
    assert m["recall_at_1"] == pytest.approx(1 / 5)
    assert m["recall_at_2"] == pytest.approx(3 / 5)
    assert m["recall_at_4"] == pytest.approx(1.0)
    # R-precision (relevant among the first R, / R): q0 1/2, q1 1/2, q2 0, q3 0, q4 0
    assert m["r_precision"] == pytest.approx((0.5 + 0.5) / 5)
    # MAP@R: q0 P@1=1 -> 1/2; q1 P@2=1/2 -> 1/4; q2, q3, q4 -> 0
    assert m["map_at_r"] == pytest.approx((0.5 + 0.25) / 5)
    # mAP over the full ranking (sum of precision at every relevant rank, / R):
    #   q0 (1/1 + 2/3)/2 = 5/6   q1 (1/2 + 2/3)/2 = 7/12   q2 (1/3 + 2/4)/2 = 5/12
    #   q3 (1/4)/1 = 1/4         q4 (1/2)/1 = 1/2
    assert m["map"] == pytest.approx((5 / 6 + 7 / 12 + 5 / 12 + 1 / 4 + 1 / 2) / 5)
    assert m["retrieval_queries"] == 5


def test_cosine_ranks_by_angle_not_length():
    # Same direction, very different lengths: cosine calls them identical, euclidean does not.
    x = np.array([[1.0, 0.0], [100.0, 1.0], [0.9, 0.5], [0.0, 1.0]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    # cosine from q0: [100,1] (angle 0.6 deg) before [0.9,0.5] (29 deg) before [0,1] (90 deg)
    (_, cos), = list(ranked_gallery(x, distance="cosine"))
    assert cos[0].tolist() == [1, 2, 3]
    # euclidean from q0: [0.9,0.5] (0.51) before [0,1] (1.41) before [100,1] (99)
    (_, euc), = list(ranked_gallery(x, distance="euclidean"))
    assert euc[0].tolist() == [2, 3, 1]
    assert retrieval_metrics(x, y, ks=(1,), metric="cosine")["recall_at_1"] > \
        retrieval_metrics(x, y, ks=(1,), metric="euclidean")["recall_at_1"]


def test_queries_against_a_train_gallery_by_hand():
    gallery = np.array([[0.0], [2.0], [4.0], [10.0]], dtype=np.float32)
    g_labels = np.array([0, 1, 0, 1])
    queries = np.array([[1.9], [9.0], [3.0]], dtype=np.float32)
    q_labels = np.array([0, 1, 2])  # label 2 has no gallery image: left out of every metric
    # q0 (1.9): 2(B) 0(A) 4(A) 10(B); R=2 -> rel 0 1 1 0
    # q1 (9.0): 10(B) 4(A) 2(B) 0(A);  R=2 -> rel 1 0 1 0
    m = retrieval_metrics(queries, q_labels, ks=(1, 2), metric="euclidean", gallery_features=gallery,
                          gallery_labels=g_labels)
    assert m["retrieval_queries"] == 2
    assert m["recall_at_1"] == pytest.approx(1 / 2)
    assert m["recall_at_2"] == pytest.approx(1.0)
    assert m["r_precision"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["map_at_r"] == pytest.approx(((1 / 2) / 2 + 1 / 2) / 2)
    assert m["map"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + (1 + 2 / 3) / 2) / 2)


def test_ranking_metrics_helper_and_lone_queries():
    relevant = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    r = np.array([2, 1])
    m = ranking_metrics(relevant, r, ks=[1, 3])
    assert m["recall_at_1"].tolist() == [0.0, 1.0]
    assert m["recall_at_3"].tolist() == [1.0, 1.0]
    assert m["map_at_r"].tolist() == pytest.approx([(1 / 2) / 2, 1.0])
    assert m["map"].tolist() == pytest.approx([(1 / 2 + 2 / 3) / 2, 1.0])
    assert relevant_counts(np.array([0, 0, 1]), np.array([0, 0, 1]), leave_one_out=True).tolist() == [1, 1, 0]
    # labels 0 0 1: the single 1 cannot find anything and is not counted
    m = retrieval_metrics(np.array([[0.0], [1.0], [0.4]]), np.array([0, 0, 1]), ks=(1,), metric="euclidean")
    assert m["retrieval_queries"] == 2
    # q0 (0.0): 0.4(B) first -> miss; q1 (1.0): 0.4(B) first -> miss
    assert m["recall_at_1"] == 0.0
    with pytest.raises(ValueError, match="no query has a relevant"):
        retrieval_metrics(np.eye(3), np.array([0, 1, 2]))


def test_agrees_with_pytorch_metric_learning():
    """An independent implementation (full-ranking k) on random data, ties impossible."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = rng.integers(0, 5, size=120)
    ours = retrieval_metrics(x, y, ks=(1,), metric="euclidean")
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r",
                                       "mean_average_precision"), k=None, device=__import__("torch").device("cpu"))
    theirs = calc.get_accuracy(x, y)
    assert ours["recall_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["map"] == pytest.approx(theirs["mean_average_precision"], abs=1e-6)


def test_perfect_embedding_scores_one():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    x = (np.eye(4) * 10)[labels] + rng.normal(scale=0.1, size=(20, 4))
    for metric in ("cosine", "euclidean"):
        m = retrieval_metrics(x, labels, metric=metric)
        assert m["recall_at_1"] == 1.0 and m["map_at_r"] == pytest.approx(1.0) and m["map"] == pytest.approx(1.0)


def test_default_recall_at_grows_with_the_gallery():
    assert default_recall_at(1000) == [1, 2, 4, 8]
    assert default_recall_at(1001) == [1, 2, 4, 8, 10, 100]
    rng = np.random.default_rng(0)
    m = retrieval_metrics(rng.normal(size=(1100, 3)), rng.integers(0, 3, 1100), metric="euclidean")
    assert {"recall_at_10", "recall_at_100"} <= set(m)
    m = retrieval_metrics(rng.normal(size=(50, 3)), rng.integers(0, 3, 50), metric="euclidean")
    assert "recall_at_10" not in m and "recall_at_8" in m


def test_whitening_gives_identity_covariance():
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(5, 5)) * np.array([10.0, 3.0, 1.0, 0.3, 0.01])
    train = rng.normal(size=(4000, 5)) @ mixing.T + 7.0
    w = fit_whitening(train, shrinkage=0.0)
    z = w(train).astype(np.float64)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(z, rowvar=False, bias=True), np.eye(5), atol=1e-3)
    # Full shrinkage only standardises each dimension: unit variances, correlations kept.
    z1 = fit_whitening(train, shrinkage=1.0)(train).astype(np.float64)
    cov1 = np.cov(z1, rowvar=False, bias=True)
    np.testing.assert_allclose(np.diag(cov1), 1.0, atol=1e-3)
    assert not np.allclose(cov1, np.eye(5), atol=0.1)
    # Ledoit-Wolf: plenty of strongly correlated data needs little shrinkage; few noisy samples of
    # uncorrelated dimensions (whose true correlation IS the identity target) need a lot.
    rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    correlated = rng.normal(size=(4000, 5)) * [1.0, 1.5, 2.0, 3.0, 4.0] @ rotation * [1, 10, 100, 0.1, 1]
    auto = fit_whitening(correlated, shrinkage="auto")
    assert 0.0 <= auto.shrinkage < 0.05
    np.testing.assert_allclose(np.cov(auto(correlated), rowvar=False, bias=True), np.eye(5), atol=0.1)
    assert fit_whitening(rng.normal(size=(20, 5)) * [1, 2, 3, 4, 5], shrinkage="auto").shrinkage > 0.5


def test_whitening_survives_a_singular_covariance():
    rng = np.random.default_rng(2)
    train = np.hstack([rng.normal(size=(50, 3)), np.zeros((50, 2))])  # two dead dimensions
    z = fit_whitening(train, shrinkage="auto")(train)
    assert np.isfinite(z).all()


def test_mahalanobis_beats_euclidean_on_a_stretched_set():
    """Classes differ along a low-variance direction while a high-variance one is pure noise: Euclidean
    neighbours follow the noise, whitening (fitted on a separate train sample) evens the scales."""
    rng = np.random.default_rng(3)

    def sample(n):
        y = rng.integers(0, 2, n)
        signal = np.where(y == 1, 0.01, -0.01) + rng.normal(scale=0.001, size=n)
        noise = rng.normal(scale=10.0, size=n)
        return np.stack([signal, noise], axis=1).astype(np.float32), y

    train_x, _ = sample(400)
    eval_x, eval_y = sample(200)
    euclid = retrieval_metrics(eval_x, eval_y, metric="euclidean")
    maha = retrieval_metrics(eval_x, eval_y, metric="mahalanobis", train_features=train_x)
    assert euclid["recall_at_1"] < 0.7
    assert maha["recall_at_1"] > 0.95
    assert maha["map"] > euclid["map"] + 0.2
    assert 0.0 <= maha["retrieval_whitening_shrinkage"] <= 1.0
    with pytest.raises(ValueError, match="train_features"):
        retrieval_metrics(eval_x, eval_y, metric="mahalanobis")
    with pytest.raises(ValueError, match="distance"):
        retrieval_metrics(eval_x, eval_y, metric="manhattan")


def test_faiss_search_gives_the_same_metrics_as_the_full_ranking_on_large_galleries():
    """Above `exact_max` the metrics come from a faiss k-NN search; Recall@K, R-precision and MAP@R must not
    change, and mAP (which needs the whole ranking) is left out."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, size=400)
    centres = rng.normal(size=(6, 16))
    x = (centres[labels] + 0.9 * rng.normal(size=(400, 16))).astype(np.float32)
    for metric in ("cosine", "euclidean"):
        exact = retrieval_metrics(x, labels, metric=metric)
        searched = retrieval_metrics(x, labels, metric=metric, exact_max=10)
        assert "map" in exact and "map" not in searched
        for key in ("recall_at_1", "recall_at_4", "r_precision", "map_at_r"):
            assert searched[key] == pytest.approx(exact[key], abs=1e-9), (metric, key)
    gallery = (centres[labels[:200]] + 0.9 * rng.normal(size=(200, 16))).astype(np.float32)
    exact = retrieval_metrics(x, labels, gallery_features=gallery, gallery_labels=labels[:200])
    searched = retrieval_metrics(x, labels, gallery_features=gallery, gallery_labels=labels[:200], exact_max=10)
    assert searched["map_at_r"] == pytest.approx(exact["map_at_r"], abs=1e-9)


def _clustered(n: int, classes: int = 10, dim: int = 16, noise: float = 1.2, seed: int = 5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    x = rng.normal(size=(classes, dim))[labels] + noise * rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


def test_sampled_queries_estimate_the_exact_metrics_and_are_seeded():
    """Past `exact_max`, `max_queries` scores a seeded sample of queries against the whole gallery. Each
    per-query value lies in [0, 1] (standard deviation <= 0.5), so the mean of 1000 of 3000 queries drawn
    without replacement has a standard error <= 0.5 / sqrt(1000) * sqrt(2000 / 2999) = 0.013: 0.04 is three of
    them. The depth (10,000) is above every R (~300): nothing is capped, the exact names stay."""
    x, y = _clustered(3000)
    exact = retrieval_metrics(x, y, ks=(1, 4))
    sampled = retrieval_metrics(x, y, ks=(1, 4), exact_max=100, max_queries=1000, max_depth=10_000, seed=0)
    assert sampled["retrieval_sampled_queries"] == 1000 and sampled["retrieval_queries"] == 1000
    assert "retrieval_depth_cap" not in sampled and "map" not in sampled
    assert 0.2 < exact["map_at_r"] < 0.9  # neither trivial nor hopeless: the comparison means something
    for key in ("recall_at_1", "recall_at_4", "r_precision", "map_at_r"):
        assert sampled[key] == pytest.approx(exact[key], abs=0.04), key
    again = retrieval_metrics(x, y, ks=(1, 4), exact_max=100, max_queries=1000, max_depth=10_000, seed=0)
    assert again == sampled
    other = retrieval_metrics(x, y, ks=(1, 4), exact_max=100, max_queries=1000, max_depth=10_000, seed=1)
    assert other["map_at_r"] != sampled["map_at_r"]
    # below the exact limit neither bound applies
    assert retrieval_metrics(x, y, ks=(1, 4), max_queries=10, max_depth=5) == exact


def test_capped_depth_reports_map_at_r_with_r_capped_under_its_own_name():
    """A depth below R gives R-precision and MAP@R with R = min(R, depth): the same values as the full
    ranking scored that way, under the names *_capped only; Recall@K (depth >= K) is unchanged."""
    from downstream.exclusion import Exclusion

    x, y = _clustered(1500)
    exact = retrieval_metrics(x, y, ks=(1, 4))
    capped = retrieval_metrics(x, y, ks=(1, 4), exact_max=100, max_depth=50)
    assert capped["retrieval_depth_cap"] == 50
    assert not {"map_at_r", "r_precision", "map", "retrieval_sampled_queries"} & capped.keys()
    r = relevant_counts(y, y, leave_one_out=False, exclude=Exclusion.self_rows(len(y)))
    sums = {}
    for rows, ranking in ranked_gallery(x, exclude=Exclusion.self_rows(len(y))):
        relevant = (y[np.maximum(ranking, 0)] == y[rows][:, None]) & (ranking >= 0)
        for name, values in ranking_metrics(relevant, np.minimum(r[rows], 50), (1, 4)).items():
            sums[name] = sums.get(name, 0.0) + values.sum()
    assert capped["map_at_r_capped"] == pytest.approx(sums["map_at_r"] / len(y), abs=1e-9)
    assert capped["r_precision_capped"] == pytest.approx(sums["r_precision"] / len(y), abs=1e-9)
    assert capped["map_at_r_capped"] != pytest.approx(exact["map_at_r"], abs=0.01)  # another metric
    for key in ("recall_at_1", "recall_at_4"):
        assert capped[key] == pytest.approx(exact[key], abs=1e-9)


def test_sampled_queries_never_retrieve_themselves():
    """Every image shares its label with one other, far away: a query that found itself would score
    Recall@1 = 1. Sampled queries keep their exclusion rows (given, or their own row in leave-one-out)."""
    from downstream.exclusion import Exclusion
    from downstream.retrieval import faiss_ranked_gallery

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    y = np.arange(600) // 2
    same = Exclusion.by_key(np.arange(600), np.arange(600))
    for exclude in (same, None):
        m = retrieval_metrics(x, y, gallery_features=x if exclude else None, gallery_labels=y if exclude else None,
                              exclude=exclude, exact_max=10, max_queries=100, max_depth=5)
        assert m["retrieval_sampled_queries"] == 100 and m["recall_at_1"] < 0.05, m
    assert m.get("retrieval_excluded_matches") is None
    sample = np.sort(rng.choice(600, 100, replace=False))
    for rows, found in faiss_ranked_gallery(x[sample], x, depth=5, exclude=same.subset(sample)):
        assert not (found == sample[rows][:, None]).any()
        assert (found >= 0).all()


def test_exclusion_subset_keeps_each_query_row():
    from downstream.exclusion import Exclusion

    lists = [[3], [], [0, 2], [1, 3, 4]]
    sub = Exclusion.from_lists(lists, 5).subset([3, 1, 2])
    want = Exclusion.from_lists([lists[3], lists[1], lists[2]], 5)
    assert sub.n_queries == 3 and sub.n_bank == 5
    assert sub.indptr.tolist() == want.indptr.tolist() and sub.indices.tolist() == want.indices.tolist()
