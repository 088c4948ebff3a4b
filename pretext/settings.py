"""Settings of each pretext method, validated when the config is read.

These models import only pydantic so that a config error is reported in well under two seconds,
long before torch is imported. Each method class in this package points at its settings model.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictSettings(BaseModel):
    """Rejects unknown keys with the list of allowed ones (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = set(cls.model_fields)
            for key in data:
                if key not in allowed:
                    hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                    did_you_mean = f"; did you mean '{hint[0]}'?" if hint else ""
                    raise ValueError(
                        f"unknown key '{key}' (allowed: {', '.join(sorted(allowed))}){did_you_mean}"
                    )
        return data


class AugmentSettings(StrictSettings):
    """Parameters of the batched SimCLR-style view augmentation (names follow lightly's SimCLRTransform)."""

    min_scale: float = Field(0.08, gt=0.0, le=1.0)
    max_scale: float = Field(1.0, gt=0.0, le=1.0)
    cj_prob: float = Field(0.8, ge=0.0, le=1.0)
    cj_strength: float = Field(1.0, ge=0.0)
    cj_bright: float = Field(0.8, ge=0.0)
    cj_contrast: float = Field(0.8, ge=0.0)
    cj_sat: float = Field(0.8, ge=0.0)
    cj_hue: float = Field(0.2, ge=0.0, le=0.5)
    random_gray_scale: float = Field(0.2, ge=0.0, le=1.0)
    gaussian_blur: float = Field(0.5, ge=0.0, le=1.0)
    sigmas: tuple[float, float] = (0.1, 2.0)
    hf_prob: float = Field(0.5, ge=0.0, le=1.0)
    vf_prob: float = Field(0.0, ge=0.0, le=1.0)
    rr_prob: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _scale_order(self) -> "AugmentSettings":
        if self.min_scale > self.max_scale:
            raise ValueError("min_scale must not exceed max_scale")
        if not (0.0 < self.sigmas[0] <= self.sigmas[1]):
            raise ValueError("sigmas must be (low, high) with 0 < low <= high")
        return self


class MethodSettings(StrictSettings):
    """Common base: every method may be given a seed offset for its own randomness."""


class SimCLRSettings(MethodSettings):
    temperature: float = Field(0.5, gt=0.0, le=10.0)
    hidden_dim: int = Field(512, ge=8)
    output_dim: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1, le=4)
    gather_distributed: bool = True
    separate_view_forward: bool = Field(
        True, description="encode the two views in two forward passes (per-view BN statistics, as lightly's "
        "example; faster on CPUs) instead of one pass over the concatenated batch")
    augment: AugmentSettings = AugmentSettings()


class RotationSettings(MethodSettings):
    """RotNet: all four rotations of every image in the batch, a 4-way classifier on pooled features."""

    head_hidden_dim: int = Field(0, ge=0, description="0: a linear head; else one hidden layer of this size")
    min_scale: float = Field(0.5, gt=0.0, le=1.0, description="random resized crop before rotating")
    hf_prob: float = Field(0.5, ge=0.0, le=1.0)


class JigsawSettings(MethodSettings):
    """Jigsaw puzzles: tiles of a grid, shuffled by one of a fixed permutation set, classified by an MLP."""

    grid: Literal[2, 3] = 3
    num_permutations: int = Field(100, ge=2, le=1000)
    permutation_seed: int = 0
    upsample_to: int = Field(96, ge=16, le=512, description="small images are upsampled to this size first")
    gap: float = Field(0.15, ge=0.0, lt=0.5, description="fraction of a cell left as gap around each tile")
    color_jitter: float = Field(0.1, ge=0.0, le=1.0, description="per-channel jitter against chromatic shortcuts")
    gray_prob: float = Field(0.3, ge=0.0, le=1.0)
    head_hidden_dim: int = Field(512, ge=8)

    @model_validator(mode="after")
    def _enough_permutations(self) -> "JigsawSettings":
        import math

        available = math.factorial(self.grid * self.grid)
        if self.num_permutations > available:
            raise ValueError(f"num_permutations: a {self.grid}x{self.grid} grid has only {available} permutations")
        return self


class ColorizationSettings(MethodSettings):
    """Colorization (Zhang et al. 2016): L in, ab out, classified over quantized ab bins or regressed."""

    loss: Literal["classification", "regression"] = "classification"
    grid_size: int = Field(10, ge=2, le=50, description="ab quantization step")
    soft_sigma: float = Field(5.0, gt=0.0, description="soft-encoding Gaussian over the nearest bins")
    soft_neighbors: int = Field(5, ge=1, le=32)
    rebalance_lambda: float = Field(0.5, ge=0.0, le=1.0, description="class rebalancing: mix with uniform")
    annealed_temperature: float = Field(0.38, gt=0.0, le=1.0)
    decoder_channels: int = Field(128, ge=8)
    min_scale: float = Field(0.3, gt=0.0, le=1.0, description="random resized crops of the photos")


