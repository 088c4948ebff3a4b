"""Fine-tune method, labeled-fraction selection, classifier artifacts and augmentation policies (no Ray)."""

from __future__ import annotations

import subprocess
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from downstream.finetune import Finetune, stratified_fraction, topk_accuracy
from pipeline.backbones import build_backbone, save_backbone

BACKBONE = "test_resnet"  # timm's tiny ResNet: same code path as resnet18, a fraction of the cost


def make_method(mode: str = "linear", **settings):
    backbone, dim = build_backbone(BACKBONE, small_image_stem=False)
    cfg = {"mode": mode, "num_classes": 4, "class_ids": [3, 5, 7, 9], **settings}
    return Finetune(backbone, dim, cfg, input_size=16)


# -- labeled fraction ---------------------------------------------------------------------------------
def test_stratified_fraction_keeps_class_balance_and_at_least_one_per_class():
    labels = np.array([0] * 500 + [1] * 300 + [2] * 5)
    picked = stratified_fraction(labels, 0.1, seed=0)
    counts = np.bincount(labels[picked], minlength=3)
    assert counts.tolist() == [50, 30, 1]  # round(0.1 * n), and the rare class keeps one image
    assert len(np.unique(picked)) == len(picked) and np.all(np.diff(picked) > 0)
    np.testing.assert_array_equal(picked, stratified_fraction(labels, 0.1, seed=0))
    assert not np.array_equal(picked, stratified_fraction(labels, 0.1, seed=1))
    one_percent = stratified_fraction(labels, 0.01, seed=0)
    assert np.bincount(labels[one_percent], minlength=3).tolist() == [5, 3, 1]
    np.testing.assert_array_equal(stratified_fraction(labels, 1.0, seed=0), np.arange(len(labels)))
    with pytest.raises(ValueError, match="label_fraction"):
        stratified_fraction(labels, 0.0, seed=0)


# -- the method ---------------------------------------------------------------------------------------
def test_label_smoothing_passes_through_to_the_loss():
    from pipeline.config import validate_config

    stage = validate_config({
        "data": {"source": "digits"},
        "stages": [{"name": "ft", "kind": "finetune", "epochs": 1, "label_smoothing": 0.3}],
    }).stages[0]
    settings = stage.method_settings(4, [3, 5, 7, 9])
    assert settings["label_smoothing"] == 0.3 and settings["num_classes"] == 4
    backbone, dim = build_backbone(BACKBONE, small_image_stem=False)
    method = Finetune(backbone, dim, settings, input_size=16).eval()
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    with torch.no_grad():
        logits = method.logits(x)
        loss = method(x, y)["loss"]
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.3).item(), rel=1e-5)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_linear_mode_freezes_backbone_and_keeps_it_in_eval_mode():
    method = make_method("linear")
    method.train()
    assert not method.backbone.training and method.head.training
    assert not any(p.requires_grad for p in method.backbone.parameters())
    trainable = {id(p) for g in method.parameter_groups(1e-4) for p in g["params"]}
    assert trainable == {id(p) for p in method.head.parameters()}
    x, y = torch.rand(6, 3, 16, 16), torch.randint(0, 4, (6,))
    out = method(x, y)
    out["loss"].backward()
    assert all(p.grad is None for p in method.backbone.parameters())
    assert method.head[-1].weight.grad is not None
    assert 0.0 <= float(out["train_accuracy"]) <= 1.0


def test_full_mode_trains_backbone_at_scaled_learning_rate():
    from pipeline.trainer import build_optimizer

    method = make_method("full", backbone_lr_scale=0.1)
    method.train()
    assert method.backbone.training
    optimizer = build_optimizer(method.parameter_groups(1e-4), {"name": "adamw", "lr": 0.01, "momentum": 0.9})
    head_ids = {id(p) for p in method.head.parameters()}
    rates = {("head" if id(g["params"][0]) in head_ids else "backbone"): g["lr"] for g in optimizer.param_groups}
    assert rates == {"head": 0.01, "backbone": pytest.approx(0.001)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(method.parameters()))


