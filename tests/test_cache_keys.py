"""Cache keys: a change that alters what a stage computes retrains it; a change in how it runs does not.

Each rule is checked on `stage_fingerprint`, the function the cache decides with, so no run is needed."""

from __future__ import annotations

import copy

import pytest

from pipeline.cache import stage_fingerprint
from pipeline.config import validate_config

BASE = {
    "name": "keys",
    "data": {"source": "digits"},
    "backbone": {"name": "test_resnet", "image_size": 16},
    "ray": {"num_workers": 2},
    "stages": [
        {"name": "simclr", "kind": "pretext", "method": "simclr", "epochs": 2},
        {"name": "stml", "kind": "refine", "input": "simclr", "epochs": 2},
        {"name": "ev", "kind": "evaluate", "input": "simclr"},
    ],
}


def _fp(stage_name: str, change=None) -> str:
    data = copy.deepcopy(BASE)
    if change:
        change(data)
    config = validate_config(data)
    return stage_fingerprint(config, config.stage(stage_name), data="d" * 16, upstream="u" * 16, evaluation="e" * 16)


def _stage(name):
    return lambda data: next(s for s in data["stages"] if s["name"] == name)


def _set(path: str, value):
    """A change: set `path` (section.key or stage.key) in the raw config."""
    head, key = path.split(".", 1)

    def change(data):
        target = data.setdefault(head, {}) if head in ("ray", "backbone", "data") else _stage(head)(data)
        target[key] = value
    return change


@pytest.mark.parametrize("stage,path,value", [
    ("simclr", "simclr.compile", True),
    ("simclr", "simclr.log_every_steps", 3),
    ("simclr", "simclr.checkpoint_every", 2),
    ("stml", "stml.log_every_steps", 7),
    ("ev", "ev.batch_size", 64),
    ("simclr", "ray.address", "ray://head:10001"),
    ("simclr", "ray.storage_path", "/elsewhere"),
    ("simclr", "ray.max_failures", 3),
    ("simclr", "ray.resources_per_worker", {"CPU": 4}),
    ("simclr", "ray.local_metrics", True),
    ("ev", "ray.num_workers", 4),  # an evaluate stage runs on the driver: workers do not change it
])
def test_execution_settings_keep_the_key(stage, path, value):
    assert _fp(stage, _set(path, value)) == _fp(stage)


@pytest.mark.parametrize("stage,path,value", [
    ("simclr", "simclr.epochs", 3),
    ("simclr", "simclr.batch_size", 128),
    ("simclr", "simclr.precision", "fp32"),
    ("simclr", "ray.num_workers", 4),  # the per-rank batch (and BatchNorm statistics) change
    ("stml", "ray.num_workers", 1),  # STML's neighbourhood batches are built per rank
    ("simclr", "ray.use_gpu", True),  # precision: auto picks bf16 on GPUs
    ("simclr", "backbone.image_size", 32),
    ("ev", "ev.knn_k", 5),
    ("ev", "ev.retrieval", True),
    ("ev", "ev.cluster_space", "umap"),
    ("ev", "ev.cluster_algorithm", "gmm"),
    ("ev", "ev.umap_components", 5),
    ("ev", "ev.umap_fit_sample", 5000),
])
def test_result_settings_change_the_key(stage, path, value):
    assert _fp(stage, _set(path, value)) != _fp(stage)


def test_seed_data_upstream_and_evaluation_split_change_the_key():
    config = validate_config(BASE)
    stage = config.stage("ev")
    base = dict(data="d" * 16, upstream="u" * 16, evaluation="e" * 16)
    fp = stage_fingerprint(config, stage, **base)
    for key in base:
        assert stage_fingerprint(config, stage, **{**base, key: "x" * 16}) != fp, key
    reseeded = validate_config({**BASE, "seed": 1})
    assert stage_fingerprint(reseeded, reseeded.stage("ev"), **base) != fp


def test_a_distillation_teachers_content_is_in_the_key(tmp_path):
    """New teacher weights at the same path must not reuse a stage distilled from the old ones."""
    import torch
    from safetensors.torch import save_file

    from pipeline.config import validate_config
    from pipeline.inputs import teacher_digest

    weights = tmp_path / "teacher.safetensors"
    save_file({"w": torch.zeros(3)}, str(weights))
    config = validate_config({"name": "d", "data": {"source": "digits"}, "stages": [
        {"name": "distill", "kind": "pretext", "method": "distill", "epochs": 1,
         "settings": {"teacher": {"name": "resnet18", "weights": str(weights)}}}]})
    stage = config.stage("distill")
    before = stage_fingerprint(config, stage, data="d" * 16, upstream=None, teacher=teacher_digest(stage))
    save_file({"w": torch.ones(3)}, str(weights))
    after = stage_fingerprint(config, stage, data="d" * 16, upstream=None, teacher=teacher_digest(stage))
    assert before != after and teacher_digest(config.stage("distill")) is not None