class MoCoSettings(MethodSettings):
    """MoCo v2 (queue of negatives, momentum key encoder) or v3 (no queue, predictor head)."""

    version: Literal["v2", "v3"] = "v2"
    temperature: float = Field(0.2, gt=0.0, le=10.0)
    memory_bank_size: int = Field(4096, ge=0, description="v2 queue length (0 with v3)")
    momentum: float = Field(0.99, ge=0.0, lt=1.0, description="EMA of the key encoder; ramps to 1 by cosine")
    hidden_dim: int = Field(512, ge=8)
    output_dim: int = Field(128, ge=8)
    shuffle_bn: Literal["shuffle", "sync", "none"] = Field("shuffle", description="BN leak guard under DDP")
    symmetric: bool = Field(True, description="both views serve as query (2x encoder passes per image)")
    augment: AugmentSettings = AugmentSettings()


class STMLAugmentSettings(AugmentSettings):
    """STML's views: the authors' random resized crop (scale 0.16-1) + horizontal flip, no colour changes.

    A subclass (not AugmentSettings with other values) so that overriding one key in a config keeps
    the other STML defaults instead of falling back to SimCLR's.
    """

    min_scale: float = Field(0.16, gt=0.0, le=1.0)
    cj_prob: float = Field(0.0, ge=0.0, le=1.0)
    random_gray_scale: float = Field(0.0, ge=0.0, le=1.0)
    gaussian_blur: float = Field(0.0, ge=0.0, le=1.0)


class STMLSettings(MethodSettings):
    """STML (Kim et al., CVPR 2022): an EMA teacher's contextualized similarities are the student's pseudo labels.

    Defaults are the authors' (README/main.py): momentum 0.999, sigma 3, delta 1, 5 neighbours per query,
    2 views, a 1024-d auxiliary head g; embedding_dim 128 is the paper's small-embedding setting.
    """

    embedding_dim: int = Field(128, ge=2, le=8192, description="f head: the embedding kept for retrieval")
    big_embedding_dim: int = Field(1024, ge=2, le=16384, description="g head: training only, distilled into f")
    momentum: float = Field(0.999, ge=0.0, le=1.0, description="EMA of the teacher (1.0 freezes it)")
    sigma: float = Field(3.0, gt=0.0, description="W_P = exp(-||t_i - t_j||^2 / sigma) on unit teacher embeddings")
    delta: float = Field(1.0, gt=0.0, description="margin of the relaxed contrastive loss (mean-normalized distances)")
    num_neighbors: int = Field(5, ge=1, le=256, description="k: images per sampled neighbourhood, query included")
    views: int = Field(2, ge=1, le=8, description="augmented views per image; k' = num_neighbors * views")
    rc_weight: float = Field(1.0, ge=0.0, description="weight of the relaxed contrastive term (paper: 1)")
    kl_weight: float = Field(1.0, ge=0.0, description="weight of the self-distillation KL term (paper: 1)")
    pooling: Literal["gap+gmp", "gap", "gem"] = Field(
        "gap+gmp", description="the backbone's last feature map -> one vector for f and g: the authors' global "
        "average + global max pooling (summed), the average alone, or GeM with p = 3 (fixed: the student and its "
        "momentum teacher pool alike). On 28-32 px images a resnet's last map is 2x2, where the max mostly adds noise",
    )
    bn_freeze: bool = Field(
        False, description="keep the student backbone's BatchNorm layers frozen (running statistics and affine "
        "parameters), the authors' --bn_freeze: a neighbourhood batch holds near-duplicates, so its batch "
        "statistics would pull BN away from the pretrained ones",
    )
    normalize_embedding: bool = Field(
        False, description="L2-normalize the exported f; off: f as trained (unnormalized), compared by Euclidean "
        "distance as in the authors' evaluation (set retrieval_distance: euclidean on its evaluate stage)",
    )
    augment: STMLAugmentSettings = STMLAugmentSettings()

    @model_validator(mode="after")
    def _some_loss(self) -> "STMLSettings":
        if self.rc_weight == 0.0 and self.kl_weight == 0.0:
            raise ValueError("rc_weight and kl_weight cannot both be 0")
        return self


