"""Clustering beyond plain k-means: UMAP before clustering (N2D), Gaussian mixtures, per-image confidence,
the least confident images, and choose_k for both. Only the first test runs real UMAP (numba compiles it on
first use: about half a minute on a busy 2-core machine); the others stand it in where they need it."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clustering import (ClusterResult, KMeansResult, choose_k, gmm, image_page, kmeans, margin_confidence, nmi,
                        read_assignments, umap_reduce, write_assignments)


def _rings(per: int = 200, d: int = 16, noise: float = 0.05, seed: int = 0):
    """Two concentric circles (radius 1 and 3) in a random 2-d plane of R^d, plus noise in every dimension:
    k-means cuts them in halves, their neighbourhood graphs are two separate loops."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0, 2 * np.pi, size=2 * per)
    y = np.repeat([0, 1], per)
    radius = np.where(y == 0, 1.0, 3.0)
    plane = np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
    basis = np.linalg.qr(rng.normal(size=(d, 2)))[0]  # (d, 2), orthonormal columns
    x = plane @ basis.T + rng.normal(scale=noise, size=(2 * per, d))
    return x.astype(np.float32), y


def _blobs(k: int = 3, per: int = 100, d: int = 4, spread: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = np.eye(k, d) * 8.0
    y = np.repeat(np.arange(k), per)
    return (centres[y] + rng.normal(scale=spread, size=(k * per, d))).astype(np.float32), y, centres


# --------------------------------------------------------------------------- UMAP (real)


def test_umap_then_kmeans_separates_rings_that_kmeans_cuts():
    x, y = _rings()
    plain = nmi(y, kmeans(x, 2, seed=0).assignments)
    coords, fitted = umap_reduce(x, 5, metric="euclidean", n_neighbors=15, seed=0)
    assert coords.shape == (len(x), 5) and coords.dtype == np.float32 and np.isfinite(coords).all()
    assert fitted.tolist() == list(range(len(x)))  # N <= fit_sample: every point fitted
    manifold = nmi(y, kmeans(coords, 2, seed=0).assignments)
    assert plain < 0.1 and manifold > 0.9, (plain, manifold)
    # a bounded fit: 150 sampled points fitted, all 400 placed by transform in chunks, rings still apart
    coords, fitted = umap_reduce(x, 5, metric="euclidean", fit_sample=150, chunk=64, seed=0)
    assert fitted.size == 150 and np.all(np.diff(fitted) > 0) and coords.shape == (len(x), 5)
    assert nmi(y, kmeans(coords, 2, seed=0).assignments) > 0.9


# --------------------------------------------------------------------------- UMAP (stood in)


class _FakeUMAP:
    """Records its arguments and the rows it fits and transforms; projects onto the first coordinates."""

    calls: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        _FakeUMAP.calls.append(("init", kwargs))

    def fit(self, x):
        _FakeUMAP.calls.append(("fit", len(x)))
        return self

    def fit_transform(self, x):
        _FakeUMAP.calls.append(("fit_transform", len(x)))
        return x[:, : self.kwargs["n_components"]] * 2.0

    def transform(self, x):
        _FakeUMAP.calls.append(("transform", len(x)))
        return x[:, : self.kwargs["n_components"]] * 2.0


@pytest.fixture
def fake_umap(monkeypatch):
    module = types.ModuleType("umap")
    module.UMAP = _FakeUMAP
    _FakeUMAP.calls = []
    monkeypatch.setitem(sys.modules, "umap", module)
    return _FakeUMAP


def test_umap_reduce_samples_the_fit_and_transforms_in_chunks(fake_umap):
    x = np.random.default_rng(0).normal(size=(250, 6)).astype(np.float32)
    coords, fitted = umap_reduce(x, 3, fit_sample=100, chunk=64, seed=5, n_neighbors=30)
    np.testing.assert_allclose(coords, x[:, :3] * 2.0)
    assert fitted.size == 100 and len(set(fitted.tolist())) == 100
    again = umap_reduce(x, 3, fit_sample=100, chunk=64, seed=5)[1]
    assert again.tolist() == fitted.tolist()  # the sample is seeded
    init = fake_umap.calls[0][1]
    assert init["n_components"] == 3 and init["metric"] == "cosine" and init["min_dist"] == 0.0
    assert init["random_state"] == 5 and init["n_neighbors"] == 30
    assert fake_umap.calls[1:5] == [("fit", 100), ("transform", 64), ("transform", 64), ("transform", 64)]
    assert fake_umap.calls[5] == ("transform", 250 - 3 * 64)
    fake_umap.calls = []
    umap_reduce(x[:20], 3, n_neighbors=50)
    assert fake_umap.calls[0][1]["n_neighbors"] == 19 and fake_umap.calls[1] == ("fit_transform", 20)
    with pytest.raises(ValueError, match="too few"):
        umap_reduce(x[:11], 10)


def test_umap_reduce_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(ImportError, match="umap-learn"):
        umap_reduce(np.zeros((30, 4), dtype=np.float32), 2)


# --------------------------------------------------------------------------- GMM


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_gmm_on_separated_blobs(covariance):
    x, y, centres = _blobs()
    res = gmm(x, 3, covariance=covariance, seed=0)
    assert isinstance(res, ClusterResult) and res.converged and np.isfinite(res.bic)
    assert nmi(y, res.assignments) > 0.99
    assert res.confidence.dtype == np.float32 and ((res.confidence >= 1 / 3) & (res.confidence <= 1)).all()
    assert np.median(res.confidence) > 0.99
    # distances: Euclidean to the assigned mean, which sit on the true centres
    np.testing.assert_allclose(res.distances, np.linalg.norm(x - res.centroids[res.assignments], axis=1), rtol=1e-5)
    assert np.abs(np.sort(res.centroids, axis=0) - np.sort(centres[:, :4], axis=0)).max() < 0.2
    assert res.inertia == pytest.approx(float((res.distances.astype(np.float64) ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_gmm_confidence_is_low_midway_between_components(covariance):
    """Two unit-variance blobs 4 apart, plus points on the line midway: those are close to coin tosses (the
    fitted boundary sits near, not exactly on, that line), the points near a centre are sure."""
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 150)
    x = np.stack([np.where(y == 0, -2.0, 2.0), np.zeros(300)], axis=1) + rng.normal(size=(300, 2))
    midway = np.stack([np.zeros(10), np.linspace(-1, 1, 10)], axis=1)
    res = gmm(np.vstack([x, midway]).astype(np.float32), 2, covariance=covariance, seed=0)
    central = np.abs(np.abs(x[:, 0]) - 2) < 0.5
    assert res.confidence[:300][central].min() > 0.98
    assert res.confidence[300:].max() < 0.95 and res.confidence[300:].mean() < 0.85
    # the least confident of all lie between the blobs
    assert np.abs(np.vstack([x, midway])[np.argsort(res.confidence)[:20], 0]).max() < 1.0


def test_gmm_default_covariance_and_bad_input():
    from clustering.gmm import default_covariance

    assert default_covariance(10) == "full" and default_covariance(512) == "diag"
    x, _, _ = _blobs()
    with pytest.raises(ValueError, match="k must be"):
        gmm(x, 0)
    with pytest.raises(ValueError, match="NaN"):
        gmm(np.full((5, 2), np.nan), 2)
    a = gmm(x, 3, seed=1)
    b = gmm(x, 3, seed=1)
    assert np.array_equal(a.assignments, b.assignments) and np.array_equal(a.confidence, b.confidence)


# --------------------------------------------------------------------------- k-means confidence


def test_kmeans_confidence_is_the_relative_margin():
    x, y, _ = _blobs(k=2, d=2)
    res = kmeans(x, 2, seed=0)
    assert KMeansResult is ClusterResult
    d = np.linalg.norm(x[:, None, :] - res.centroids[None], axis=2)
    d.sort(axis=1)
    np.testing.assert_allclose(res.confidence, 1 - d[:, 0] / d[:, 1], atol=1e-5)
    assert ((res.confidence >= 0) & (res.confidence <= 1)).all()
    assert kmeans(x, 1).confidence.tolist() == [1.0] * len(x)


def test_kmeans_least_confident_members_lie_at_the_boundary():
    """Two touching unit-variance blobs: in each cluster the 5 least confident members are among the 15 of
    ~150 nearest the boundary between the two centroids (their perpendicular bisector). The margin is not a
    function of that distance alone: a point far out on the other side of its cluster is less sure than one at
    the centroid."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 150)
    x = (np.stack([np.where(y == 0, -2.0, 2.0), np.zeros(300)], axis=1) + rng.normal(size=(300, 2))).astype(np.float32)
    res = kmeans(x, 2, seed=0)
    normal = res.centroids[1] - res.centroids[0]
    to_boundary = np.abs((x - res.centroids.mean(axis=0)) @ normal) / np.linalg.norm(normal)
    for c in (0, 1):
        members = np.flatnonzero(res.assignments == c)
        least = members[np.argsort(res.confidence[members])[:5]]
        nearest = members[np.argsort(to_boundary[members])[:15]]
        assert set(least) <= set(nearest), c


def test_margin_confidence_edges():
    np.testing.assert_allclose(margin_confidence([0.0, 1.0, 2.0, 0.0, 1.01], [1.0, 1.0, 4.0, 0.0, 1.0]),
                               [1.0, 0.0, 0.5, 0.0, 0.0])


# --------------------------------------------------------------------------- choose_k, CSV, page


def test_choose_k_with_gmm_records_bic():
    x, _, _ = _blobs(k=4, d=4, per=60)
    chosen = choose_k(x, 2, 6, algorithm="gmm", seed=0)
    assert chosen.k == 4 and sorted(chosen.bics) == list(range(2, 7))
    assert chosen.result.bic == chosen.bics[4] and chosen.result.confidence is not None
    assert choose_k(x, 2, 6).bics is None
    with pytest.raises(ValueError, match="algorithm"):
        choose_k(x, 2, 6, algorithm="dbscan")


def test_assignments_confidence_column_comes_last(tmp_path):
    path = write_assignments(tmp_path / "a.csv", ["a.png", "b.png"], np.array([0, 1]), np.array([0.5, 1.5]),
                             labels=["cat", "dog"], confidence=np.array([0.25, 1.0]))
    assert open(path, encoding="utf-8").readline().strip() == "id,cluster,distance,label,confidence"
    rows = read_assignments(path)
    assert [r["confidence"] for r in rows] == [0.25, 1.0] and rows[1]["label"] == "dog"
    write_assignments(tmp_path / "b.csv", [1, 2], np.array([0, 1]), np.array([0.0, 0.0]), confidence=[0.5, 0.5])
    assert open(tmp_path / "b.csv", encoding="utf-8").readline().strip() == "id,cluster,distance,confidence"
    with pytest.raises(ValueError, match="length mismatch"):
        write_assignments(tmp_path / "c.csv", [1, 2], np.array([0, 1]), np.array([0.0, 0.0]), confidence=[0.5])


def test_image_page_shows_the_images_asked_for(tmp_path):
    images = np.zeros((10, 1, 8, 8), dtype=np.uint8)
    images[3] = 255
    path = image_page(images, [3, 0], tmp_path / "u.png", title="two", captions=["c0 0.10\ncat", "c1 0.20\ndog"],
                      columns=4)
    img = np.asarray(Image.open(path))
    assert img.shape[1] >= 2 * 64 and (img == 255).all(axis=2).any()
    image_page(images, [], tmp_path / "empty.png", title="none")
    with pytest.raises(ValueError, match="captions"):
        image_page(images, [1], tmp_path / "x.png", title="t", captions=["a", "b"])


# --------------------------------------------------------------------------- the evaluate stage (real UMAP)


@pytest.fixture(scope="module")
def digits():
    from pipeline.data import load_images

    quiet = dict(log=lambda *_: None)
    return load_images("digits", "train", subset=200, **quiet), load_images("digits", "test", subset=300, **quiet)


@pytest.mark.parametrize("algorithm", ["kmeans", "gmm"])
def test_evaluate_clusters_umap_coordinates_and_reports_plain_kmeans(digits, tmp_path, algorithm):
    import json
    import re

    from pipeline.config import EvaluateStage
    from pipeline.evaluate import evaluate

    train, evalset = digits
    stage = EvaluateStage.model_validate({
        "name": "ev", "kind": "evaluate", "input": "pixels", "knn_k": 10, "tsne": False, "kmeans_iterations": 20,
        "cluster_space": "umap", "cluster_algorithm": algorithm, "umap_components": 5, "uncertain_images": 16,
    })
    lines: list[str] = []
    metrics, artifacts = evaluate(stage, artifact=None, train=train, evalset=evalset, out_dir=tmp_path,
                                  log=lines.append)
    for key in ("nmi", "ari", "cluster_accuracy", "purity", "pair_f1", "confidence_mean", "cluster_umap_time_s",
                "embedding_kmeans_nmi", "embedding_kmeans_ari", "embedding_kmeans_pair_f1",
                "embedding_kmeans_inertia"):
        assert key in metrics, key
    assert metrics["cluster_umap_fit_points"] == len(evalset) and metrics["clusters"] == 10
    assert ("gmm_bic" in metrics) == (algorithm == "gmm") and ("kmeans_inertia" in metrics) == (algorithm == "kmeans")
    # the manifold helps on digits pixels (1797 images: k-means 0.74, UMAP-10 k-means 0.82-0.89, GMM 0.91)
    assert metrics["nmi"] > metrics["embedding_kmeans_nmi"] > 0.5, metrics
    assert np.load(artifacts["cluster_space"]).shape == (len(evalset), 5)
    assert np.load(artifacts["centroids"]).shape == (10, 5)  # the chosen clustering's, in its space
    assert any("on UMAP-5 (k=10): NMI" in line for line in lines)
    assert any("k-means on the embedding (k=10): NMI" in line for line in lines)

    rows = read_assignments(artifacts["assignments"])
    assert list(rows[0]) == ["id", "cluster", "distance", "label", "confidence"]
    conf = np.array([r["confidence"] for r in rows])
    assert ((conf >= 0) & (conf <= 1)).all() and conf.mean() == pytest.approx(metrics["confidence_mean"], abs=1e-6)
    text = (tmp_path / "report.html").read_text()
    assert "uncertain.png" in set(re.findall(r'(?:src|href)="([^"]+)"', text))
    assert Image.open(artifacts["uncertain"]).size[0] > 12 * 64
    assert "Least confident images per cluster" in text and "Chosen clustering and plain k-means" in text
    least = int(np.argmin(conf))  # listed in its cluster's row
    row = rf'<tr><td class="num">{rows[least]["cluster"]}</td><td class="num">\d+</td><td class="num">[^<]*</td>'
    assert re.search(row + rf"<td>(?:[^<]*, )?{rows[least]['id']} \(", text)
    assert json.loads((tmp_path / "metrics.json").read_text())["embedding_kmeans_nmi"] == metrics["embedding_kmeans_nmi"]


def test_evaluate_auto_k_in_umap_space_with_gmm(digits, tmp_path):
    from pipeline.config import EvaluateStage
    from pipeline.evaluate import evaluate

    train, evalset = digits
    stage = EvaluateStage.model_validate({
        "name": "ev", "kind": "evaluate", "input": "pixels", "knn_k": 10, "tsne": False, "html_report": False,
        "cluster_space": "umap", "cluster_algorithm": "gmm", "umap_components": 5, "choose_k": {"min": 6, "max": 12},
    })
    lines: list[str] = []
    metrics, artifacts = evaluate(stage, artifact=None, train=train, evalset=evalset, out_dir=tmp_path,
                                  log=lines.append)
    assert 6 <= metrics["clusters"] <= 12 and "silhouette" in metrics and "embedding_kmeans_nmi" in metrics
    assert any(line.startswith("[ev] chose k=") and "GMM (full covariance) on UMAP-5" in line for line in lines)
    assert Path(artifacts["silhouette_vs_k"]).is_file()
