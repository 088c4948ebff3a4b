"""Evaluation of images that are not in memory (the streamed backend's array-like): bounded reads in process,
and embedding on the Ray cluster (pipeline.cluster_embed) equal to in-process embedding, in row-id order."""

from __future__ import annotations

import numpy as np
import pytest

import conftest
from conftest import MmapImages, backbone_artifact
from pipeline.config import EvaluateStage
from pipeline.data import ImageSet


def _image_set(path, n: int, seed: int, max_rows: int | None = None) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = MmapImages.save(path, rng.integers(0, 256, size=(n, 3, 16, 16), dtype=np.uint8), max_rows)
    return ImageSet(images=images, labels=np.arange(n) % 4, ids=[f"{path.stem}/{i}" for i in range(n)],
                    class_names=None, source="synthetic", split=path.stem)


def test_evaluate_reads_an_array_like_a_batch_at_a_time(tmp_path, monkeypatch):
    """Without Ray, an evaluate stage embeds in process a batch of rows at a time and draws its figures from
    the rows they show: no read of more than one batch, and each evaluation image read once to embed."""
    import pipeline.evaluate as evaluation

    monkeypatch.setattr(evaluation, "_ray_running", lambda: False)
    batch = 16
    train = _image_set(tmp_path / "train.npy", 80, 0, max_rows=batch)
    evalset = _image_set(tmp_path / "eval.npy", 60, 1, max_rows=batch)
    stage = EvaluateStage.model_validate({"name": "ev", "kind": "evaluate", "input": "simclr", "batch_size": batch,
                                          "knn_k": 5, "clusters": 3, "tsne": False, "retrieval": True,
                                          "grid_per_cluster": 4, "cluster_page_images": 10, "uncertain_images": 8})
    metrics, artifacts = evaluation.evaluate(stage, artifact=backbone_artifact(tmp_path), train=train,
                                             evalset=evalset, out_dir=tmp_path / "out", log=lambda _: None)
    assert {"knn_accuracy", "map_at_r", "nmi"} <= metrics.keys()
    assert train.images.rows_read == 80
    shown = 3 * 4 + 3 * 10 + 8  # at most: a cluster smaller than a page shows all its members; the uncertain page
    assert 60 < evalset.images.rows_read <= 60 + shown
    assert np.load(artifacts["embeddings"]).shape[0] == 60


def test_cluster_embeddings_equal_the_in_process_ones_in_row_order(ray_session, tmp_path, monkeypatch):
    """Ray Data blocks come back shuffled here (the row-id dataset is shuffled), yet every row lands at its id;
    a repeated or a missing row id is an error, not a silently wrong file."""
    import ray
    import ray.cloudpickle

    from pipeline.cluster_embed import embed_on_cluster
    from pipeline.evaluate import backbone_features

    n, batch = 150, 16
    artifact = backbone_artifact(tmp_path)
    pixels = np.random.default_rng(0).integers(0, 256, size=(n, 3, 16, 16), dtype=np.uint8)
    images = MmapImages.save(tmp_path / "images.npy", pixels, max_rows=batch)
    expected = backbone_features(artifact, pixels, batch)  # an ndarray is embedded in process even with Ray up
    assert isinstance(expected, np.ndarray) and not isinstance(expected, np.memmap)

    row_ids = ray.data.range
    run = dict(batch_size=batch, bare=False, use_gpu=False, concurrency=1)
    ray.cloudpickle.register_pickle_by_value(conftest)  # the stand-in class is not importable on the workers
    try:
        monkeypatch.setattr(ray.data, "range", lambda count: row_ids(count).random_shuffle(seed=0))
        got = embed_on_cluster(artifact, images, out_path=tmp_path / "shuffled.npy", **run)
        monkeypatch.setattr(ray.data, "range", lambda count: row_ids(count).union(row_ids(1)))
        with pytest.raises(RuntimeError, match="repeated"):
            embed_on_cluster(artifact, images, out_path=tmp_path / "repeated.npy", **run)
        monkeypatch.setattr(ray.data, "range", lambda count: row_ids(count - 1))
        with pytest.raises(RuntimeError, match="1 of 150 rows never came back"):
            embed_on_cluster(artifact, images, out_path=tmp_path / "missing.npy", **run)
        monkeypatch.setattr(ray.data, "range", row_ids)
        via = backbone_features(artifact, images, batch)  # not an ndarray and Ray is running: the cluster path
    finally:
        ray.cloudpickle.unregister_pickle_by_value(conftest)
    assert isinstance(got, np.memmap) and not got.flags.writeable and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "shuffled.npy"), expected, rtol=0, atol=1e-5)
    assert isinstance(via, np.memmap)
    np.testing.assert_allclose(via, expected, rtol=0, atol=1e-5)
    assert images.rows_read == 0  # the driver read no pixels: the actors did
    assert not list(tmp_path.rglob(".embed-parts-*"))  # the actors' part files are gone, failed runs' too
