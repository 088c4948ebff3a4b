"""Settings of the labeled training methods, validated when the config is read (pydantic only, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from downstream.policies import validate_policies
from pretext.settings import AugmentSettings, MethodSettings, StrictSettings

LossName = Literal["contrastive", "triplet", "margin", "multi_similarity", "quadruplet", "fastap", "smoothap"]
# Losses over the whole ranked batch (average precision): no tuples, no miner, no Embedding Expansion.
LISTWISE_LOSSES = ("fastap", "smoothap")
MinerName = Literal["none", "all", "semihard", "hard", "distance_weighted", "multi_similarity"]

# loss -> the miners that make sense with it; the first one is the default.
LOSS_MINERS: dict[str, tuple[str, ...]] = {
    "contrastive": ("none", "multi_similarity"),
    "triplet": ("semihard", "hard", "all"),
    "margin": ("distance_weighted", "none"),
    "multi_similarity": ("multi_similarity", "none"),
    "quadruplet": ("hard",),
    "fastap": ("none",),
    "smoothap": ("none",),
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
    pooling: Literal["avg", "gem", "netvlad"] = Field(
        "avg", description="global descriptor: the backbone's average pooling, GeM (learnable p) or NetVLAD")
    gem_p: float = Field(3.0, ge=1.0, le=20.0, description="GeM's initial exponent")
    netvlad_clusters: int = Field(16, ge=2, le=256, description="NetVLAD centres (k-means of local features at start)")
    netvlad_whiten_init: bool = Field(
        True, description="NetVLAD: start the projection to embedding_dim as the PCA whitening of the input "
        "backbone's NetVLAD descriptors on the k-means sample (the NetVLAD paper's reduction); false: random")

    @model_validator(mode="after")
    def _miner_fits_loss(self) -> "MetricSettings":
        allowed = LOSS_MINERS[self.loss]
        if self.embedding_expansion.enabled and self.loss in LISTWISE_LOSSES:
            raise ValueError(f"embedding_expansion: loss '{self.loss}' ranks the whole batch by average precision; "
                             "Embedding Expansion mines tuples among synthetic points and does not apply to it")
        if self.loss == "smoothap" and self.images_per_class < 2:
            raise ValueError("loss 'smoothap' needs images_per_class >= 2 (positives for every query)")
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


class ScanAugmentSettings(AugmentSettings):
    """SCAN's phase-1 views (SimCLR-style, as the authors use) and phase 2's weak view (crop + flip only)."""

    min_scale: float = Field(0.2, gt=0.0, le=1.0)
    cj_strength: float = Field(0.5, ge=0.0)
    gaussian_blur: float = Field(0.0, ge=0.0, le=1.0)


DEFAULT_STRONG_AUGMENT = [{"name": "randaugment"}, {"name": "random_erasing", "p": 0.5}]


class ScanSettings(MethodSettings):
    """SCAN (Van Gansbeke et al., ECCV 2020): a clustering head trained so that neighbours agree, then self-labelled.

    `clusters` is filled in by the cluster stage (its own `clusters:` key, or the count chosen by silhouette)."""

    clusters: int | None = Field(None, ge=2, le=10000, description="filled in by the cluster stage")
    num_heads: int = Field(5, ge=1, le=32, description="heads trained side by side; the lowest-loss one is kept")
    overclusters: int = Field(0, ge=0, le=10000, description="extra heads with this many clusters (0: none); "
                              "they shape the features during phase 1 and are not exported")
    num_neighbors: int = Field(20, ge=1, le=500, description="neighbours mined per image from the input's embedding")
    entropy_weight: float = Field(5.0, ge=0.0, le=100.0, description="weight of the cluster-size entropy term")
    scan_epochs: int = Field(1, ge=1, description="phase 1 epochs; filled in by the cluster stage")
    confidence_threshold: float = Field(0.99, gt=0.0, lt=1.0, description="phase 2 keeps predictions above this")
    backbone_lr_scale: float = Field(0.0, ge=0.0, le=1.0, description="0: backbone frozen; else its rate relative "
                                     "to the heads'")
    feature_cache: bool = Field(
        True, description="frozen backbone: phase 1 trains the heads on the backbone's features of the images as "
        "they are, computed once per worker at the start (milliseconds per epoch instead of a backbone pass per "
        "step, and better clusters at CPU budgets); false: on augmented views, embedded every step")
    augment: ScanAugmentSettings = ScanAugmentSettings()
    strong_augment: list[dict] = Field(default_factory=lambda: [dict(p) for p in DEFAULT_STRONG_AUGMENT],
                                       description="phase 2's strong view: augmentation policies (downstream/policies)")

    @model_validator(mode="after")
    def _strong_policies(self) -> "ScanSettings":
        self.strong_augment = validate_policies(self.strong_augment, allow_batch=False)
        return self


# name -> settings model; the matching module and class are in downstream/__init__.py (METHODS).
DOWNSTREAM_SETTINGS: dict[str, type[MethodSettings]] = {
    "finetune": FinetuneSettings,
    "metric": MetricSettings,
    "scan": ScanSettings,
}
