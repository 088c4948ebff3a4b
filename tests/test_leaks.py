"""Metrics that cannot leak: no nearest-neighbour metric may find a query's own image.

On a folder without train/ and test/ the evaluation split IS the training split; before the exclusion every
kNN query found its own copy in the bank and raw pixels scored near 1.0 on labels that carry no information.
No Ray here: raw pixels, or quick_evaluate with pixel features standing in for a backbone.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from downstream.exclusion import Exclusion
from downstream.knn import knn_accuracy, knn_predict
from downstream.retrieval import faiss_ranked_gallery, ranked_gallery, relevant_counts, retrieval_metrics
from pipeline.config import EvaluateStage
from pipeline.data import ImageSet, load_images

CLASSES = 7  # as in the report that found the leak: chance = 1/7
PER_CLASS = 20


def chance_bound(classes: int, n: int, sigmas: float = 4.0) -> float:
    """1/C plus `sigmas` binomial standard deviations of an accuracy over n queries at chance."""
    p = 1.0 / classes
    return p + sigmas * math.sqrt(p * (1 - p) / n)


def near_chance(value: float, classes: int, n: int, sigmas: float = 4.0) -> bool:
    p = 1.0 / classes
    return abs(value - p) < sigmas * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory):
    """CLASSES sub-folders of 16 px random-noise PNGs: the folder names are labels that carry no information,
    and there is no train/test split, so the evaluation split is the training split."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir()
        for i in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def noise_splits(noise_folder):
    train = load_images("folder", "train", root=str(noise_folder), image_size=16, log=lambda s: None)
    evalset = load_images("folder", "test", root=str(noise_folder), image_size=16, log=lambda s: None)
    assert train.ids == evalset.ids and len(train) == CLASSES * PER_CLASS  # the same images, the same order
    return train, evalset


def _stage(**overrides) -> EvaluateStage:
    data = {"name": "ev", "kind": "evaluate", "input": "pixels", "tsne": False, "html_report": False,
            "kmeans_iterations": 5, **overrides}
    return EvaluateStage.model_validate(data)


# ------------------------------------------------------------------------------------------- (a) chance level


def test_raw_pixels_on_random_labels_score_chance_not_one(noise_splits, tmp_path):
    """The evaluate stage on the noise folder: kNN accuracy and retrieval Recall@1 (gallery = train) stay near
    chance (1/7 = 0.143; measured 0.121 and 0.157). The same features without the exclusion score 1.0: the
    test goes red if the evaluate stage stops excluding.

    k = 20 < N: with k >= N every other image votes, and a query's own class, one image short once the query
    is left out, loses every balanced vote (accuracy 0.0 here, below chance but no leak; quick_evaluate's
    k = 200 on this folder, below)."""
    from pipeline.evaluate import evaluate, pixel_features

    train, evalset = noise_splits
    lines: list[str] = []
    metrics, artifacts = evaluate(_stage(knn_k=20, retrieval=True, retrieval_gallery="train"), artifact=None,
                                  train=train, evalset=evalset, out_dir=tmp_path, log=lines.append)
    n = len(evalset)
    # |accuracy - 1/7| < 4 * sqrt(p (1 - p) / N) = 4 * 0.0296 = 0.118
    assert near_chance(metrics["knn_accuracy"], CLASSES, n), metrics["knn_accuracy"]
    assert near_chance(metrics["recall_at_1"], CLASSES, n), metrics["recall_at_1"]
    # Every query had exactly one copy in the bank (itself, by id): N pairs left out, and it says so.
    assert metrics["knn_excluded_matches"] == n and metrics["retrieval_excluded_matches"] == n
    written = json.loads((tmp_path / "metrics.json").read_text())["exclusion"]
    assert written == {"knn_rule": "id", "knn_excluded_matches": n, "knn_queries_with_matches": n,
                       "retrieval_rule": "id", "retrieval_gallery": "train", "retrieval_excluded_matches": n}
    assert any(f"kNN: {n} query-bank pairs left out as the same image (rule: same id" in line for line in lines)

    # What the leak measured: the same features, the same k and temperature, nothing excluded.
    x = pixel_features(train.images)
    for k in (20, 200):
        leaked = knn_accuracy(x, train.labels, x, evalset.labels, k=k, temperature=0.1)
        assert leaked > 0.8, leaked
    leaked_r1 = retrieval_metrics(x, evalset.labels, ks=[1], gallery_features=x, gallery_labels=train.labels)
    assert leaked_r1["recall_at_1"] == 1.0


