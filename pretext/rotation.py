"""RotNet (Gidaris et al. 2018): predict which of four rotations (0, 90, 180, 270 degrees) an image shows.

Recognising the rotation of an object needs a notion of its canonical pose, so the backbone learns shapes
and parts without labels. Every image of the batch is shown in all four rotations in the same step, as
the paper recommends: the four copies share their content, so the loss can only be lowered by reading
orientation, and the batch statistics are balanced over the four classes.

The light crop/flip augmentation before rotating keeps the classifier from memorising images; colour
jitter, grayscale and blur are off because they say nothing about orientation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretext.base import Method
from pretext.settings import RotationSettings
from pretext.transforms import EvalTransform, SimCLRAugment, to_float

NUM_ROTATIONS = 4


def rotate_all(images: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) -> the 4B images [all k=0, all k=1, all k=2, all k=3] and their labels k.

    Counter-clockwise quarter turns (torch.rot90 over H, W); H must equal W for the copies to stack.
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation prediction needs square images, got {tuple(images.shape[-2:])}")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)], dim=0)
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


def _head(feature_dim: int, hidden_dim: int, num_classes: int) -> nn.Module:
    """Linear probe-like head (the paper's point is that the backbone does the work), or one hidden layer."""
    if hidden_dim <= 0:
        return nn.Linear(feature_dim, num_classes)
    return nn.Sequential(
        nn.Linear(feature_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, num_classes),
    )


class RotationPrediction(Method):
    name = "rotation"
    settings_model = RotationSettings

    def __init__(self, backbone, feature_dim, settings, **kwargs: Any) -> None:
        super().__init__(backbone, feature_dim, settings, **kwargs)
        s: RotationSettings = self.settings
        self.augment = SimCLRAugment(
            input_size=self.input_size,
            min_scale=s.min_scale,
            hf_prob=s.hf_prob,
            cj_prob=0.0,
            random_gray_scale=0.0,
            gaussian_blur=0.0,
        )
        self.resize = EvalTransform(self.input_size)
        self.head = _head(self.feature_dim, s.head_hidden_dim, NUM_ROTATIONS)

    def logits(self, images: Tensor) -> Tensor:
        """Rotation logits (N, 4) of images already at input size, in [0, 1]."""
        return self.head(self.encode(images)).float()

    def training_step(self, images: Tensor) -> dict[str, Any]:
        with torch.no_grad():
            views = self.augment(to_float(images))
            rotated, labels = rotate_all(views)
        logits = self.logits(rotated)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    @torch.no_grad()
    def predict_rotation_accuracy(self, images: Tensor | np.ndarray, batch_size: int = 256) -> float:
        """Pretext accuracy over all four rotations of held-out images (eval mode, resize only).

        `images` are uint8 or [0, 1] float (N, C, H, W) with the channels the backbone takes.
        The module's train/eval mode is restored afterwards.
        """
        images = torch.as_tensor(images)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            correct, total = 0, 0
            for start in range(0, len(images), batch_size):
                x = self.resize(images[start : start + batch_size].to(device))
                rotated, labels = rotate_all(x)
                pred = self.logits(rotated).argmax(dim=1)
                correct += int((pred == labels).sum())
                total += int(labels.numel())
        finally:
            self.train(was_training)
        if total == 0:
            raise ValueError("predict_rotation_accuracy needs at least one image")
        return correct / total

    def heldout_report(self, images: Tensor, out_dir: Any) -> tuple[dict[str, float], dict[str, str]]:
        """Rotation accuracy on held-out images (chance 0.25), logged as `heldout_pretext_accuracy`."""
        return {"pretext_accuracy": self.predict_rotation_accuracy(images)}, {}