def test_soft_targets_from_mixup_train_and_score_by_argmax():
    from downstream.augment import build_augment

    method = make_method("full")
    _, mix = build_augment([{"name": "mixup", "alpha": 0.4}], num_classes=4)
    x, y = mix(torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,)))
    assert y.shape == (8, 4) and torch.allclose(y.sum(1), torch.ones(8))
    out = method(x, y)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters() if p.requires_grad)
    # Scoring: a prediction is right when it is the argmax of the soft target. Targets built from the model's
    # own predictions: rows 0-3 put their largest weight (0.55) on the predicted class, rows 4-7 on the next
    # class, the rest spread evenly (0.15 each), so the accuracy is exactly 1/2.
    with torch.no_grad():
        predicted = method.logits(x).argmax(dim=1)
    target = torch.full((8, 4), 0.15)
    rows = torch.arange(8)
    target[rows, torch.where(rows < 4, predicted, (predicted + 1) % 4)] = 0.55
    assert float(method(x, target)["train_accuracy"]) == 0.5


def test_topk_accuracy_maps_outputs_to_dataset_labels():
    logits = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    class_ids = [3, 5, 7]
    labels = np.array([3, 5, 8])  # 8 was never a training class: always wrong
    assert topk_accuracy(logits, labels, class_ids, k=1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, class_ids, k=2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, np.array([3, 5, 5]), class_ids, k=2) == pytest.approx(1.0)


# -- classifier artifact ------------------------------------------------------------------------------
def test_classifier_artifact_round_trips_without_pickle(tmp_path):
    from pipeline.classifier import classifier_accuracy, load_classifier, write_classifier

    method = make_method("full", head_dropout=0.2)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.01 * torch.randn_like(p))
    method.eval()
    save_backbone(tmp_path / "backbone", method.backbone, name=BACKBONE, small_image_stem=False, in_chans=3,
                  kwargs={}, feature_dim=method.feature_dim, input_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    _, artifacts = method.heldout_report(torch.rand(2, 3, 16, 16), tmp_path)
    path = write_classifier(tmp_path / "backbone", artifacts["classifier"])
    assert sorted(p.suffix for p in path.iterdir()) == [".json", ".json", ".safetensors", ".safetensors"]
    model, meta = load_classifier(path, with_meta=True)
    assert meta["classifier"]["class_ids"] == [3, 5, 7, 9] and meta["classifier"]["mode"] == "full"
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), method.classifier()(x).numpy(), rtol=1e-5, atol=1e-6)
    images = np.random.default_rng(0).integers(0, 256, (20, 1, 16, 16), dtype=np.uint8)
    predicted = method.logits((torch.from_numpy(images).float() / 255).expand(-1, 3, -1, -1)
                              .sub(0.5).div(0.25).mul(method.normalize.std).add(method.normalize.mean))
    labels = np.array([3, 5, 7, 9])[predicted.argmax(1).detach().numpy()]
    assert classifier_accuracy(path, images, labels)["accuracy"] == pytest.approx(1.0)
    assert "top5_accuracy" not in classifier_accuracy(path, images, labels)  # only 4 classes