def test_without_ids_the_pixels_say_which_image_is_which(noise_splits, tmp_path):
    from pipeline.evaluate import evaluate

    train, evalset = noise_splits
    bare = [ImageSet(images=s.images, labels=s.labels, ids=None, class_names=s.class_names, source="x",
                     split=s.split) for s in (train, evalset)]
    metrics, _ = evaluate(_stage(knn_k=20), artifact=None, train=bare[0], evalset=bare[1], out_dir=tmp_path,
                          log=lambda s: None)
    assert near_chance(metrics["knn_accuracy"], CLASSES, len(evalset)), metrics["knn_accuracy"]
    assert metrics["knn_excluded_matches"] == len(evalset)
    assert json.loads((tmp_path / "metrics.json").read_text())["exclusion"]["knn_rule"] == "pixels"


def test_quick_evaluate_and_the_registry_metric_are_near_chance(noise_splits, monkeypatch):
    """What `input: best` and the retrain gate read: quick_evaluate (raw pixels stand in for the backbone).
    Its k = 200 exceeds the 140 images, so the vote is biased below chance (see above); the leak would be 1.0."""
    from pipeline import evaluate as evaluation
    from pipeline.registry import evaluate_backbone

    train, evalset = noise_splits
    monkeypatch.setattr(evaluation, "backbone_features",
                        lambda artifact, images, batch_size, **kw: evaluation.pixel_features(images))
    quick = evaluation.quick_evaluate("unused", train, evalset)
    assert quick["knn_accuracy"] < chance_bound(CLASSES, len(evalset))
    assert quick["knn_excluded_matches"] == len(evalset)
    assert evaluate_backbone("unused", train, evalset, "knn_accuracy") == quick["knn_accuracy"]


# ------------------------------------------------------------------------------------------- (b) pixel duplicates


def _image_set(images: np.ndarray, labels, ids=None) -> ImageSet:
    return ImageSet(images=images, labels=np.asarray(labels), ids=ids, class_names=None, source="x", split="x")


def test_pixel_duplicates_across_splits_are_excluded_when_ids_are_absent(tmp_path):
    """Train: A, A' (A with one pixel changed), C, C'; evaluation: a copy of A and a copy of C (no ids).
    With k=1 the copy of A would find A (same label: right by leak); excluded, it finds A' (another label)."""
    from pipeline.evaluate import evaluate, pixel_features, self_matches

    rng = np.random.default_rng(1)
    a, c = rng.integers(0, 256, (2, 1, 8, 8), dtype=np.uint8)
    a2, c2 = a.copy(), c.copy()
    a2[0, 0, 0] ^= 0xFF
    c2[0, 0, 0] ^= 0xFF
    train = _image_set(np.stack([a, a2, c, c2]), [0, 1, 2, 3])
    evalset = _image_set(np.stack([a, c]), [0, 2])
    digests = train.row_digests()
    assert digests.dtype == np.dtype("S16") and len(set(digests.tolist())) == 4
    assert evalset.row_digests().tolist() == [digests[0], digests[2]]

    exclude, rule = self_matches(evalset, train)
    assert rule == "pixels" and exclude.total == 2
    assert [exclude.indices[exclude.indptr[q]:exclude.indptr[q + 1]].tolist() for q in range(2)] == [[0], [2]]
    tx, ex = pixel_features(train.images), pixel_features(evalset.images)
    assert knn_accuracy(tx, train.labels, ex, evalset.labels, k=1) == 1.0  # the leak
    assert knn_predict(tx, train.labels, ex, k=1, exclude=exclude).tolist() == [1, 3]
    metrics, _ = evaluate(_stage(knn_k=1, retrieval=True, retrieval_gallery="train", recall_at=[1]),
                          artifact=None, train=train, evalset=evalset, out_dir=tmp_path, log=lambda s: None)
    assert metrics["knn_accuracy"] == 0.0 and metrics["knn_excluded_matches"] == 2
    # Retrieval: each query's only same-label gallery image is its own copy, so no query can score.
    assert "recall_at_1" not in metrics

    # With ids on both sides the ids decide: different files are different images, even with equal pixels.
    with_ids = [_image_set(s.images, s.labels, ids=[f"{where}/{i}.png" for i in range(len(s))])
                for where, s in (("train", train), ("test", evalset))]
    exclude, rule = self_matches(with_ids[1], with_ids[0])
    assert rule == "id" and exclude.total == 0
    # The same pixels in another shape are another image.
    assert _image_set(a.reshape(1, 1, 4, 16), [0]).row_digests()[0] != digests[0]


