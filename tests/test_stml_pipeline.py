"""STML as a pipeline stage: a 2-worker refine run through Ray Train on the unseen-class protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import validate_config

CONFIG = """
name: stml_e2e
data: {source: digits, train_classes: [0, 1, 2, 3, 4], eval_classes: [5, 6, 7, 8, 9], train_subset: 400, eval_subset: 200}
backbone: {name: test_resnet, small_image_stem: false, image_size: 16}
ray: {num_workers: 2}
stages:
  - {name: simclr, kind: pretext, method: simclr, epochs: 1, batch_size: 64, evaluate: false}
  - {name: eval_simclr, kind: evaluate, input: simclr, retrieval: true, tsne: false, clusters: 5}
  - name: stml
    kind: refine
    input: simclr
    epochs: 2
    batch_size: 40
    optimizer: {name: adamw, lr: 1.0e-3}
    settings: {embedding_dim: 32, big_embedding_dim: 64, momentum: 0.9, num_neighbors: 4}
  - {name: eval_stml, kind: evaluate, input: stml, retrieval: true, tsne: false, clusters: 5,
     retrieval_distance: euclidean, kmeans_restarts: 3}
  - {name: eval_stml_backbone, kind: evaluate, input: stml, features: backbone, retrieval: true, tsne: false,
     clusters: 5}
"""


@pytest.fixture(scope="module")
def stml_run(ray_session, tmp_path_factory):
    from pipeline.runner import PipelineRun

    out = tmp_path_factory.mktemp("stml")
    summary = PipelineRun(validate_config(yaml.safe_load(CONFIG)), out).run()
    return out, summary


def test_refined_artifact_is_an_embedder_that_loads(stml_run):
    from pipeline.backbones import load_backbone, read_backbone_meta

    out, summary = stml_run
    path = summary["stages"]["stml"]["artifacts"]["backbone"]
    meta = read_backbone_meta(path)
    assert meta["export"] == "stml_embedder" and meta["embedding_dim"] == 32
    model = load_backbone(path)
    with torch.no_grad():
        z = model(torch.randn(5, 3, 16, 16))
    assert z.shape == (5, 32)
    # f is exported as trained (the authors compare raw f by Euclidean distance), not L2-normalized
    assert meta["l2_normalize"] is False
    assert not np.allclose(z.norm(dim=1).numpy(), 1.0, atol=1e-3)
    bare = load_backbone(path, bare=True)
    with torch.no_grad():
        assert bare(torch.randn(2, 3, 16, 16)).shape == (2, meta["feature_dim"])


def test_simclr_and_stml_both_get_retrieval_metrics_on_unseen_classes(stml_run):
    """What the name says: both evaluations report retrieval metrics, and no kNN accuracy on disjoint classes."""
    out, summary = stml_run
    stages = json.loads((out / "summary.json").read_text())["stages"]
    for name in ("eval_simclr", "eval_stml"):
        m = stages[name]["metrics"]
        assert {"recall_at_1", "recall_at_8", "map_at_r", "nmi"} <= m.keys()
        assert "knn_accuracy" not in m  # classes are disjoint: a kNN vote is meaningless
    assert stages["stml"]["input"] == "simclr"


def test_evaluate_can_take_the_refined_backbone_without_its_head(stml_run):
    from pipeline.backbones import load_backbone, read_backbone_meta
    from pipeline.data import load_images
    from pretext.embeddings import prepare_batch
    from pipeline.evaluate import backbone_features

    out, summary = stml_run
    path = summary["stages"]["stml"]["artifacts"]["backbone"]
    meta = read_backbone_meta(path)
    images = load_images("digits", "test", subset=12, classes=[5, 6, 7, 8, 9], image_size=16, seed=0,
                         log=lambda *_: None).images
    with_head = backbone_features(path, images, 8)
    without = backbone_features(path, images, 8, bare=True)
    assert with_head.shape == (12, 32) and without.shape == (12, meta["feature_dim"])
    # the bare features are the refined backbone's own timm module's, not the input backbone's
    x = prepare_batch(torch.from_numpy(images), input_size=meta["input_size"], mean=meta["mean"], std=meta["std"],
                      in_chans=meta["in_chans"])
    with torch.no_grad():
        direct = load_backbone(path, bare=True)(x).numpy()
    np.testing.assert_allclose(without, direct, rtol=1e-4, atol=1e-4)
    before = backbone_features(summary["stages"]["simclr"]["artifacts"]["backbone"], images, 8)
    assert before.shape == without.shape and not np.allclose(before, without, atol=1e-3)
    # the evaluate stage with features: backbone embedded with the backbone, the one without with f
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert np.load(stages["eval_stml_backbone"]["artifacts"]["embeddings"]).shape[1] == meta["feature_dim"] != 32
    assert np.load(stages["eval_stml"]["artifacts"]["embeddings"]).shape[1] == 32
    assert {"recall_at_1", "nmi"} <= stages["eval_stml_backbone"]["metrics"].keys()


def test_teacher_moved_by_ema_and_student_trained(stml_run):
    from safetensors.torch import load_file

    out, summary = stml_run
    storage = Path(summary["stages"]["stml"]["artifacts"]["checkpoints"])
    latest = sorted(p for p in storage.glob("checkpoint_*") if p.is_dir())[-1]
    state = load_file(str(latest / "state.safetensors"))
    start = load_file(str(Path(summary["stages"]["simclr"]["artifacts"]["backbone"]) / "model.safetensors"))
    key = "conv1.weight" if "conv1.weight" in start else next(k for k in start if k.endswith("weight"))
    teacher, student = state[f"teacher_backbone.{key}"], state[f"backbone.{key}"]
    assert not torch.equal(teacher, start[key]), "the EMA teacher never moved"
    assert not torch.equal(student, start[key]), "the student never trained"
    assert not torch.equal(teacher, student), "teacher should lag the student"
