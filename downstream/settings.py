"""Settings of the labeled training methods, validated when the config is read (pydantic only, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pretext.settings import MethodSettings


class FinetuneSettings(MethodSettings):
    """What the fine-tune method needs; a finetune stage fills it from its own keys (mode, label_smoothing, ...)
    and the runner adds the classes found in the labeled training images."""

    mode: Literal["linear", "full"] = "linear"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1.0)
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    num_classes: int | None = Field(None, ge=2, description="filled in by the runner from the labels")
    class_ids: list[int] | None = Field(None, description="dataset label of each output, filled in by the runner")
