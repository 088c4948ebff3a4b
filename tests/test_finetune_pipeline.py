"""Fine-tune stages end to end under Ray Train: a linear probe on a briefly SimCLR-pretrained backbone beats
the same probe on a random-init backbone, and a full fine-tune can start from a fine-tuned backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import validate_config

CONFIG = """
name: finetune_e2e
data: {source: digits, train_subset: 600, eval_subset: 300}
backbone: {name: test_resnet, small_image_stem: false, image_size: 16}
ray: {num_workers: 2}
stages:
  - name: simclr
    kind: pretext
    method: simclr
    epochs: 2
    batch_size: 64
    evaluate: false
    optimizer: {name: adamw, lr: 2.0e-3}
    settings: {temperature: 0.2, augment: {min_scale: 0.3, cj_strength: 0.5, gaussian_blur: 0.0}}
  - &probe
    name: probe_simclr
    kind: finetune
    mode: linear
    input: simclr
    epochs: 8
    batch_size: 128
    optimizer: {name: adamw, lr: 1.0e-2, weight_decay: 0.0}
  - {<<: *probe, name: probe_random, input: random}
  - name: full_from_probe
    kind: finetune
    mode: full
    input: probe_simclr
    label_fraction: 0.1
    label_smoothing: 0.1
    backbone_lr_scale: 0.1
    epochs: 1
    batch_size: 32
    augment: [{name: crop, scale: [0.6, 1.0]}, {name: mixup, alpha: 0.2}]
"""


@pytest.fixture(scope="module")
def finetune_run(ray_session, tmp_path_factory):
    from pipeline.runner import PipelineRun

    out = tmp_path_factory.mktemp("finetune")
    summary = PipelineRun(validate_config(yaml.safe_load(CONFIG)), out).run()
    return out, summary


def test_pretrained_probe_beats_random_init_probe(finetune_run):
    out, summary = finetune_run
    stages = json.loads((out / "summary.json").read_text())["stages"]
    pretrained, random_init = stages["probe_simclr"]["metrics"], stages["probe_random"]["metrics"]
    assert stages["probe_random"]["input"] == "random"
    for m in (pretrained, random_init):
        assert 0.0 <= m["accuracy"] <= m["top5_accuracy"] <= 1.0  # 10 classes: top-5 reported too
        assert m["labeled_images"] == 600
    assert pretrained["accuracy"] > random_init["accuracy"] + 0.05, (pretrained["accuracy"], random_init["accuracy"])


def test_linear_probe_leaves_backbone_untouched(finetune_run):
    from safetensors.torch import load_file

    out, summary = finetune_run
    arts = summary["stages"]
    before = load_file(str(Path(arts["simclr"]["artifacts"]["backbone"]) / "model.safetensors"))
    after = load_file(str(Path(arts["probe_simclr"]["artifacts"]["backbone"]) / "model.safetensors"))
    assert before.keys() == after.keys()
    for key in before:  # weights and BatchNorm statistics alike: frozen, in eval mode
        assert torch.equal(before[key], after[key]), key
    tuned = load_file(str(Path(arts["full_from_probe"]["artifacts"]["backbone"]) / "model.safetensors"))
    assert any(not torch.equal(after[k], tuned[k]) for k in after), "full fine-tuning did not change the backbone"


def test_classifier_artifact_reproduces_reported_accuracy(finetune_run):
    from pipeline.classifier import classifier_accuracy, load_classifier
    from pipeline.data import load_images

    out, summary = finetune_run
    stage = summary["stages"]["full_from_probe"]
    assert stage["input"] == "probe_simclr" and stage["metrics"]["labeled_images"] == 60  # 10% of 600, stratified
    path = stage["artifacts"]["classifier"]
    assert sorted(p.name for p in Path(path).iterdir()) == [
        "backbone.json", "classifier.json", "head.safetensors", "model.safetensors"]
    model, meta = load_classifier(path, with_meta=True)
    assert meta["classifier"]["mode"] == "full" and meta["classifier"]["class_ids"] == list(range(10))
    with torch.no_grad():
        assert model(torch.randn(4, 3, 16, 16)).shape == (4, 10)
    evalset = load_images("digits", "test", subset=300, seed=0)
    again = classifier_accuracy(path, evalset.images, evalset.labels)
    assert again["accuracy"] == pytest.approx(stage["metrics"]["accuracy"])


def test_train_accuracy_per_epoch_and_test_accuracy_in_mlflow(finetune_run):
    from mlflow.tracking import MlflowClient

    out, summary = finetune_run
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    run_id = summary["stages"]["probe_simclr"]["run_id"]
    history = sorted(client.get_metric_history(run_id, "train_accuracy"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 9))
    assert history[-1].value > history[0].value
    run = client.get_run(run_id)
    assert run.data.metrics["accuracy"] == pytest.approx(summary["stages"]["probe_simclr"]["metrics"]["accuracy"])
    assert run.data.params["mode"] == "linear" and run.data.params["label_fraction"] == "1.0"
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"backbone", "classifier"} <= names