# ------------------------------------------------------------------------------------------- (c) retrieval by hand

# Query set = gallery (as when the evaluation split is the training split), cosine distance:
#   p0 = (1, 0)        label 0   others by similarity: p1 (.99), p3 (.10), p2 (0)     -> labels 1, 0, 1
#   p1 = (0.99, 0.14)  label 1   others: p0 (.99), p3 (.24), p2 (.14)                 -> labels 0, 0, 1
#   p2 = (0, 1)        label 1   others: p3 (.99), p1 (.14), p0 (0)                   -> labels 0, 1, 0
#   p3 = (0.1, 0.99)   label 0   others: p2 (.99), p1 (.24), p0 (.10)                 -> labels 1, 1, 0
# R = 1 for every query (its one other same-label image). Recall@1 = 0, Recall@2 = 2/4, R-precision = 0,
# average precision: p0 1/2, p1 1/3, p2 1/2, p3 1/3 -> mAP = 5/12. With itself in the gallery every query's
# first hit is itself: Recall@1 = 1.
P = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.1, 0.99]])
PY = np.array([0, 1, 1, 0])
PIDS = np.array(["a.png", "b.png", "c.png", "d.png"])


def test_retrieval_against_the_train_gallery_excludes_the_query_itself():
    exclude = Exclusion.by_key(PIDS, PIDS)
    assert exclude.total == 4 and exclude.indices.tolist() == [0, 1, 2, 3]
    assert relevant_counts(PY, PY, leave_one_out=False, exclude=exclude).tolist() == [1, 1, 1, 1]
    leaked = retrieval_metrics(P, PY, ks=[1], gallery_features=P, gallery_labels=PY)
    assert leaked["recall_at_1"] == 1.0
    for exact_max in (20_000, 0):  # the full ranking and the faiss search agree
        m = retrieval_metrics(P, PY, ks=[1, 2], gallery_features=P, gallery_labels=PY, exclude=exclude,
                              exact_max=exact_max)
        assert m["recall_at_1"] == 0.0 and m["recall_at_2"] == 0.5 and m["r_precision"] == 0.0
        assert m["map_at_r"] == 0.0 and m["retrieval_excluded_matches"] == 4 and m["retrieval_queries"] == 4
        if exact_max:
            assert m["map"] == pytest.approx(5 / 12)
    (rows, ranking), = list(ranked_gallery(P, P, exclude=exclude))
    assert ranking.tolist() == [[1, 3, 2, -1], [0, 3, 2, -1], [3, 1, 0, -1], [2, 1, 0, -1]]
    (_, found), = list(faiss_ranked_gallery(P, P, depth=3, exclude=exclude))
    assert found.tolist() == [[1, 3, 2], [0, 3, 2], [3, 1, 0], [2, 1, 0]]
    # The exclusion without a gallery is leave-one-out by identity: the same numbers as by position.
    loo = retrieval_metrics(P, PY, ks=[1, 2])
    by_id = retrieval_metrics(P, PY, ks=[1, 2], exclude=exclude)
    assert {k: by_id[k] for k in loo} == pytest.approx(loo)


