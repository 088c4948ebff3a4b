"""Classifier artifacts of fine-tune stages: a backbone artifact folder plus a head.

A classifier folder holds the backbone artifact's `model.safetensors` + `backbone.json` (so
`load_backbone` reads it like any backbone) and the head's `head.safetensors` + `classifier.json`
(class count, the dataset label of every output, linear or full fine-tuning). Nothing is unpickled.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbones import META_FILE, WEIGHTS_FILE, BackboneError, load_backbone


def write_classifier(backbone_dir: str | os.PathLike, head_dir: str | os.PathLike) -> Path:
    """Complete a head folder written by the fine-tune method with the stage's backbone artifact."""
    head_dir = Path(head_dir)
    for name in (WEIGHTS_FILE, META_FILE):
        shutil.copy2(Path(backbone_dir) / name, head_dir / name)
    return head_dir


def load_classifier(directory: str | os.PathLike, *, with_meta: bool = False):
    """Backbone + head in eval mode (logits from a normalized batch); `with_meta` adds the merged metadata."""
    from downstream.finetune import attach_head

    path = Path(directory)
    backbone, meta = load_backbone(path, with_meta=True, bare=True)
    try:
        model, head_meta = attach_head(backbone, path)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise BackboneError(f"classifier artifact {path}: {err}") from None
    if head_meta["head"]["feature_dim"] != meta["feature_dim"]:
        raise BackboneError(f"classifier artifact {path}: head takes {head_meta['head']['feature_dim']} features, "
                            f"backbone gives {meta['feature_dim']}")
    merged = {**meta, "classifier": head_meta}
    return (model, merged) if with_meta else model


def classifier_accuracy(directory: str | os.PathLike, images: np.ndarray, labels: np.ndarray,
                        batch_size: int = 512) -> dict[str, float]:
    """`accuracy` (top-1) of a classifier artifact on labeled images, and `top5_accuracy` past 5 classes."""
    from downstream.finetune import predict_logits, topk_accuracy

    model, meta = load_classifier(directory, with_meta=True)
    logits = predict_logits(model, images, input_size=meta["input_size"], mean=meta["mean"], std=meta["std"],
                            in_chans=meta["in_chans"], input_transform=meta.get("input_transform", "rgb"),
                            batch_size=batch_size)
    class_ids = meta["classifier"]["class_ids"]
    out: dict[str, Any] = {"accuracy": topk_accuracy(logits, labels, class_ids, k=1)}
    if len(class_ids) > 5:
        out["top5_accuracy"] = topk_accuracy(logits, labels, class_ids, k=5)
    return out
