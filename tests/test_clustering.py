"""Tests for the torch-free clustering package (k-means, metrics, plots, CSVs).

Expected metric values are derived by hand in the comments from small
contingency tables, not recomputed with the code under test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest
from PIL import Image

from clustering import (
    KMeansResult,
    ari,
    cluster_accuracy,
    cluster_grid,
    cluster_metrics,
    embedding_2d,
    kmeans,
    nmi,
    pair_f1,
    purity,
    read_assignments,
    scatter_plot,
    write_assignments,
)


def _from_table(table):
    """Expand a (clusters x classes) count table into (labels, clusters) arrays."""
    labels, clusters = [], []
    for c, row in enumerate(table):
        for y, count in enumerate(row):
            labels += [y] * count
            clusters += [c] * count
    return np.array(labels), np.array(clusters)


# --------------------------------------------------------------------------- metrics

# 6-point toy.  labels Y = 0 0 0 1 1 1, clusters C = 0 0 1 1 2 2
#                 class0 class1
#   cluster 0       2      0
#   cluster 1       1      1
#   cluster 2       0      2
Y6 = np.array([0, 0, 0, 1, 1, 1])
C6 = np.array([0, 0, 1, 1, 2, 2])


def test_nmi_by_hand():
    # H(Y) = ln 2 (3/3 split); H(C) = ln 3 (three clusters of 2).
    # I(Y;C) = sum p_cy ln(p_cy / (p_c p_y)):
    #   (c0,y0): 2/6 * ln((2/6)/((2/6)(3/6))) = 1/3 ln 2
    #   (c1,y0), (c1,y1): 1/6 * ln((1/6)/((2/6)(3/6))) = 1/6 ln 1 = 0
    #   (c2,y1): 1/3 ln 2
    #   => I = 2/3 ln 2
    # NMI = 2 I / (H(Y) + H(C)) = (4/3) ln 2 / ln 6 ~= 0.5158
    expected = (4 / 3) * math.log(2) / (math.log(2) + math.log(3))
    assert nmi(Y6, C6) == pytest.approx(expected, abs=1e-12)
    assert isinstance(nmi(Y6, C6), float)


def test_pair_f1_by_hand_six_points():
    # pairs sharing cluster AND class: C(2,2) [c0] + 0 [c1] + C(2,2) [c2] = 2
    # pairs sharing a cluster: 3 clusters * C(2,2) = 3   -> precision 2/3
    # pairs sharing a class:   2 classes * C(3,2) = 6    -> recall 2/6
    # F1 = 2PR/(P+R) = 2*(2/3)*(1/3)/(2/3+1/3) = 4/9
    assert pair_f1(Y6, C6) == pytest.approx(4 / 9, abs=1e-12)


# 16 points, 4 clusters vs 3 classes; the best matching is NOT the identity.
#                 class0 class1 class2 | size
#   cluster 0       0      5      1    |  6
#   cluster 1       4      0      0    |  4
#   cluster 2       1      0      3    |  4
#   cluster 3       0      1      1    |  2
#   class size      5      6      5    | 16
TABLE16 = [[0, 5, 1], [4, 0, 0], [1, 0, 3], [0, 1, 1]]


def test_cluster_accuracy_hungarian_non_identity_more_clusters_than_classes():
    y, c = _from_table(TABLE16)
    # Identity mapping (c0->0, c1->1, c2->2) would get 0 + 0 + 3 = 3 correct.
    # Best one-to-one: c0->class1 (5) + c1->class0 (4) + c2->class2 (3) = 12,
    # cluster 3 stays unmatched (its 2 points count as errors): 12/16 = 0.75.
    assert cluster_accuracy(y, c) == pytest.approx(0.75, abs=1e-12)
    # swapping roles (3 "clusters" vs 4 "classes") gives the same matching size
    assert cluster_accuracy(c, y) == pytest.approx(0.75, abs=1e-12)


def test_purity_by_hand():
    y, c = _from_table(TABLE16)
    # row maxima 5 + 4 + 3 + 1 = 13 -> 13/16
    assert purity(y, c) == pytest.approx(13 / 16, abs=1e-12)
    # 6-point toy: maxima 2 + 1 + 2 = 5 -> 5/6
    assert purity(Y6, C6) == pytest.approx(5 / 6, abs=1e-12)


def test_pair_f1_by_hand_sixteen_points():
    y, c = _from_table(TABLE16)
    # TP  = C(5,2) + C(1,2) + C(4,2) + C(1,2) + C(3,2) + 2*C(1,2) = 10 + 6 + 3 = 19
    # cluster pairs = C(6,2)+C(4,2)+C(4,2)+C(2,2) = 15+6+6+1 = 28 -> P = 19/28
    # class pairs   = C(5,2)+C(6,2)+C(5,2)        = 10+15+10  = 35 -> R = 19/35
    # F1 = 2PR/(P+R) = 2*19/(28+35) = 38/63
    assert pair_f1(y, c) == pytest.approx(38 / 63, abs=1e-12)


def test_identical_and_relabeled_partitions_score_one():
    y = np.array([0, 0, 1, 1, 1, 2, 2, 3])
    relabeled = np.array([7, 7, 3, 3, 3, 9, 9, 0])  # same partition, other ids
    for c in (y, relabeled):
        m = cluster_metrics(y, c)
        assert set(m) == {"nmi", "ari", "cluster_accuracy", "purity", "pair_f1"}
        for key, value in m.items():
            assert type(value) is float, key
            assert value == pytest.approx(1.0, abs=1e-12), key


def test_ari_of_a_non_trivial_partition_by_hand():
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    clusters = [0, 0, 1, 1, 1, 2, 2, 2, 2]
    # Contingency table (rows: classes, columns: clusters 0, 1, 2):
    #   class 0 | 2 1 0 |  3
    #   class 1 | 0 2 1 |  3
    #   class 2 | 0 0 3 |  3
    #   column    2 3 4 |  n = 9
    # index     = sum C(n_ij, 2) = C(2,2) + C(2,2) + C(3,2) = 1 + 1 + 3 = 5
    # rows      = sum C(a_i, 2)  = 3 * C(3,2) = 9
    # columns   = sum C(b_j, 2)  = C(2,2) + C(3,2) + C(4,2) = 1 + 3 + 6 = 10
    # expected  = rows * columns / C(9, 2) = 90 / 36 = 2.5;  max = (rows + columns) / 2 = 9.5
    # ARI       = (5 - 2.5) / (9.5 - 2.5) = 5 / 14
    assert ari(labels, clusters) == pytest.approx(5 / 14, abs=1e-12)
    # symmetric in its arguments and blind to the cluster ids
    assert ari(clusters, labels) == pytest.approx(5 / 14, abs=1e-12)
    assert ari(labels, [{0: 7, 1: 3, 2: 5}[c] for c in clusters]) == pytest.approx(5 / 14, abs=1e-12)


def test_metrics_accept_string_labels_and_validate():
    y = np.array(["cat", "cat", "dog", "dog"])
    c = np.array([1, 1, 0, 0])
    assert cluster_accuracy(y, c) == 1.0
    # all-singleton partitions on both sides: no pairs anywhere, identical -> 1.0
    assert pair_f1([0, 1, 2], [5, 6, 7]) == 1.0
    # one big cluster vs 2 classes: ARI of a trivial clustering is 0
    assert ari([0, 0, 1, 1], [0, 0, 0, 0]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="length"):
        nmi([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="1-D"):
        purity(np.zeros((2, 2)), np.zeros((2, 2)))


# --------------------------------------------------------------------------- kmeans


def _blobs(seed=0, n=40, d=5):
    rng = np.random.default_rng(seed)
    centers = np.array([np.zeros(d), np.full(d, 10.0), np.r_[-10.0, np.zeros(d - 1)]])
    x = np.concatenate([c + rng.normal(scale=0.3, size=(n, d)) for c in centers])
    y = np.repeat(np.arange(3), n)
    perm = rng.permutation(len(y))
    return x[perm], y[perm], centers


def test_kmeans_recovers_blobs():
    x, y, centers = _blobs()
    res = kmeans(x, 3, seed=0)
    assert isinstance(res, KMeansResult)
    assert res.assignments.dtype == np.int64 and res.assignments.shape == (120,)
    assert res.distances.dtype == np.float32 and res.distances.shape == (120,)
    assert res.centroids.dtype == np.float32 and res.centroids.shape == (3, 5)
    assert nmi(y, res.assignments) == pytest.approx(1.0, abs=1e-12)
    # every true center has a centroid within the noise level
    gaps = np.linalg.norm(centers[:, None] - res.centroids[None], axis=2).min(axis=1)
    assert gaps.max() < 0.3


def test_kmeans_distances_are_euclidean_to_centroid():
    x, _, _ = _blobs(seed=1)
    res = kmeans(x.astype(np.float64), 3, seed=3, niter=10)
    expected = np.linalg.norm(x - res.centroids[res.assignments].astype(np.float64), axis=1)
    np.testing.assert_allclose(res.distances, expected, rtol=1e-5, atol=1e-6)
    assert type(res.inertia) is float
    assert res.inertia == pytest.approx(float((expected**2).sum()), rel=1e-5)
    # each point sits at its nearest centroid
    all_d = np.linalg.norm(x[:, None] - res.centroids[None].astype(np.float64), axis=2)
    np.testing.assert_array_equal(res.assignments, all_d.argmin(axis=1))


def test_kmeans_deterministic_for_fixed_seed():
    x = np.random.default_rng(5).normal(size=(300, 8))
    a = kmeans(x, 7, seed=11, niter=20)
    b = kmeans(x, 7, seed=11, niter=20)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia


def test_kmeans_spherical_clusters_by_direction():
    # Three directions, wildly different radii: direction is the only signal
    # that survives L2 normalisation.
    rng = np.random.default_rng(2)
    dirs = np.eye(3)
    y = np.repeat(np.arange(3), 30)
    radii = rng.uniform(0.5, 50.0, size=90)[:, None]
    x = radii * (dirs[y] + rng.normal(scale=0.05, size=(90, 3)))
    res = kmeans(x, 3, spherical=True, seed=0)
    assert nmi(y, res.assignments) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)
    # distances are measured on the normalised points
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.linalg.norm(xn - res.centroids[res.assignments], axis=1)
    np.testing.assert_allclose(res.distances, expected, rtol=1e-4, atol=1e-5)
    assert res.distances.max() < 0.5


def test_kmeans_k_equals_n():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    res = kmeans(x, 4)
    assert sorted(res.assignments.tolist()) == [0, 1, 2, 3]
    assert res.inertia == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize(
    "x, k, match",
    [
        (np.zeros((5, 2)), 0, "k must be >= 1"),
        (np.zeros((5, 2)), 6, "exceeds the number of points"),
        (np.zeros(5), 2, "2-D"),
        (np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, 1.0]]), 2, "NaN"),
        (np.array([[0.0, 1.0], [np.inf, 0.0], [1.0, 1.0]]), 2, "NaN/inf"),
    ],
)
def test_kmeans_rejects_bad_input(x, k, match):
    with pytest.raises(ValueError, match=match):
        kmeans(x, k)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="host has a GPU")
def test_kmeans_use_gpu_true_without_gpu_is_an_error():
    with pytest.raises(RuntimeError, match="no GPU"):
        kmeans(np.zeros((4, 2)), 2, use_gpu=True)


def test_clustering_does_not_import_heavy_stacks():
    code = (
        "import sys, clustering, downstream.knn\n"
        "bad = [m for m in ('torch', 'ray', 'mlflow', 'pipeline', 'umap', 'matplotlib.pyplot')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


# --------------------------------------------------------------------------- plots


def test_embedding_2d_tsne_subsamples():
    x, _, _ = _blobs(n=15)  # 45 points
    coords, idx = embedding_2d(x, max_points=25, seed=4)
    assert coords.shape == (25, 2) and coords.dtype == np.float32
    assert np.isfinite(coords).all()
    assert idx.dtype == np.int64 and idx.shape == (25,)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 45


def test_embedding_2d_seeding_and_tsne_arguments(monkeypatch):
    # Real t-SNE is the slow part; a stub records the arguments instead.
    import sklearn.manifold

    calls = []

    class FakeTSNE:
        def __init__(self, **kw):
            calls.append(kw)

        def fit_transform(self, sub):
            return sub[:, :2] * 2

    monkeypatch.setattr(sklearn.manifold, "TSNE", FakeTSNE)
    x = np.random.default_rng(0).normal(size=(100, 4))
    coords, idx = embedding_2d(x, max_points=40, seed=7)
    coords2, idx2 = embedding_2d(x, max_points=40, seed=7)
    np.testing.assert_array_equal(idx, idx2)  # same seed -> same subsample
    assert not np.array_equal(idx, embedding_2d(x, max_points=40, seed=8)[1])
    np.testing.assert_allclose(coords, 2 * x[idx, :2], rtol=1e-6)  # coords match idx rows
    assert calls[0]["init"] == "pca" and calls[0]["random_state"] == 7
    assert calls[0]["perplexity"] == 30  # min(30, M - 1) with M = 40
    _, idx_all = embedding_2d(x[:10], max_points=40)
    np.testing.assert_array_equal(idx_all, np.arange(10))  # no subsampling when N <= max
    assert calls[-1]["perplexity"] == 9  # min(30, 10 - 1)


def test_embedding_2d_umap_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # makes `import umap` fail
    with pytest.raises(ImportError, match="pip install umap-learn"):
        embedding_2d(np.random.default_rng(0).normal(size=(10, 3)), method="umap")
    with pytest.raises(ValueError, match="method"):
        embedding_2d(np.zeros((10, 3)), method="pca")


def test_scatter_plot_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(50, 2))
    y = rng.integers(0, 3, 50)
    one = scatter_plot(coords, {"label": y}, tmp_path / "one.png")
    two = scatter_plot(
        coords, {"label": y, "cluster": rng.integers(0, 15, 50)}, tmp_path / "sub" / "two.png",
        title="epoch 3",
    )
    assert one == str(tmp_path / "one.png")
    w1, h1 = Image.open(one).size
    w2, h2 = Image.open(two).size
    assert os.path.getsize(two) > 0
    assert w2 > w1  # one panel per coloring, side by side
    assert w2 > h2
    # continuous values and >20 categories use a colorbar instead of a legend
    scatter_plot(coords, {"score": rng.random(50), "id": np.arange(50)}, tmp_path / "c.png")
    Image.open(tmp_path / "c.png").verify()
    with pytest.raises(ValueError, match="shape"):
        scatter_plot(coords, {"label": y[:10]}, tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "one.png", "sub"]


def test_cluster_grid_one_row_per_cluster(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    images = rng.integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8)
    assignments = np.arange(n) % 10
    distances = rng.random(n).astype(np.float32)

    p_all = cluster_grid(images, assignments, distances, tmp_path / "all.png")
    p1 = cluster_grid(images, assignments, distances, tmp_path / "c1.png", clusters=[4])
    p2 = cluster_grid(images, assignments, distances, tmp_path / "c2.png", clusters=[4, 7])
    (w10, h10), (w1, h1), (w2, h2) = (Image.open(p).size for p in (p_all, p1, p2))
    row_h = h2 - h1
    assert row_h >= 28
    assert h10 - h1 == 9 * row_h  # 10 rows == 10 clusters
    p_narrow = cluster_grid(images, assignments, distances, tmp_path / "n.png", per_cluster=4)
    assert Image.open(p_narrow).size[0] < w10
    assert Image.open(p_narrow).size[1] == h10

    # RGB images and per-image class captions
    rgb = rng.integers(0, 256, size=(n, 3, 28, 28), dtype=np.uint8)
    names = np.array(["airplane", "car", "bird"])[rng.integers(0, 3, n)]
    p = cluster_grid(rgb, assignments, distances, tmp_path / "rgb.png", class_names=names)
    assert Image.open(p).mode == "RGB"

    with pytest.raises(ValueError, match="uint8"):
        cluster_grid(images.astype(np.float32), assignments, distances, tmp_path / "x.png")
    with pytest.raises(ValueError, match="C in"):
        cluster_grid(np.zeros((n, 2, 8, 8), np.uint8), assignments, distances, tmp_path / "x.png")


def test_cluster_grid_orders_members_by_distance(tmp_path):
    # 5 members of cluster 0, each a solid colour whose green channel encodes
    # its rank by distance (rank 0 = nearest). Row labels are gray text, so
    # pixels with R == 200 and B == 50 belong to tiles only.
    dist = np.array([0.5, 0.1, 0.9, 0.3, 0.7], dtype=np.float32)
    rank = np.argsort(np.argsort(dist))  # [2, 0, 4, 1, 3]
    images = np.zeros((5, 3, 8, 8), dtype=np.uint8)
    images[:, 0], images[:, 2] = 200, 50
    images[:, 1] = (10 + 40 * rank)[:, None, None]
    path = cluster_grid(images, np.zeros(5, np.int64), dist, tmp_path / "o.png", per_cluster=3)
    px = np.asarray(Image.open(path).convert("RGB")).astype(int)
    tiles = (px[..., 0] == 200) & (px[..., 2] == 50)
    ys, xs = np.nonzero(tiles)
    line = px[ys[len(ys) // 2]]
    greens = [g for (r, g, b) in line if r == 200 and b == 50]
    seen = [g for i, g in enumerate(greens) if i == 0 or g != greens[i - 1]]
    assert seen == [10, 50, 90]  # the 3 nearest, nearest first


# --------------------------------------------------------------------------- assignment CSVs


def test_assignments_round_trip_with_awkward_paths(tmp_path):
    ids = ["/data/a,b/img 1.png", 'quote"d/x.jpg', "plain.png", "new\nline.png"]
    clusters = np.array([3, 0, 3, 1], dtype=np.int64)
    dists = np.array([0.1, 1.5, 2.25e-7, 3.0], dtype=np.float32)
    labels = ["cat", "dog,big", "cat", "7"]
    path = tmp_path / "assign.csv"
    (tmp_path / "assign.csv").write_text("stale")  # replaced atomically
    assert write_assignments(path, ids, clusters, dists, labels=labels) == str(path)
    header = path.read_text(encoding="utf-8").splitlines()[0]
    assert header == "id,cluster,distance,label"
    rows = read_assignments(path)
    assert [r["id"] for r in rows] == ids
    assert [r["cluster"] for r in rows] == [3, 0, 3, 1]
    # distances are exact at float32 precision
    assert [np.float32(r["distance"]) for r in rows] == list(dists)
    assert [r["label"] for r in rows] == ["cat", "dog,big", "cat", 7]
    assert os.listdir(tmp_path) == ["assign.csv"]  # no temp files left behind


def test_assignments_integer_ids_without_labels(tmp_path):
    path = write_assignments(
        tmp_path / "a.csv", np.array([10, 11, 12]), np.array([0, 1, 0]), np.array([0.0, 1.0, 2.0])
    )
    with open(path, encoding="utf-8") as f:
        assert f.readline().strip() == "id,cluster,distance"
    rows = read_assignments(path)
    assert rows == [
        {"id": 10, "cluster": 0, "distance": 0.0},
        {"id": 11, "cluster": 1, "distance": 1.0},
        {"id": 12, "cluster": 0, "distance": 2.0},
    ]
    with pytest.raises(ValueError, match="length mismatch"):
        write_assignments(tmp_path / "b.csv", [1, 2], [0, 1, 2], [0.0, 0.0, 0.0])
    assert not (tmp_path / "b.csv").exists()
