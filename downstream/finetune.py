"""Fine-tuning a backbone on labeled images: a linear probe or full fine-tuning, cross-entropy on a head.

`Finetune` is a labeled training method (same contract as `pretext.base.Method`, `needs_labels = True`):
the Ray Train worker loop hands it images and labels. `mode: linear` freezes the backbone (eval mode,
no gradients, so BatchNorm statistics stay those of the input backbone and DDP only syncs the head);
`mode: full` trains everything, the backbone at `backbone_lr_scale` times the stage's learning rate.
Labels may be class indices or soft targets (mixup/cutmix).

After training the runner asks the method for its held-out report; the method writes the classifier
head there (`head.safetensors` + `classifier.json`) next to a copy of the backbone artifact, so a
classifier folder is a backbone artifact plus a head (see `pipeline.classifier.load_classifier`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downstream.sampling import stratified_sample
from downstream.settings import FinetuneSettings
from pretext.base import Method, weight_decay_groups
from pretext.embeddings import prepare_batch

CLASSIFIER_FORMAT = "sslpipe.classifier/1"
HEAD_FILE = "head.safetensors"
CLASSIFIER_META = "classifier.json"


def stratified_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified `fraction` of `labels`, at least one image per class.

    Each class keeps round(fraction * its count) images (min 1), so rare classes are not dropped and
    the class balance of the labeled subset follows the full set.
    """
    labels = np.asarray(labels)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must lie in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(len(labels))
    return stratified_sample(labels, seed=seed, fraction=fraction, min_per_class=1)


class ClassifierHead(nn.Sequential):
    """Dropout (optional) + linear layer on pooled backbone features."""

    def __init__(self, feature_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        super().__init__(*layers, nn.Linear(feature_dim, num_classes))


class Classifier(nn.Module):
    """Backbone + head: a normalized batch at the backbone's input size -> logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class Finetune(Method):
    name = "finetune"
    settings_model = FinetuneSettings
    needs_labels = True

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: Any, **kwargs: Any) -> None:
        super().__init__(backbone, feature_dim, settings, **kwargs)
        s: FinetuneSettings = self.settings
        if not s.num_classes:
            raise ValueError("finetune: settings.num_classes is not set (the runner fills it in from the labels)")
        self.num_classes = s.num_classes
        self.linear = s.mode == "linear"
        self.head = ClassifierHead(self.feature_dim, s.num_classes, s.head_dropout)
        if self.linear:
            # Frozen parameters take no part in DDP's gradient sync, so no unused-parameter errors.
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "Finetune":
        """The loop calls train() every epoch; a linear probe keeps its backbone (BatchNorm) in eval mode."""
        super().train(mode)
        if self.linear:
            self.backbone.eval()
        return self

    def features(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        if self.linear:
            with torch.no_grad():
                return self.encode(images)
        return self.encode(images)

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    def training_step(self, images: Tensor, labels: Tensor) -> dict[str, Any]:
        logits = self.logits(images).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.settings.label_smoothing)
        hard = labels if labels.ndim == 1 else labels.argmax(dim=1)
        accuracy = (logits.detach().argmax(dim=1) == hard).float().mean()
        return {"loss": loss, "train_accuracy": accuracy}

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Head at the stage's rate; in full mode the backbone at `backbone_lr_scale` of it (`lr_scale`)."""
        groups = weight_decay_groups(self.head.parameters(), weight_decay)
        if not self.linear:
            scale = self.settings.backbone_lr_scale
            groups += [{**g, "lr_scale": scale} for g in weight_decay_groups(self.backbone.parameters(), weight_decay)]
        return groups

    def classifier(self) -> Classifier:
        return Classifier(self.backbone, self.head)

    @torch.no_grad()
    def heldout_report(self, images: Tensor, out_dir: Any) -> tuple[dict[str, float], dict[str, str]]:
        """Writes the head (the runner adds the backbone artifact beside it) and returns its folder."""
        target = Path(out_dir) / "classifier"
        save_head(target, self.head, num_classes=self.num_classes, class_ids=self.settings.class_ids,
                  mode=self.settings.mode, dropout=self.settings.head_dropout, feature_dim=self.feature_dim)
        return {}, {"classifier": str(target)}


# -- classifier artifact ------------------------------------------------------------------------------
def save_head(directory: str | Path, head: nn.Module, *, num_classes: int, class_ids: Sequence[int] | None,
              mode: str, dropout: float, feature_dim: int) -> Path:
    """`head.safetensors` + `classifier.json` (what rebuilds the head and maps outputs to dataset labels)."""
    from safetensors.torch import save_file

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(target / HEAD_FILE), metadata={"format": CLASSIFIER_FORMAT})
    meta = {
        "format": CLASSIFIER_FORMAT,
        "num_classes": int(num_classes),
        "class_ids": [int(c) for c in (class_ids if class_ids is not None else range(num_classes))],
        "mode": mode,
        "head": {"type": "linear", "feature_dim": int(feature_dim), "dropout": float(dropout)},
    }
    (target / CLASSIFIER_META).write_text(json.dumps(meta, indent=2))
    return target


def read_head_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CLASSIFIER_META
    if not path.is_file():
        raise FileNotFoundError(f"not a classifier artifact: {Path(directory)} has no {CLASSIFIER_META}")
    meta = json.loads(path.read_text())
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r}, expected {CLASSIFIER_FORMAT}")
    return meta


def attach_head(backbone: nn.Module, directory: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """The classifier from a bare backbone and the head saved in `directory` (safetensors only, no pickle)."""
    from safetensors.torch import load_file

    meta = read_head_meta(directory)
    head = ClassifierHead(meta["head"]["feature_dim"], meta["num_classes"], meta["head"]["dropout"])
    head.load_state_dict(load_file(str(Path(directory) / HEAD_FILE)), strict=True)
    model = Classifier(backbone, head)
    model.eval()
    return model, meta


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, *, input_size: int, mean: Sequence[float],
                   std: Sequence[float], in_chans: int, input_transform: str = "rgb", batch_size: int = 512,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """Logits (N, num_classes) float32 of uint8 images (N, C, H, W), with the evaluation transform."""
    model.eval().to(device)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start:start + batch_size], copy=True)).to(device)
        x = prepare_batch(batch, input_size=input_size, mean=mean, std=std, in_chans=in_chans,
                          input_transform=input_transform)
        out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, class_ids: Sequence[int], k: int = 1) -> float:
    """Share of images whose dataset label is among the k best outputs; labels the head never saw count as wrong."""
    class_ids = np.asarray(class_ids)
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((class_ids[top] == np.asarray(labels)[:, None]).any(axis=1).mean())