def test_classifier_without_head_is_a_clear_error(tmp_path):
    from pipeline.backbones import BackboneError
    from pipeline.classifier import load_classifier

    backbone, dim = build_backbone(BACKBONE, small_image_stem=False)
    save_backbone(tmp_path / "bb", backbone, name=BACKBONE, small_image_stem=False, in_chans=3, kwargs={},
                  feature_dim=dim, input_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(BackboneError, match="classifier.json"):
        load_classifier(tmp_path / "bb")


# -- augmentation policies ----------------------------------------------------------------------------
def test_policy_list_builds_and_changes_images_per_image():
    from downstream.augment import build_augment

    policies = [{"name": "crop", "scale": [0.3, 0.6]}, {"name": "flip"}, {"name": "randaugment", "num_ops": 2},
                {"name": "random_erasing", "p": 1.0}, {"name": "mixup", "alpha": 0.2}]
    image_aug, mix = build_augment(policies, num_classes=10)
    torch.manual_seed(0)
    one = torch.randint(0, 256, (1, 3, 20, 20), dtype=torch.uint8)
    batch = one.repeat(8, 1, 1, 1)
    out = image_aug(batch)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert not torch.equal(out, batch)
    # identical inputs, different outputs: every image draws its own parameters
    assert len({tuple(img.flatten().tolist()) for img in out}) == 8
    mixed, soft = mix(out.float() / 255, torch.arange(8))
    assert soft.shape == (8, 10)


@pytest.mark.parametrize("channels", [1, 3])
def test_every_per_image_policy_builds_on_uint8(channels):
    from downstream.augment import build_augment
    from downstream.policies import BATCH_POLICIES, POLICIES

    torch.manual_seed(0)
    batch = torch.randint(0, 256, (4, channels, 16, 16), dtype=torch.uint8)
    changed = []
    for name in POLICIES:
        if name in BATCH_POLICIES:
            continue
        params = {"p": 1.0} if "p" in POLICIES[name].model_fields else {}
        image_aug, _ = build_augment([{"name": name, **params}])
        out = image_aug(batch)
        assert out.shape == batch.shape and out.dtype == torch.uint8, name
        changed.append(not torch.equal(out, batch))
    assert sum(changed) >= len(changed) - 1  # at most one policy may happen to draw the identity here


def test_policy_validation_errors_name_the_entry():
    from downstream.policies import PolicyError, validate_policies

    assert validate_policies(["flip"], allow_batch=False)[0] == {"name": "flip", "p": 0.5, "vertical": False}
    with pytest.raises(PolicyError, match=r"augment\[1\]\.name: unknown augmentation 'flop'.*known: flip, crop"):
        validate_policies([{"name": "crop"}, {"name": "flop"}], allow_batch=True)
    with pytest.raises(PolicyError, match=r"augment\[0\] \(randaugment\): unknown key 'ops'"):
        validate_policies([{"name": "randaugment", "ops": 2}], allow_batch=True)
    with pytest.raises(PolicyError, match=r"augment\[0\]\.name: 'cutmix' mixes labels"):
        validate_policies([{"name": "cutmix"}], allow_batch=False)
    with pytest.raises(PolicyError, match=r"augment\[0\]\.kernel_size|kernel_size must be odd"):
        validate_policies([{"name": "gaussian_blur", "kernel_size": 4}], allow_batch=True)


CLI_CONFIG = textwrap.dedent(
    """
    name: augment_errors
    data: {source: digits}
    stages:
      - {name: simclr, kind: pretext, method: simclr, epochs: 1, augment: [{name: flip}]}
      - {name: probe, kind: finetune, input: simclr, epochs: 1, augment: [{name: crop}, {name: randaugment}]}
    """
)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("stages.probe.augment=[{name: crop}, {name: sharpen}]",
         "stages[probe].augment[1].name: unknown augmentation 'sharpen' (known: flip, crop, affine, rotation"),
        ("stages.probe.augment=[{name: crop, zoom: 2}]", "stages[probe].augment[0] (crop): unknown key 'zoom'"),
        ("stages.simclr.augment=[{name: mixup}]", "stages[simclr].augment[0].name: 'mixup' mixes labels"),
        ("stages.probe.mode=frozen", "stages[probe].mode"),
        ("stages.probe.label_fraction=0", "stages[probe].label_fraction"),
    ],
)
def test_bad_augment_or_finetune_keys_exit_2_through_the_cli(tmp_path, sslpipe_cmd, override, expected):
    config = tmp_path / "c.yaml"
    config.write_text(CLI_CONFIG)
    ok = subprocess.run(sslpipe_cmd + ["check", str(config)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(sslpipe_cmd + ["run", str(config), "--set", override, "--output-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2, bad.stderr
    assert expected in bad.stderr
    assert not (tmp_path / "out" / "mlflow.db").exists()