class TeacherSpec(StrictSettings):
    """Where a distillation teacher comes from: a backbone artifact folder, or a timm name plus weights.

    Only what can be checked without torch is checked here (which keys go together, that the files exist);
    the pipeline builds the module (pipeline/teachers.py). Relative paths are read from the working directory.
    """

    artifact: str | None = Field(None, description="a backbone artifact folder (model.safetensors + backbone.json)")
    name: str | None = Field(None, description="a timm model name, built with num_classes=0")
    weights: str | None = Field(None, description="with name: a .safetensors state dict of that timm model")
    pretrained: bool = Field(False, description="with name: timm hub weights (not supported: give weights:)")
    random_init: bool = Field(
        False, description="with name and no weights: a randomly initialised teacher (seeded by seed), a "
        "baseline and a test fixture, not a way to learn anything useful",
    )
    seed: int = Field(0, description="random_init: the teacher's initialisation seed (the same on every worker)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="with name: extra timm.create_model kwargs")
    input_size: int | None = Field(
        None, ge=8, le=1024, description="side the teacher sees; default: the artifact's, or timm's pretrained_cfg"
    )
    mean: tuple[float, ...] | None = Field(None, description="with name: input normalization (default: timm's cfg)")
    std: tuple[float, ...] | None = Field(None, description="with name: input normalization (default: timm's cfg)")

    @field_validator("artifact")
    @classmethod
    def _artifact_exists(cls, value: str | None) -> str | None:
        import os

        if value is not None and not os.path.isfile(os.path.join(value, "backbone.json")):
            raise ValueError(f"{value!r} is not a backbone artifact folder (no backbone.json there)")
        return value

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: str | None) -> str | None:
        import os

        if value is not None:
            value = os.path.expanduser(value)
            if not value.endswith(".safetensors"):
                raise ValueError(f"expected a .safetensors state dict, got {value!r}")
            if not os.path.isfile(value):
                raise ValueError(f"file not found: {value!r}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherSpec":
        if self.artifact is not None and self.name is not None:
            raise ValueError("give either artifact: (a backbone artifact folder) or name: (a timm model with "
                             "weights:), not both")
        if self.artifact is None and self.name is None:
            raise ValueError("give artifact: (a backbone artifact folder) or name: (a timm model with weights:)")
        if self.artifact is not None:
            named_only = [k for k in ("weights", "kwargs", "mean", "std", "pretrained", "random_init") if getattr(self, k)]
            if named_only:
                raise ValueError(f"{named_only[0]}: applies to a teacher given by name:, not by artifact: (an "
                                 f"artifact carries its weights and normalization)")
            return self
        if self.pretrained:
            raise ValueError("pretrained: hub weights are not supported for the teacher yet; save the state dict "
                             "as a .safetensors file and give it as weights:")
        if self.weights is None and not self.random_init:
            raise ValueError("weights: a teacher given by name needs weights (a .safetensors state dict); a random "
                             "teacher teaches nothing useful (random_init: true for a baseline)")
        if self.weights is not None and self.random_init:
            raise ValueError("random_init: true contradicts weights:")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean: and std: go together")
        if self.mean is not None and (len(self.mean) != len(self.std) or any(v <= 0 for v in self.std)):
            raise ValueError("std: one positive value per mean value")
        return self


class DistillAugmentSettings(AugmentSettings):
    """Distillation's view: one crop, shown identically to teacher and student (consistent teaching), so it can be
    strong; blur off by default (on 28-64 px images it mostly erases what the teacher would describe)."""

    min_scale: float = Field(0.2, gt=0.0, le=1.0)
    gaussian_blur: float = Field(0.0, ge=0.0, le=1.0)


class DistillSettings(MethodSettings):
    """Knowledge distillation from a frozen teacher's embeddings into the student backbone (pretext/distill.py)."""

    teacher: TeacherSpec
    loss: Literal["cosine", "mse", "queue"] = Field(
        "cosine", description="cosine: 1 - cos(projection, teacher embedding); mse: squared error to the raw "
        "embedding (LightlyTrain v2 style); queue: cross-entropy of similarity distributions over a queue of "
        "teacher embeddings (LightlyTrain v1 style)",
    )
    head_hidden_dim: int = Field(0, ge=0, description="0: a linear projection to the teacher's dimension; else an "
                                 "MLP with one hidden layer of this size")
    mixup: bool = Field(True, description="mix each batch with a shuffled copy of itself (lambda ~ U(0, 1)), "
                        "the same mixed image for teacher and student")
    targets: Literal["view", "cached"] = Field(
        "view", description="view: the teacher embeds the student's own augmented view every step (consistent "
        "teaching: best on long schedules); cached: the teacher embeds every training image once, unaugmented, "
        "and the student's views learn those fixed targets (no teacher forward per step: more student steps for "
        "the same time on short schedules; N x teacher-dim float32 held on every worker's device, GPU memory on GPUs: "
        "1.28M images x 1280 dims is 6.5 GB; needs mixup: false)",
    )
    temperature: float = Field(0.07, gt=0.0, le=10.0, description="loss: queue, both distributions")
    queue_size: int = Field(4096, ge=1, description="loss: queue, teacher embeddings kept (global batches)")
    augment: DistillAugmentSettings = DistillAugmentSettings()

    @model_validator(mode="after")
    def _cached_targets_without_mixup(self) -> "DistillSettings":
        if self.targets == "cached" and self.mixup:
            raise ValueError("targets: cached holds the teacher's embeddings of the unmixed images, so a mixed view "
                             "has no target: set mixup: false, or targets: view")
        return self


# name -> settings model; the matching module and class are in pretext/__init__.py (METHODS).
METHOD_SETTINGS: dict[str, type[MethodSettings]] = {
    "simclr": SimCLRSettings,
    "rotation": RotationSettings,
    "jigsaw": JigsawSettings,
    "colorization": ColorizationSettings,
    "moco": MoCoSettings,
    "stml": STMLSettings,
    "distill": DistillSettings,
}
