"""The evaluate stage on raw pixels of a tiny synthetic set: retrieval, choosing k, cluster pages, UMAP,
and the HTML report (its links must resolve on disk and in the MLflow artifact tree)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from clustering.report import format_value
from pipeline.config import EvaluateStage
from pipeline.data import ImageSet
from pipeline.evaluate import evaluate

CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]


def _squares(per_class: int, seed: int) -> ImageSet:
    """16 px grayscale images: a bright 8x8 square in the quadrant named by the class, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), per_class)
    images = rng.integers(0, 60, size=(len(labels), 1, 16, 16)).astype(np.uint8)
    for i, y in enumerate(labels):
        r, c = divmod(int(y), 2)
        images[i, 0, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 180
    return ImageSet(images=images, labels=labels, ids=None, class_names=CLASSES, source="synthetic", split="x")


def _stage(**overrides) -> EvaluateStage:
    data = {"name": "ev", "kind": "evaluate", "input": "pixels", "knn_k": 10, "tsne_points": 50,
            "kmeans_iterations": 10, **overrides}
    return EvaluateStage.model_validate(data)


class _FakeUMAP:
    """Stands in for umap.UMAP (whose numba compile takes a minute on a busy 2-core machine): the first two
    principal axes, enough to check the plot is wired into the stage, its artifacts and the report."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def fit_transform(self, x):
        centred = x - x.mean(axis=0)
        return centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    import types

    out = tmp_path_factory.mktemp("eval")
    lines: list[str] = []
    fake = types.ModuleType("umap")
    fake.UMAP = _FakeUMAP
    saved = sys.modules.get("umap")
    sys.modules["umap"] = fake
    stage = _stage(retrieval=True, retrieval_distance="cosine", recall_at=[1, 4], clusters="auto",
                   choose_k={"min": 2, "max": 6}, spherical_kmeans=True, tsne=True, umap=True,
                   cluster_page_images=8)
    try:
        metrics, artifacts = evaluate(stage, artifact=None, train=_squares(25, 0), evalset=_squares(15, 1),
                                      out_dir=out, log=lines.append)
    finally:
        if saved is None:
            del sys.modules["umap"]
        else:
            sys.modules["umap"] = saved
    return out, metrics, artifacts, lines


def test_metrics_of_a_full_run(full_run):
    out, metrics, artifacts, lines = full_run
    for key in ("recall_at_1", "recall_at_4", "r_precision", "map_at_r", "map", "nmi", "ari",
                "cluster_accuracy", "purity", "pair_f1", "silhouette", "umap_time_s"):
        assert key in metrics, key
    assert "recall_at_2" not in metrics  # recall_at: [1, 4] was asked for
    assert metrics["clusters"] == 4  # four well-separated quadrants
    assert metrics["recall_at_1"] > 0.9 and metrics["pair_f1"] > 0.9
    written = json.loads((out / "metrics.json").read_text())
    assert written.pop("exclusion")["knn_rule"] == "pixels"  # which rule kept self-matches out (no ids here)
    assert written == pytest.approx(metrics)
    assert any("chose k=4" in line for line in lines)
    # defaults (embedding space, k-means): no second clustering and none of its metrics
    assert not any(key.startswith(("embedding_kmeans_", "gmm_", "cluster_umap_")) for key in metrics)
    assert 0.0 <= metrics["confidence_mean"] <= 1.0
    assert any("pair F1" in line for line in lines)
    np.testing.assert_allclose(np.linalg.norm(np.load(artifacts["centroids"]), axis=1), 1.0, atol=1e-5)


def test_artifacts_of_a_full_run(full_run):
    out, _, artifacts, _ = full_run
    for key in ("assignments", "cluster_grid", "clusters", "tsne", "umap", "silhouette_vs_k", "report",
                "embeddings", "centroids", "metrics", "uncertain"):
        assert Path(artifacts[key]).exists(), key
    pages = sorted(p.name for p in (out / "clusters").glob("*.png"))
    assert pages == [f"cluster_{c:03d}.png" for c in range(4)]
    # artifacts are files directly in out_dir, or the one folder named like its key (see evaluate's docstring)
    for key, path in artifacts.items():
        assert Path(path).parent == out or (Path(path).is_dir() and Path(path).name == key), key


def test_html_report_of_a_full_run(full_run):
    out, metrics, artifacts, _ = full_run
    text = Path(artifacts["report"]).read_text()
    refs = set(re.findall(r'(?:src|href)="([^"]+)"', text))
    assert {"tsne.png", "umap.png", "silhouette_vs_k.png", "cluster_grid.png", "assignments.csv",
            "metrics.json", "uncertain.png"} <= refs
    assert "Least confident images per cluster" in text
    assert {f"clusters/cluster_{c:03d}.png" for c in range(4)} <= refs
    assert all((out / r).is_file() for r in refs)
    for key in ("nmi", "pair_f1", "map_at_r", "recall_at_1", "silhouette", "kmeans_inertia"):
        assert f'<tr><td>{key}</td><td class="num">{format_value(metrics[key])}</td></tr>' in text, key
    assert "<script" not in text and "http" not in text


def test_report_links_resolve_in_mlflow(full_run, tmp_path):
    """Logged the way the runner logs an evaluate stage's artifacts (folders under their key)."""
    from pipeline.tracking import Tracker

    _, _, artifacts, _ = full_run
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", artifact_root=tmp_path / "mlartifacts")
    run_id = tracker.start_run("ev")
    for key, path in artifacts.items():
        tracker.log_artifact(run_id, path, artifact_path=key if Path(path).is_dir() else None)
    tracker.end_run(run_id)
    root = Path(tracker.client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    text = (root / "report.html").read_text()
    refs = set(re.findall(r'(?:src|href)="([^"]+)"', text))
    assert refs and all((root / r).is_file() for r in refs)


def test_umap_missing_skips_only_that_plot(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # makes `import umap` fail
    lines: list[str] = []
    metrics, artifacts = evaluate(_stage(umap=True, tsne=False, clusters=3, retrieval=True,
                                         retrieval_gallery="train", retrieval_distance="mahalanobis"),
                                  artifact=None, train=_squares(10, 0), evalset=_squares(5, 1), out_dir=tmp_path,
                                  log=lines.append)
    assert any("WARNING: UMAP plot skipped" in line and "umap-learn" in line for line in lines)
    assert "umap" not in artifacts and not (tmp_path / "umap.png").exists()
    assert metrics["clusters"] == 3 and metrics["retrieval_queries"] == 20
    assert 0.0 <= metrics["retrieval_whitening_shrinkage"] <= 1.0 and 0.0 <= metrics["map"] <= 1.0
    assert len(list((tmp_path / "clusters").glob("*.png"))) == 3
    assert Path(artifacts["report"]).is_file()


def test_rerun_with_fewer_clusters_leaves_no_stale_pages(tmp_path):
    kwargs = dict(artifact=None, train=_squares(5, 0), evalset=_squares(5, 1), out_dir=tmp_path, log=lambda _: None)
    evaluate(_stage(tsne=False, clusters=5, html_report=False), **kwargs)
    assert len(list((tmp_path / "clusters").glob("*.png"))) == 5
    _, artifacts = evaluate(_stage(tsne=False, clusters=2, html_report=False), **kwargs)
    assert len(list((tmp_path / "clusters").glob("*.png"))) == 2
    assert "report" not in artifacts


@pytest.mark.parametrize("overrides, message", [
    ({"retrieval_distance": "manhattan"}, "stages[ev].retrieval_distance: Input should be 'euclidean', 'cosine', 'mahalanobis' or 'lmnn'"),
    ({"retrieval_gallery": "test"}, "stages[ev].retrieval_gallery:"),
    ({"recall_at": [1, 0]}, "stages[ev].recall_at[1]:"),
    ({"clusters": 1}, "stages[ev].clusters: clusters must be an integer >= 2 or 'auto', got 1"),
    ({"clusters": "many"}, "stages[ev].clusters: clusters must be an integer >= 2 or 'auto', got 'many'"),
    ({"choose_k": {"min": 5, "max": 3}}, "stages[ev].choose_k: max (3) must be >= min (5)"),
    ({"choose_k": {"min": 2, "maxk": 3}}, "stages[ev].choose_k.maxk: unknown key"),
    ({"clusters": 4, "choose_k": {"min": 2}}, "choose_k applies to clusters: auto, but clusters is 4"),
    ({"mahalanobis_shrinkage": 1.5}, "stages[ev].mahalanobis_shrinkage: mahalanobis_shrinkage must be in [0, 1]"),
    ({"cluster_space": "tsne"}, "stages[ev].cluster_space: Input should be 'embedding', 'umap' or 'lmnn'"),
    ({"cluster_algorithm": "dbscan"}, "stages[ev].cluster_algorithm: Input should be 'kmeans' or 'gmm'"),
    ({"umap_components": 1}, "stages[ev].umap_components:"),
    ({"umap_fit_sample": 10}, "stages[ev].umap_fit_sample:"),
])
def test_bad_evaluate_keys_name_the_key(overrides, message):
    from pipeline.config import ConfigError, validate_config

    stage = {"name": "ev", "kind": "evaluate", "input": "pixels", **overrides}
    with pytest.raises(ConfigError) as err:
        validate_config({"data": {"source": "digits"}, "stages": [stage]})
    assert message in str(err.value)


def test_choose_k_alone_means_auto_and_recall_at_is_sorted():
    stage = _stage(choose_k={"min": 3, "max": 7}, recall_at=[8, 1, 4, 1])
    assert stage.clusters == "auto" and stage.choose_k.model_dump() == {"min": 3, "max": 7}
    assert stage.recall_at == [1, 4, 8]


def test_retrieval_against_a_train_split_without_shared_classes_is_skipped(tmp_path):
    train, evalset = _squares(5, 0), _squares(5, 1)
    train = train.subset(np.flatnonzero(train.labels < 2))
    evalset = evalset.subset(np.flatnonzero(evalset.labels >= 2))
    lines: list[str] = []
    metrics, _ = evaluate(_stage(retrieval=True, retrieval_gallery="train", tsne=False, clusters=2,
                                 html_report=False),
                          artifact=None, train=train, evalset=evalset, out_dir=tmp_path, log=lines.append)
    assert not any(k.startswith("recall_at") for k in metrics)
    assert any("retrieval skipped" in line and "shares no class" in line for line in lines)
    assert "nmi" in metrics  # the rest of the stage still ran


def test_the_same_split_twice_is_embedded_once(tmp_path, monkeypatch):
    """train_split = eval_split (transductive clustering): one embedding serves kNN and clustering; another
    training split is still embedded on its own."""
    import pipeline.evaluate as ev

    calls: list[int] = []

    def fake_features(artifact, images, batch_size, *, bare=False, pooling="avg", out_path=None):
        calls.append(len(images))
        return np.asarray(images, dtype=np.float32).reshape(len(images), -1)

    monkeypatch.setattr(ev, "backbone_features", fake_features)
    same = _squares(6, 0)
    again = ImageSet(images=same.images.copy(), labels=same.labels, ids=None, class_names=CLASSES,
                     source="synthetic", split="x")
    assert ev.same_images(same, again) and not ev.same_images(same, _squares(6, 1))
    metrics, _ = evaluate(_stage(tsne=False, html_report=False), artifact=tmp_path, train=same, evalset=again,
                          out_dir=tmp_path / "a", log=lambda *_: None)
    assert calls == [24] and metrics["knn_excluded_matches"] >= 24  # each query's own image left out
    evaluate(_stage(tsne=False, html_report=False), artifact=tmp_path, train=_squares(6, 1), evalset=again,
             out_dir=tmp_path / "b", log=lambda *_: None)
    assert calls == [24, 24, 24]
