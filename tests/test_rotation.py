"""RotNet: four rotations per image, labels in order, registry, artifact round trip, and that it learns.

The learning test trains a tiny timm ResNet ("test_resnet", 0.4 M parameters) for a few seconds on a
Fashion-MNIST subset and checks pretext accuracy on held-out (test split) images against chance (0.25).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import require_fashion_mnist
from pipeline.backbones import build_backbone, load_backbone, save_backbone
from pretext import build_method
from pretext.rotation import RotationPrediction, rotate_all
from pretext.settings import RotationSettings

BACKBONE = "test_resnet"  # tiny ResNet shipped with timm for tests; same code path as resnet18


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _method(input_size=32, **settings) -> RotationPrediction:
    torch.manual_seed(0)
    backbone, dim = build_backbone(BACKBONE)
    return build_method("rotation", backbone, dim, settings, input_size=input_size)


def test_rotate_all_labels_match_rot90():
    x = torch.rand(3, 2, 5, 5)
    rotated, labels = rotate_all(x)
    assert rotated.shape == (12, 2, 5, 5)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for i in range(12):
        k, b = int(labels[i]), i % 3
        assert torch.equal(rotated[i], torch.rot90(x[b], k, dims=(1, 2)))
    # A quarter turn counter-clockwise moves the top-right corner to the top-left.
    assert rotated[3, 0, 0, 0] == x[0, 0, 0, -1]
    with pytest.raises(ValueError, match="square"):
        rotate_all(torch.rand(1, 1, 4, 5))


def test_registry_builds_it_with_validated_settings():
    method = _method(head_hidden_dim=64, min_scale=0.7)
    assert isinstance(method, RotationPrediction) and isinstance(method.settings, RotationSettings)
    assert method.settings.head_hidden_dim == 64 and method.augment.min_scale == 0.7
    assert method.augment.cj_prob == 0 and method.augment.random_gray_scale == 0 and method.augment.gaussian_blur == 0
    linear = _method()
    assert isinstance(linear.head, torch.nn.Linear) and linear.head.out_features == 4
    with pytest.raises(ValueError, match="unknown key"):
        _method(head_hidden=3)


def test_training_step_output_and_gradients():
    method = _method(input_size=24)
    out = method(torch.rand(4, 3, 28, 28))
    assert set(out) == {"loss", "accuracy"}
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert not out["accuracy"].requires_grad and 0.0 <= float(out["accuracy"]) <= 1.0
    out["loss"].backward()
    assert all(p.grad is not None for p in method.head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())


def test_learns_rotations_of_held_out_fashion_mnist(tmp_path):
    require_fashion_mnist()
    from pipeline.data import load_images

    train = load_images("fashion-mnist", "train", subset=2000, seed=0, log=lambda _: None)
    test = load_images("fashion-mnist", "test", subset=400, seed=0, log=lambda _: None)
    method = _method(input_size=32)
    images = torch.from_numpy(train.images)
    held_out = torch.from_numpy(test.images).expand(-1, 3, -1, -1)  # grayscale -> RGB, as the pipeline does

    before = method.predict_rotation_accuracy(held_out[:100])
    steps = 80
    optimizer = torch.optim.AdamW(method.parameters(), lr=3e-3, weight_decay=1e-4)
    # Decaying the rate settles the weights, so eval-mode batch-norm statistics match them.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    generator = torch.Generator().manual_seed(0)
    method.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (32,), generator=generator)
        x = images[idx].float().div(255.0).expand(-1, 3, -1, -1)
        loss = method(x)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    assert method.training  # predict_rotation_accuracy restores the mode
    after = method.predict_rotation_accuracy(held_out)
    print(f"held-out rotation accuracy: {before:.3f} before (100 images), {after:.3f} after {steps} steps (chance 0.25)")
    assert after > 0.6, f"held-out rotation accuracy {after:.3f} (chance 0.25; before training {before:.3f})"
    few = held_out[:64]
    expected = method.predict_rotation_accuracy(few)
    assert method.predict_rotation_accuracy(few.numpy()) == expected  # deterministic, accepts numpy
    assert method.heldout_report(few.float() / 255.0, tmp_path) == ({"pretext_accuracy": expected}, {})

    # The trained backbone is what the pipeline saves: a round trip gives identical features.
    backbone = method.backbone.eval()
    path = save_backbone(tmp_path / "bb", backbone, name=BACKBONE, small_image_stem=False, in_chans=3, kwargs={},
                         feature_dim=method.feature_dim, input_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    loaded = load_backbone(path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x), loaded(x))


def test_grayscale_backbone_input():
    """One-channel batches (backbone in_chans=1) work as well."""
    torch.manual_seed(0)
    backbone, dim = build_backbone(BACKBONE, in_chans=1)
    method = build_method("rotation", backbone, dim, {}, input_size=16, mean=[0.5], std=[0.5])
    out = method(torch.rand(2, 1, 20, 20))
    assert torch.isfinite(out["loss"])
    acc = method.predict_rotation_accuracy((np.random.default_rng(0).random((3, 1, 16, 16)) * 255).astype(np.uint8))
    assert 0.0 <= acc <= 1.0
