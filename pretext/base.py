"""The base class every pretext method implements.

A method wraps a backbone with whatever head and loss its objective needs. The training loop knows
nothing about the objective: it hands the method a batch of images and gets back a dict with a
`loss`. Everything a method needs beyond that (views, targets, momentum encoders) lives in its module.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import Tensor, nn

from pretext.settings import MethodSettings
from pretext.transforms import Normalize


def import_object(spec: str) -> Any:
    """The object named by ``"package.module:Name"`` (how the method and export registries name classes)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(f"expected 'package.module:Name', got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


def weight_decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: ``weight_decay`` on weight matrices and kernels (ndim > 1), none on biases and norm
    scales. Frozen parameters are left out, and so is a group that would be empty."""
    decay, no_decay = [], []
    for param in params:
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class Method(nn.Module):
    """One label-free objective around a backbone.

    Contract used by the pipeline's training loop:
      - `forward(images)` takes a float batch (B, C, H, W) in [0, 1] on the training device and returns
        `{"loss": scalar tensor, <metric name>: tensor or float, ...}`. The batch has the backbone's channel
        count (grayscale data is repeated to 3 channels for RGB backbones), or 3 when `requires_color`. Calling `forward` (not a helper)
        matters: under DDP only `forward` triggers gradient synchronisation.
      - `after_optimizer_step(progress)` runs after each optimizer step (momentum updates);
        `progress` goes from 0 to 1 over the whole stage.
      - `parameter_groups(weight_decay)` returns optimizer groups (no decay on norms and biases).
      - `backbone` is what the pipeline saves as the backbone artifact; `artifact_extras()` is saved next
        to it (e.g. a jigsaw permutation set).
    """

    name: ClassVar[str] = "base"
    settings_model: ClassVar[type[MethodSettings]] = MethodSettings
    # A method that needs colour input (colorization) sets this; the pipeline rejects grayscale data.
    requires_color: ClassVar[bool] = False
    # Channels the backbone takes; None means `backbone.in_chans` from the config (colorization: 1, the L channel).
    backbone_channels: ClassVar[int | None] = None
    # How evaluation turns an image batch into backbone input: "rgb" (channel match + normalize) or
    # "lab_l" (CIE L of the sRGB image, then normalize). Saved in the artifact.
    input_transform: ClassVar[str] = "rgb"
    # Labeled methods (downstream fine-tuning, metric learning) set this; the loop then calls
    # `forward(images, labels)` with an int64 label tensor for the batch.
    needs_labels: ClassVar[bool] = False
    # Methods that look up per-image state (SCAN's cached features) set this; the loop then passes `rows=`, the
    # int64 indices of the batch's images in the training split, to `forward` and `training_step`.
    wants_rows: bool = False  # a class default; distillation sets it per instance (targets: cached)

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        settings: MethodSettings,
        *,
        input_size: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(settings, self.settings_model):
            settings = self.settings_model.model_validate(settings)
        self.settings = settings
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.input_size = int(input_size)
        self.normalize = Normalize(mean, std)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    # -- helpers for subclasses -------------------------------------------------------------------
    def eval_view(self, images: Tensor) -> Tensor:
        """uint8 training rows as the exported backbone sees them, before normalization: [0, 1], the channels its
        first convolution takes (grayscale data, RGB backbone), resized and centre-cropped to the input size.
        For methods that embed training images themselves (SCAN's feature cache, NetVLAD's initialisation); the
        loop's batches get their channels from the loop."""
        from pretext.embeddings import match_channels
        from pretext.transforms import EvalTransform, to_float

        x = to_float(images)
        conv = next((m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)), None)
        return EvalTransform(self.input_size)(x if conv is None else match_channels(x, conv.in_channels))

    def encode(self, x: Tensor) -> Tensor:
        """Normalize a [0, 1] batch and return pooled backbone features (B, feature_dim)."""
        x = self.normalize(x).contiguous(memory_format=self.memory_format)
        return self.backbone(x)

    # -- contract --------------------------------------------------------------------------------
    def forward(self, images: Tensor, labels: Tensor | None = None, rows: Tensor | None = None) -> dict[str, Any]:
        extra = {"rows": rows} if self.wants_rows else {}
        if self.needs_labels:
            return self.training_step(images, labels, **extra)
        return self.training_step(images, **extra)

    def training_step(self, images: Tensor) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_optimizer_step(self, progress: float) -> None:
        """Hook for momentum/EMA updates; the default does nothing."""

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Weight decay on weight matrices and kernels only; biases and norm scales are left alone."""
        return weight_decay_groups(self.parameters(), weight_decay)

    def epoch_batches(
        self, images: Any, *, epoch: int, rank: int, world_size: int, batch_size: int, seed: int
    ) -> list | None:
        """This rank's batches for an epoch, as index arrays into `images` (uint8, N x C x H x W), or None
        for the default: a shuffled distributed sampler. STML uses it for nearest-neighbour batches; every
        rank must return the same number of batches so DDP stays in lockstep."""
        return None

    def set_train_labels(self, labels: Any) -> None:
        """Labeled methods receive the training labels (int64, one per image) once before training, e.g. to
        build class-balanced batches in `epoch_batches`. The default ignores them."""

    def export_module(self) -> tuple[nn.Module, dict[str, Any]]:
        """The module saved as the stage's artifact and JSON facts that rebuild it around the timm backbone.
        Default: the bare backbone. STML exports backbone + pooling + embedding head."""
        return self.backbone, {}

    def wants_sync_batchnorm(self) -> bool:
        """True to convert BatchNorm layers to SyncBatchNorm before DDP wrapping (MoCo's BN-leak guard)."""
        return False

    def input_normalization(self) -> tuple[list[float], list[float]]:
        """Mean/std applied to backbone input; saved in the artifact so evaluation does the same."""
        return self.normalize.mean.flatten().tolist(), self.normalize.std.flatten().tolist()

    @torch.no_grad()
    def heldout_report(self, images: Tensor, out_dir: Any) -> tuple[dict[str, float], dict[str, str]]:
        """Pretext quality on held-out images after training: (metrics, artifact paths).

        `images` is a float batch in [0, 1] with the channels `forward` receives; called in eval mode on
        the driver. Methods override it to report e.g. held-out pretext accuracy or colorization error.
        """
        return {}, {}

    def artifact_extras(self) -> dict[str, Any]:
        """JSON-serialisable facts saved with the backbone artifact (e.g. a permutation set)."""
        return {}
