"""Settings of the labeled training methods, validated when the config is read (pydantic only, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pretext.settings import AugmentSettings, MethodSettings, StrictSettings

LossName = Literal["contrastive", "triplet", "margin", "multi_similarity", "quadruplet"]
MinerName = Literal["none", "all", "semihard", "hard", "distance_weighted", "multi_similarity"]

# loss -> the miners that make sense with it; the first one is the default.
LOSS_MINERS: dict[str, tuple[str, ...]] = {
    "contrastive": ("none", "multi_similarity"),
    "triplet": ("semihard", "hard", "all"),
    "margin": ("distance_weighted", "none"),
    "multi_similarity": ("multi_similarity", "none"),
    "quadruplet": ("hard",),
}


class EmbeddingExpansionSettings(StrictSettings):
    """Embedding Expansion (Ko & Gu, CVPR 2020): synthetic points between the two embeddings of each positive pair."""

    enabled: bool = False
    points: int = Field(2, ge=1, le=16, description="interpolated points per positive pair")


class MetricAugmentSettings(AugmentSettings):
    """Light views for metric learning: a random resized crop and a horizontal flip, no colour changes.

    A subclass (not AugmentSettings with other values) so that overriding one key keeps the other defaults.
    """

    min_scale: float = Field(0.5, gt=0.0, le=1.0)
    cj_prob: float = Field(0.0, ge=0.0, le=1.0)
    random_gray_scale: float = Field(0.0, ge=0.0, le=1.0)
    gaussian_blur: float = Field(0.0, ge=0.0, le=1.0)


class MetricSettings(MethodSettings):
    """Supervised deep metric learning: backbone -> linear embedding head -> L2 normalization, a pair-based loss."""

    embedding_dim: int = Field(128, ge=2, le=8192)
    loss: LossName = "multi_similarity"
    miner: MinerName | None = Field(None, description="default: the loss's usual miner (see LOSS_MINERS)")
    margin: float | None = Field(
        None, gt=0.0, le=4.0,
        description="the loss's margin (contrastive: negative margin 1.0; triplet 0.2; margin loss 0.2; quadruplet 0.2)",
    )
    quadruplet_margin2: float = Field(0.1, gt=0.0, le=4.0, description="quadruplet: margin of the inter-class term")
    images_per_class: int = Field(4, ge=2, le=1024, description="m of the m-per-class batch sampler")
    embedding_expansion: EmbeddingExpansionSettings = EmbeddingExpansionSettings()
    augment: MetricAugmentSettings = MetricAugmentSettings()
    augment_views: bool = Field(True, description="train on augmented views (false: on the images as they are)")

    @model_validator(mode="after")
    def _miner_fits_loss(self) -> "MetricSettings":
        allowed = LOSS_MINERS[self.loss]
        if self.embedding_expansion.enabled and self.miner is not None:
            raise ValueError(
                "miner: with embedding_expansion enabled the hardest negatives are mined among original and "
                "synthetic points; leave miner unset"
            )
        if self.miner is not None and self.miner not in allowed:
            raise ValueError(f"miner: '{self.miner}' does not fit loss '{self.loss}' (allowed: {', '.join(allowed)})")
        return self

    def resolved_miner(self) -> str:
        return self.miner if self.miner is not None else LOSS_MINERS[self.loss][0]


class FinetuneSettings(MethodSettings):
    """What the fine-tune method needs; a finetune stage fills it from its own keys (mode, label_smoothing, ...)
    and the runner adds the classes found in the labeled training images."""

    mode: Literal["linear", "full"] = "linear"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1.0)
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    num_classes: int | None = Field(None, ge=2, description="filled in by the runner from the labels")
    class_ids: list[int] | None = Field(None, description="dataset label of each output, filled in by the runner")


# name -> settings model; the matching module and class are in downstream/__init__.py (METHODS).
DOWNSTREAM_SETTINGS: dict[str, type[MethodSettings]] = {
    "finetune": FinetuneSettings,
    "metric": MetricSettings,
}