# ------------------------------------------------------------------------------------------- (d) k > what is left


def test_k_larger_than_the_bank_left_after_the_exclusion():
    """Bank: three copies of the query's image (label 0), b (label 1, sim .9), z (label 2, sim .5). k=10
    asks for more than the 2 rows that are left: the vote uses both, and the nearer b wins at T = 0.1."""
    q = np.array([[1.0, 0.0]])
    bank = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.9, math.sqrt(0.19)], [0.5, math.sqrt(0.75)]])
    labels = np.array([0, 0, 0, 1, 2])
    exclude = Exclusion.by_key(np.array(["q"]), np.array(["q", "q", "q", "b", "z"]))
    assert exclude.max_per_query == 3
    assert knn_predict(bank, labels, q, k=10).tolist() == [0]  # the copies outvote everything
    for k in (2, 10, 1000):
        assert knn_predict(bank, labels, q, k=k, exclude=exclude).tolist() == [1]
    # At T = 1000 both rows left weigh almost the same (b: 1, z: exp(-0.4/1000)): still b, and never 0.
    assert knn_predict(bank, labels, q, k=10, temperature=1000.0, exclude=exclude).tolist() == [1]
    assert knn_predict(bank, labels, q, k=1, exclude=exclude).tolist() == [1]
    # Retrieval deeper than what is left: -1 at the end; metrics still computed on what is there.
    (_, found), = list(faiss_ranked_gallery(q, bank, depth=4, exclude=exclude))
    assert found.tolist() == [[3, 4]]  # depth capped at the 2 rows left
    m = retrieval_metrics(q, np.array([1]), ks=[1, 8], gallery_features=bank, gallery_labels=labels,
                          exclude=exclude)
    assert m["recall_at_1"] == 1.0 and m["map"] == 1.0
    # Nothing left at all is an error, not a silent vote.
    with pytest.raises(ValueError, match="excludes all 3 train rows"):
        knn_predict(bank[:3], labels[:3], q, exclude=Exclusion.by_key(np.array(["q"]), np.array(["q"] * 3)))


def test_exclusion_matches_brute_force_and_exclude_self():
    rng = np.random.default_rng(3)
    qk, bk = rng.integers(0, 30, 200), rng.integers(0, 30, 150)
    exclude = Exclusion.by_key(qk, bk)
    for q in range(len(qk)):
        assert exclude.indices[exclude.indptr[q]:exclude.indptr[q + 1]].tolist() == np.flatnonzero(bk == qk[q]).tolist()
    found = rng.integers(-1, 150, (200, 12))
    np.testing.assert_array_equal(exclude.mask(0, found), (bk[np.maximum(found, 0)] == qk[:, None]) & (found >= 0))
    np.testing.assert_array_equal(exclude.mask(50, found[50:60]), exclude.mask(0, found)[50:60])
    # kNN with the exclusion against a brute-force reference (dense similarity, excluded set to -inf).
    x, xq = rng.normal(size=(150, 5)), rng.normal(size=(200, 5))
    labels = rng.integers(0, 4, 150)
    xn, qn = x / np.linalg.norm(x, axis=1, keepdims=True), xq / np.linalg.norm(xq, axis=1, keepdims=True)
    sims = qn @ xn.T
    sims[bk[None, :] == qk[:, None]] = -np.inf
    nearest = np.argmax(sims, axis=1)
    for bs in (7, 4096):
        np.testing.assert_array_equal(knn_predict(x, labels, xq, k=1, exclude=exclude, batch_size=bs), labels[nearest])
    # exclude_self is the positional special case.
    y = rng.integers(0, 3, 150)
    np.testing.assert_array_equal(knn_predict(x, y, x, k=5, exclude_self=True),
                                  knn_predict(x, y, x, k=5, exclude=Exclusion.self_rows(150)))
    with pytest.raises(ValueError, match="not both"):
        knn_predict(x, y, x, exclude_self=True, exclude=Exclusion.self_rows(150))
    with pytest.raises(ValueError, match="exclusion is for"):
        knn_predict(x, y, xq, exclude=Exclusion.self_rows(150))
