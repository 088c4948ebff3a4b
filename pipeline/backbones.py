"""Backbones by timm name, and the backbone artifact: safetensors weights + JSON metadata.

An artifact folder holds `model.safetensors` (the backbone's state dict) and `backbone.json`
(everything needed to rebuild the module: timm name and kwargs, stem option, channels, input size,
normalization, feature dimension, and the fingerprints of the stage and data that produced it).
Loading rebuilds the module from the JSON and reads tensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from pipeline.store import move_dir_into_place

ARTIFACT_FORMAT = "sslpipe.backbone/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalization of ImageNet weights (timm's pretrained_cfg default)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "model.safetensors"
META_FILE = "backbone.json"

# `export` kind in an artifact's metadata -> "module:function" that rebuilds the exported module (backbone +
# pooling + embedding head) around a freshly built backbone.
EXPORTED_MODULES: dict[str, str] = {
    "stml_embedder": "pretext.stml:rebuild_exported",
    "metric_embedder": "downstream.metric:rebuild_exported",
    "scan_clusterer": "downstream.scan:rebuild_exported",
}


class BackboneError(Exception):
    """A backbone that cannot be built or an artifact that cannot be loaded (CLI exit code 2)."""


def _apply_small_image_stem(model: nn.Module, name: str, stride: int = 1) -> None:
    """Replace a ResNet-style 7x7/2 conv + max-pool stem by one 3x3 conv: 28-64 px images keep their detail.

    stride 1 is the CIFAR-style stem; stride 2 keeps a quarter of the activations (about 3x faster on CPUs).
    """
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and hasattr(model, "maxpool"):
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride, 1, bias=False)
        model.maxpool = nn.Identity()
        return
    raise BackboneError(
        f"backbone.small_image_stem is supported for ResNet-style timm models (conv1 + maxpool); "
        f"'{name}' has no such stem: set backbone.small_image_stem: false (and pass img_size in kwargs if it needs one)"
    )


def create_timm_model(name: str, *, in_chans: int = 3, kwargs: dict[str, Any] | None = None,
                      key: str = "backbone") -> nn.Module:
    """timm.create_model without classifier and never with downloaded weights; an unknown name or kwargs it
    refuses is a BackboneError that names the config `key` (`backbone`, `settings.teacher`)."""
    import timm

    kwargs = {k: v for k, v in (kwargs or {}).items() if k not in ("pretrained", "num_classes", "in_chans")}
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise BackboneError(f"{key}.name: unknown timm model '{name}' (see timm.list_models())") from None
        raise BackboneError(f"{key}: '{name}' could not be built: {err}") from None
    except TypeError as err:
        raise BackboneError(f"{key}.kwargs not accepted by '{name}': {err}") from None


def build_backbone(
    name: str,
    *,
    small_image_stem: bool = False,
    stem_stride: int = 1,
    in_chans: int = 3,
    kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, int]:
    """A timm model without classifier (`num_classes=0`), never with downloaded weights.

    Returns the module and its pooled feature dimension.
    """
    model = create_timm_model(name, in_chans=in_chans, kwargs=kwargs)
    if small_image_stem:
        _apply_small_image_stem(model, name, stem_stride)
    feature_dim = int(getattr(model, "num_features", 0))
    if feature_dim <= 0:
        raise BackboneError(f"backbone '{name}' does not report num_features")
    return model, feature_dim


def save_backbone(
    directory: str | os.PathLike,
    module: nn.Module,
    *,
    name: str,
    small_image_stem: bool,
    in_chans: int,
    kwargs: dict[str, Any],
    stem_stride: int = 1,
    feature_dim: int,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write an artifact atomically: a temp folder beside the target, renamed into place."""
    from safetensors.torch import save_file

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": ARTIFACT_FORMAT})
        meta = {
            "format": ARTIFACT_FORMAT,
            "timm_name": name,
            "timm_kwargs": kwargs,
            "small_image_stem": bool(small_image_stem),
            "stem_stride": int(stem_stride),
            "in_chans": int(in_chans),
            "feature_dim": int(feature_dim),
            "input_size": int(input_size),
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(provenance or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        move_dir_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_backbone_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise BackboneError(f"not a backbone artifact: {path} has no {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BackboneError(f"{meta_path}: unreadable metadata ({err})") from None
    if meta.get("format") != ARTIFACT_FORMAT:
        raise BackboneError(f"{meta_path}: unsupported format {meta.get('format')!r}, expected {ARTIFACT_FORMAT}")
    return meta


def load_backbone(directory: str | os.PathLike, *, with_meta: bool = False, bare: bool = False,
                  pooling: str = "avg"):
    """Rebuild the backbone from `backbone.json` and load `model.safetensors` (no pickle).

    Artifacts of refine stages carry an embedding head (`export` in the metadata): the returned module
    is then backbone + pooling + head, which is what retrieval and clustering use. `bare=True` returns
    just the timm backbone, e.g. to train it further; with `pooling="gem"` that backbone's last feature map
    is pooled by GeM (p = 3, fixed) instead of its own global pooling (evaluate stages' `pooling`).
    """
    if pooling not in ("avg", "gem"):
        raise ValueError(f"load_backbone: pooling must be 'avg' or 'gem', got {pooling!r}")
    if pooling == "gem" and not bare:
        raise ValueError("load_backbone: pooling 'gem' replaces the backbone's own pooling; it needs bare=True")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    meta = read_backbone_meta(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BackboneError(f"backbone artifact {path} has no {WEIGHTS_FILE}")
    model, _ = build_backbone(
        meta["timm_name"],
        small_image_stem=meta["small_image_stem"],
        stem_stride=meta.get("stem_stride", 1),
        in_chans=meta["in_chans"],
        kwargs=meta.get("timm_kwargs") or {},
    )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise BackboneError(f"{weights}: corrupted or unreadable safetensors file ({err})") from None
    module = model
    if meta.get("export"):
        if meta["export"] not in EXPORTED_MODULES:
            raise BackboneError(f"{path}: unknown exported module kind {meta['export']!r}")
        from pretext.base import import_object

        rebuild_exported = import_object(EXPORTED_MODULES[meta["export"]])
        module = rebuild_exported(model, meta)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise BackboneError(f"{weights} does not match architecture '{meta['timm_name']}': {first}") from None
    module = model if bare else module
    if pooling == "gem":
        from pretext.pooling import GeM, PooledBackbone

        module = PooledBackbone(model, GeM(3.0, learnable=False), meta["feature_dim"])
    module.eval()
    return (module, meta) if with_meta else module


def embed_with(model, meta: dict, images, batch_size: int, **options) -> np.ndarray:
    """Embeddings of `images` by a loaded artifact's module, preprocessed as its metadata `meta` says;
    `options` go to pretext.embeddings.embed_images (device, precision)."""
    from pretext.embeddings import embed_images

    return embed_images(model, images, input_size=meta["input_size"], mean=meta["mean"], std=meta["std"],
                        in_chans=meta["in_chans"], input_transform=meta.get("input_transform", "rgb"),
                        batch_size=batch_size, **options)
