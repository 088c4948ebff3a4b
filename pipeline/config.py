"""Pipeline configuration: YAML files validated by pydantic.

Reading a config imports only pydantic and PyYAML, so a bad key is reported in well under two seconds.
Every error names the key path (stages are named by their `name:`) and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from downstream.policies import PolicyError, validate_policies
from downstream.settings import DOWNSTREAM_SETTINGS
from pretext import REFINE_METHODS, method_names, method_settings
from pretext.settings import StrictSettings

class ConfigError(Exception):
    """A config that cannot run. The CLI prints the message and exits with code 2."""


Strict = StrictSettings  # same unknown-key behaviour as the method settings


def execution_only(default: Any = ..., **kwargs: Any) -> Any:
    """A field that changes how a stage runs, not what it computes: it stays out of the cache key, so
    changing it reuses finished stages (see `result_settings`)."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {}, execution_only=True)
    return Field(default, json_schema_extra=extra, **kwargs)


def execution_only_fields(model: type[BaseModel]) -> set[str]:
    return {name for name, info in model.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("execution_only")}


def result_settings(model: BaseModel) -> dict[str, Any]:
    """The fields of a config model that change results: what cache keys are made of."""
    return model.model_dump(mode="json", exclude=execution_only_fields(type(model)))



PRETRAINED = "pretrained"  # input: the configured backbone with its weights (pipeline/inputs.py)


def is_external(inp: str | None) -> bool:
    """An input that names no stage: `pretrained`, an artifact folder (a path), a `models:/` registry URI."""
    return inp is not None and (inp == PRETRAINED or inp.startswith("models:/") or "/" in inp or inp.startswith("~"))


class DataConfig(Strict):
    """Where images come from. Labels, when a source has them, are used for evaluation only."""

    source: Literal["fashion-mnist", "mnist", "cifar10", "cifar100", "stl10", "digits", "photos", "folder",
                    "manifest"]
    root: str | None = Field(None, description="folder: a path or a pyarrow URI (s3://...); manifest: a .csv or "
                             ".parquet file with a path column (optional label and split columns)")
    download: bool = False
    train_split: str = "train"
    eval_split: str = "test"
    train_subset: int | None = Field(None, ge=1, description="seeded, stratified subset of the train split")
    eval_subset: int | None = Field(None, ge=1)
    train_classes: list[int] | None = None
    eval_classes: list[int] | None = None
    load_size: int | None = Field(None, ge=8, le=4096, description="folder images are decoded to this square size; photos: tile size")
    max_image_pixels: int = Field(89_478_485, ge=1)
    labels: Literal["auto", "folders", "none"] = Field(
        "auto", description="folder labels: class sub-folders (folders), one unlabeled collection (none), or "
        "folders when the top level holds only sub-folders with images (auto); a manifest's label column")
    backend: Literal["auto", "memory", "stream"] = execution_only(
        "auto", description="folder/manifest: decode on the driver into memory, or into a pixel cache built by "
        "Ray Data that every worker reads rows from (stream); auto picks stream above memory_limit_gb")
    memory_limit_gb: float = execution_only(2.0, gt=0.0, description="auto: the decoded size (N x 3 x S^2 bytes) "
                                            "above which a split is streamed")
    cache_dir: str | None = execution_only(
        None, description="stream: where the pixel cache lives (a path every node can read); default "
        "<output_dir>/pixel_cache")

    @model_validator(mode="after")
    def _sources_need_root(self) -> "DataConfig":
        if self.source in ("folder", "manifest") and not self.root:
            what = "<path to the images>" if self.source == "folder" else "<path to a .csv or .parquet manifest>"
            raise ValueError(f"source '{self.source}' needs root: {what}")
        if self.backend == "stream" and self.source not in ("folder", "manifest"):
            raise ValueError(f"backend: stream reads image files (source folder or manifest); source "
                             f"'{self.source}' is an in-memory array source: use backend memory or auto")
        return self


class BackboneConfig(Strict):
    """A timm model by name: a random init, timm's hub weights (`pretrained: true`) or a state dict file
    (`weights`). Weights are resolved once on the driver before any stage starts (pipeline.weights)."""

    name: str = "resnet18"
    small_image_stem: bool = Field(True, description="default false with pretrained or weights (the pretrained "
                                   "stem would be thrown away); true there is refused")
    stem_stride: Literal[1, 2] = Field(1, description="small stem only: 2 halves the feature maps (about 3x faster)")
    in_chans: Literal[1, 3] = 3
    image_size: int = Field(32, ge=8, le=1024, description="input size the backbone sees")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool = Field(False, description="timm's hub weights for `name` (Hugging Face cache or download)")
    weights: str | None = execution_only(
        None, description="a .safetensors or .pth state dict (a path or a pyarrow URI) in timm, torchvision or "
        "efficientnet-pytorch naming; the cache key holds the file's sha256, not its path")
    normalization: Literal["auto", "data", "imagenet"] = Field(
        "auto", description="input mean/std: the weights' (timm's pretrained_cfg) with pretrained or weights, else "
        "the training data's exact pixel moments (auto); always the data's (data); ImageNet's (imagenet)")

    @model_validator(mode="after")
    def _pretrained_start(self) -> "BackboneConfig":
        if self.pretrained and self.weights:
            raise ValueError("pretrained: true and weights: PATH both name weights; keep one")
        if self.pretrained or self.weights:
            which = "pretrained: true" if self.pretrained else "weights"
            if self.small_image_stem and "small_image_stem" in self.model_fields_set:
                raise ValueError(f"small_image_stem: true replaces the stem that {which} loads (its weights would "
                                 f"be discarded); set small_image_stem: false, or drop {which} for a random init")
            self.small_image_stem = False
        return self


class RayConfig(Strict):
    """Where and how training runs. `num_workers` and `use_gpu` change results (the per-rank batch, the
    precision `auto` picks), so they are part of every training stage's cache key; the rest are not."""

    address: str | None = execution_only(None, description="attach to a running cluster; RAY_ADDRESS works too")
    num_workers: int = Field(2, ge=1, le=4096)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = execution_only(None)
    max_failures: int = execution_only(0, ge=-1, description="-1: retry forever")
    storage_path: str | None = execution_only(None, description="checkpoints; defaults to <output_dir>/ray")
    local_metrics: bool = execution_only(
        False, description="a local Ray (no address) collects Ray's own Prometheus metrics; off by default: its "
        "collectors cost about 2% of training speed on a 2-core machine, and only a Prometheus server shows them. "
        "A cluster keeps its own setting",
    )


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<output_dir>/mlflow.db")
    experiment: str = "sslpipe"
    run_name: str | None = None


class OptimizerConfig(Strict):
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, le=100.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class StageBase(Strict):
    """What every stage kind has. The class-level traits below are read by the graph and the cache; a new
    stage kind sets them on its schema class and adds an executor in `pipeline.stages`."""

    produces_backbone: ClassVar[bool] = False  # its result can be another stage's `input`
    best_candidate: ClassVar[bool] = False  # `input: best` chooses among these stages
    runs_in_waves: ClassVar[bool] = False  # independent neighbours of this kind may train concurrently
    special_inputs: ClassVar[tuple[str, ...]] = ("best",)  # input values that name no stage
    warm_starts: ClassVar[bool] = False  # registry.warm_start: an omitted input means "from the champion"

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)

    def uses_eval_split(self) -> bool:
        """True when the stage reads the evaluation split (its fingerprint then covers that split)."""
        return False


class TrainingStage(StageBase):
    """What every stage trained under Ray Train shares; each kind is a sibling subclass that adds its method
    check and keys. Produces a backbone artifact."""

    produces_backbone: ClassVar[bool] = True
    allows_batch_augment: ClassVar[bool] = False  # mixup / cutmix need labels

    method: str
    input: str | None = Field(None, description="start from this stage's backbone instead of random init")
    epochs: int = Field(ge=1, le=100_000)
    batch_size: int = Field(256, ge=2, description="global batch, split across workers")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs, fp32 on CPUs (bf16 on a CPU is opt-in: docs/configuration.md says why)"
    )
    channels_last: bool = False
    compile: bool = execution_only(
        False, description="torch.compile the backbone (Module.compile: same weights and state-dict keys); "
        "a one-off compile of 1-2 min that pays only on long runs: measure it (bench/speed.py)",
    )
    checkpoint_every: int = execution_only(1, ge=1)
    log_every_steps: int = execution_only(20, ge=1)
    evaluate: bool = Field(True, description="kNN accuracy and k-means NMI of the backbone when labels exist")
    settings: dict[str, Any] = Field(default_factory=dict)
    augment: list[Any] = Field(
        default_factory=list,
        description="augmentation policies by name applied to every training batch before the method sees it",
    )

    def uses_eval_split(self) -> bool:
        return bool(self.evaluate)

    @model_validator(mode="after")
    def _validate_augment(self) -> "TrainingStage":
        try:
            self.augment = validate_policies(self.augment, allow_batch=self.allows_batch_augment)
        except PolicyError as err:
            raise ValueError(str(err)) from None
        return self

    def _validated_settings(self, model: type[BaseModel]) -> None:
        try:
            validated = model.model_validate(self.settings)
        except ValidationError as err:
            raise ValueError(_format_errors(err, prefix="settings")) from None
        self.settings = validated.model_dump(mode="json")


class PretextStage(TrainingStage):
    """Trains a backbone with a label-free method; produces a backbone artifact."""

    best_candidate: ClassVar[bool] = True
    runs_in_waves: ClassVar[bool] = True
    warm_starts: ClassVar[bool] = True

    kind: Literal["pretext"]

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        known = [m for m in method_names() if m not in REFINE_METHODS]
        if value not in known:
            hint = difflib.get_close_matches(value, known, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            refine = f" ('{value}' is a refine method: use kind: refine)" if value in REFINE_METHODS else ""
            raise ValueError(f"unknown pretext method '{value}' (known: {', '.join(known)}){extra}{refine}")
        return value

    @model_validator(mode="after")
    def _validate_settings(self) -> "PretextStage":
        self._validated_settings(method_settings(self.method))
        return self


class RefineStage(TrainingStage):
    """Refines an existing backbone without labels (STML); produces a backbone artifact with its embedding head."""

    best_candidate: ClassVar[bool] = True

    kind: Literal["refine"]
    method: str = "stml"
    input: str = Field(description="the stage whose backbone is refined, or 'best'")
    batch_size: int = Field(120, ge=2, description="global batch: queries plus their nearest neighbours")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in REFINE_METHODS:
            raise ValueError(f"unknown refine method '{value}' (known: {', '.join(REFINE_METHODS)})")
        return value

    @model_validator(mode="after")
    def _validate_settings(self) -> "RefineStage":
        self._validated_settings(method_settings(self.method))
        return self


class MetricStage(TrainingStage):
    """Supervised metric learning on the training split's labels; produces an embedder artifact (backbone + head).

    Starts from `input` (a stage's backbone or 'best') or a random init. Retrieval (Recall@1/2/4/8, MAP@R)
    of the evaluation split is computed after training, meant for classes never seen in training.
    """

    warm_starts: ClassVar[bool] = True

    kind: Literal["metric"]
    method: Literal["metric"] = "metric"
    batch_size: int = Field(128, ge=2, description="global batch of m-per-class groups, split across workers")
    evaluate: bool = Field(False, description="kNN accuracy and k-means NMI (meaningless when eval classes are unseen)")
    retrieval: bool = Field(True, description="Recall@1/2/4/8 and MAP@R, leave-one-out on the evaluation split")

    def uses_eval_split(self) -> bool:
        return bool(self.evaluate or self.retrieval)

    @model_validator(mode="after")
    def _validate_settings(self) -> "MetricStage":
        from downstream.settings import MetricSettings

        self._validated_settings(MetricSettings)
        return self


class ClusterStage(TrainingStage):
    """Learns C clusters of the images with SCAN on a backbone input; produces a cluster model (backbone + head).

    `epochs` is SCAN's phase (neighbours agree), `selflabel_epochs` the self-labelling phase after it; both run
    in one Ray Train fit. Neighbours are mined once from the input's embedding of the training split.
    """

    kind: Literal["cluster"]
    method: Literal["scan"] = "scan"
    input: str = Field(description="the stage whose backbone is clustered, or 'best'")
    clusters: int | Literal["auto"] | None = Field(
        None, description="C; none: the evaluation split's class count; auto: the silhouette of k-means on the "
        "input embedding over clusters_range")
    clusters_range: tuple[int, int] = Field((2, 20), description="clusters: auto tries C in this range")
    selflabel_epochs: int = Field(0, ge=0, le=100_000)
    evaluate: bool = Field(False, description="kNN accuracy and k-means NMI of the backbone (unchanged when frozen)")

    def uses_eval_split(self) -> bool:
        return True  # its clusters are reported on the evaluation split

    @field_validator("clusters")
    @classmethod
    def _two_or_more(cls, value):
        if isinstance(value, int) and value < 2:
            raise ValueError("clusters must be at least 2 (or auto)")
        return value

    @model_validator(mode="after")
    def _validate_settings(self) -> "ClusterStage":
        lo, hi = self.clusters_range
        if not 2 <= lo <= hi:
            raise ValueError(f"clusters_range must be (low, high) with 2 <= low <= high, got {list(self.clusters_range)}")
        self._validated_settings(DOWNSTREAM_SETTINGS[self.method])
        defaults = DOWNSTREAM_SETTINGS[self.method]()
        for key, stage_key in (("clusters", "clusters"), ("scan_epochs", "epochs")):
            if self.settings[key] != getattr(defaults, key):
                raise ValueError(f"settings.{key} is set by the stage: use the stage's {stage_key} key")
        return self

    def method_settings(self, clusters: int) -> dict[str, Any]:
        """What the SCAN method gets: the stage's settings plus C and the length of phase 1."""
        return {**self.settings, "clusters": clusters, "scan_epochs": self.epochs}

    def job(self, clusters: int) -> "ClusterStage":
        """The stage as the training loop runs it: both phases in one fit."""
        return self.model_copy(update={"epochs": self.epochs + self.selflabel_epochs,
                                       "settings": self.method_settings(clusters)})


class FinetuneStage(TrainingStage):
    """Trains a classifier on a labeled share of the training split: a linear probe on the frozen backbone
    (`mode: linear`) or everything (`mode: full`). Produces a classifier and a backbone artifact."""

    allows_batch_augment: ClassVar[bool] = True
    special_inputs: ClassVar[tuple[str, ...]] = ("best", "random")

    kind: Literal["finetune"]
    method: str = "finetune"
    input: str | None = Field(
        None, description="a stage that produced a backbone, 'best', or 'random' (same as omitted): random init"
    )
    mode: Literal["linear", "full"] = "linear"
    label_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="seeded, class-stratified share of the training labels (at least 1 per class)"
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1.0, description="mode full: backbone lr = this x optimizer.lr")
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    evaluate: bool = Field(False, description="also kNN accuracy and k-means NMI of the fine-tuned backbone")

    def uses_eval_split(self) -> bool:
        return True  # test accuracy

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value != "finetune":
            raise ValueError(f"unknown fine-tune method '{value}' (known: finetune)")
        return value

    @model_validator(mode="after")
    def _validate_settings(self) -> "FinetuneStage":
        if self.settings:
            raise ValueError(
                f"settings: a finetune stage takes its options as stage keys (mode, label_fraction, label_smoothing, "
                f"backbone_lr_scale, head_dropout), got settings keys: {', '.join(map(str, self.settings))}"
            )
        return self

    def method_settings(self, num_classes: int, class_ids: list[int]) -> dict[str, Any]:
        """The fine-tune method's settings: this stage's keys plus the classes found in the labels."""
        from downstream.settings import FinetuneSettings

        return FinetuneSettings(mode=self.mode, label_smoothing=self.label_smoothing,
                                backbone_lr_scale=self.backbone_lr_scale, head_dropout=self.head_dropout,
                                num_classes=num_classes, class_ids=class_ids).model_dump(mode="json")


class EvaluateStage(StageBase):
    """Embeds the evaluation split with a backbone: kNN accuracy, retrieval, k-means metrics, plots, report."""

    special_inputs: ClassVar[tuple[str, ...]] = ("best", "pixels")

    class ChooseK(Strict):
        """Range of k tried when `clusters: auto`; the k with the best silhouette wins."""

        min: int = Field(2, ge=2)
        max: int = Field(20, ge=2, le=1000)

        @model_validator(mode="after")
        def _ordered(self) -> "EvaluateStage.ChooseK":
            if self.max < self.min:
                raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
            return self

    kind: Literal["evaluate"]
    input: str = Field(description="a stage that produced a backbone, 'best', or 'pixels' for the raw-pixel baseline")
    features: Literal["embedding", "backbone"] = Field(
        "embedding", description="embedding: what the input artifact embeds with (a refine or metric stage's head "
        "included); backbone: its backbone's pooled features alone, e.g. an STML-refined backbone without f",
    )
    pooling: Literal["avg", "gem"] = Field(
        "avg", description="features: backbone: the backbone's own global pooling (avg), or GeM (p = 3) of its "
        "last feature map, the usual descriptor for instance retrieval (CNN backbones). NetVLAD is learned: train "
        "it in a metric stage, whose artifact embeds with it",
    )
    batch_size: int = execution_only(512, ge=1, description="images per embedding batch")
    pixels_max_gib: float = execution_only(
        4.0, gt=0.0, description="input: pixels holds both splits as float32 features in memory: a larger "
        "set is refused before the run starts",
    )
    knn_k: int = Field(200, ge=1)
    knn_temperature: float = Field(0.1, gt=0.0)
    clusters: int | Literal["auto"] | None = Field(
        None, description="k for k-means; 'auto': best silhouette over choose_k; default: number of classes, else 10"
    )
    choose_k: ChooseK | None = Field(None, description="{min, max} for clusters: auto (default 2..20); implies auto")
    spherical_kmeans: bool = Field(False, description="cosine k-means: unit-norm centroids on L2-normalized features")
    kmeans_iterations: int = Field(50, ge=1)
    kmeans_restarts: int = Field(
        1, ge=1, le=100, description="k-means runs from different seeds; the lowest-inertia one is kept (NMI of "
        "a single run varies by a few points between seeds)",
    )
    cluster_space: Literal["embedding", "umap", "lmnn"] = Field(
        "embedding", description="umap: cluster UMAP coordinates of the embedding (N2D); lmnn: cluster the "
        "embedding mapped by LMNN, learned from the training split's labels; either way plain k-means on the "
        "embedding is reported next to it as embedding_kmeans_*",
    )
    cluster_algorithm: Literal["kmeans", "gmm"] = Field(
        "kmeans", description="gmm: a Gaussian mixture (full covariance up to 32 dimensions, else diagonal); "
        "confidence is the assigned component's posterior",
    )
    umap_components: int = Field(10, ge=2, le=100, description="cluster_space: umap: UMAP dimensions")
    umap_neighbors: int = Field(15, ge=2, le=200, description="cluster_space: umap: UMAP n_neighbors")
    umap_fit_sample: int = Field(
        20_000, ge=100, description="cluster_space: umap: UMAP is fitted on a seeded sample of at most this many "
        "images and places the rest with transform",
    )
    gmm_iterations: int = Field(100, ge=1, le=10_000, description="cluster_algorithm: gmm: EM iterations per run")
    uncertain_images: int = Field(
        64, ge=1, le=400, description="uncertain.png: the least confident images of the clustering",
    )
    retrieval: bool = Field(False, description="Recall@K, R-precision, MAP@R and mAP of the evaluation split")
    retrieval_distance: Literal["euclidean", "cosine", "mahalanobis", "lmnn"] = Field(
        "cosine", description="mahalanobis: whitening (mean, shrunk inverse sqrt covariance) fitted on the train split; "
        "lmnn: a linear map learned from the train split's labels (LMNN)"
    )
    retrieval_gallery: Literal["eval", "train"] = Field(
        "eval", description="eval: leave-one-out on the evaluation split; train: eval queries search the train split"
    )
    retrieval_max_queries: int = Field(
        10_000, ge=1, description="galleries past 20,000 images: a seeded sample of this many queries searches "
        "the whole gallery (metric retrieval_sampled_queries)",
    )
    retrieval_max_depth: int = Field(
        1000, ge=1, description="galleries past 20,000 images: the search depth; where R exceeds it, R-precision "
        "and MAP@R with R capped at it are reported as r_precision_capped / map_at_r_capped",
    )
    recall_at: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="default [1, 2, 4, 8], plus 10 and 100 for galleries over 1000 images"
    )
    mahalanobis_shrinkage: float | Literal["auto"] = Field(
        "auto", description="covariance shrinkage towards a scaled identity in [0, 1]; auto: Ledoit-Wolf"
    )
    tsne: bool = True
    tsne_points: int = Field(3000, ge=50)
    umap: bool = Field(False, description="a UMAP plot next to t-SNE (umap-learn; skipped with a warning if missing)")
    grid_per_cluster: int = Field(12, ge=1, le=100)
    cluster_page_images: int = Field(48, ge=1, le=400, description="images on each per-cluster page")
    html_report: bool = Field(True, description="report.html: metrics, plots and cluster pages, no external files")

    def uses_eval_split(self) -> bool:
        return True

    @field_validator("clusters", mode="before")
    @classmethod
    def _clusters_int_or_auto(cls, value: Any) -> Any:
        ok = value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 2)
        if not ok:
            raise ValueError(f"clusters must be an integer >= 2 or 'auto', got {value!r}")
        return value

    @field_validator("mahalanobis_shrinkage")
    @classmethod
    def _shrinkage_range(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and not 0.0 <= value <= 1.0:
            raise ValueError(f"mahalanobis_shrinkage must be in [0, 1] or 'auto', got {value}")
        return value

    @model_validator(mode="after")
    def _backbone_features_need_a_backbone(self) -> "EvaluateStage":
        if self.features == "backbone" and self.input == "pixels":
            raise ValueError("features: backbone needs a backbone input, not 'pixels'")
        if self.pooling != "avg" and self.features != "backbone":
            raise ValueError(f"pooling: {self.pooling} pools the backbone's feature map in place of its own pooling; "
                             "set features: backbone (an artifact's embedding keeps the pooling it was trained with)")
        return self

    @model_validator(mode="after")
    def _choose_k_needs_auto(self) -> "EvaluateStage":
        if self.choose_k is not None:
            if isinstance(self.clusters, int):
                raise ValueError(f"choose_k applies to clusters: auto, but clusters is {self.clusters}")
            self.clusters = "auto"
        if self.recall_at is not None:
            self.recall_at = sorted(set(self.recall_at))
        return self


# Every stage kind: one schema class each (an executor in `pipeline.stages` runs it).
STAGE_TYPES: tuple[type[StageBase], ...] = (PretextStage, RefineStage, FinetuneStage, MetricStage, ClusterStage,
                                             EvaluateStage)
Stage = Annotated[Union[STAGE_TYPES], Field(discriminator="kind")]
STAGE_KINDS: tuple[str, ...] = tuple(get_args(t.model_fields["kind"].annotation)[0] for t in STAGE_TYPES)


class SelectionConfig(Strict):
    """How `input: best` picks among the pretext backbones evaluated so far."""

    metric: Literal["knn_accuracy", "nmi"] = "knn_accuracy"
    mode: Literal["max", "min"] = "max"


class RegistryConfig(Strict):
    """The MLflow model registry: each run registers its final backbone; `sslpipe retrain` moves the alias.

    `warm_start: true`: `sslpipe retrain` starts every pretext and metric stage that has no `input` from the
    version holding `alias` (the champion), as if it said `input: models:/<model_name>@<alias>`, so scheduled
    retrains adapt the champion instead of starting over; without a champion (the first retrain) or when the
    champion's architecture is not the configured backbone's, they start fresh, and the decision says why.
    Finetune stages keep their random init (an omitted input means `random` there)."""

    enabled: bool = Field(True, description="register the final backbone as a new model version after each run")
    model_name: str | None = Field(None, min_length=1, max_length=256, description="registered model; default: the pipeline name")
    stage: str | None = Field(None, description="the stage whose backbone is registered; default: the last one that produces a backbone")
    alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$", max_length=255)
    metric: Literal["knn_accuracy", "nmi"] = Field("knn_accuracy", description="retrain compares candidate and champion by this")
    min_improvement: float = Field(0.0, ge=0.0, le=1.0, description="the candidate must beat the champion by at least this")
    warm_start: bool = Field(
        False, description="retrain starts the pretext and metric stages without input from the champion "
        "(models:/<model_name>@<alias>) instead of a fresh init; from scratch while there is none")


class PipelineConfig(Strict):
    name: str = Field("sslpipe", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    output_dir: str | None = None
    data: DataConfig
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _stage_graph(self) -> "PipelineConfig":
        seen: dict[str, StageBase] = {}
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"stage name '{stage.name}' is used twice")
            inp = getattr(stage, "input", None)
            if inp == "best":
                if not any(s.best_candidate for s in seen.values()):
                    raise ValueError(f"stage '{stage.name}': input 'best' needs an earlier pretext stage")
            elif inp == "random" and inp not in stage.special_inputs:
                raise ValueError(f"stage '{stage.name}': input 'random' (a random-init backbone) is for "
                                 f"finetune stages; omit input for a fresh backbone")
            elif inp == "pixels" and inp not in stage.special_inputs:
                raise ValueError(f"stage '{stage.name}': 'pixels' is an evaluation baseline, not a backbone")
            elif is_external(inp):
                if inp == PRETRAINED and not (self.backbone.pretrained or self.backbone.weights):
                    raise ValueError(f"stage '{stage.name}': input 'pretrained' is the configured backbone with its "
                                     "weights: set backbone.pretrained: true or backbone.weights: <file>")
            elif inp is not None and inp not in stage.special_inputs:
                if inp not in seen:
                    raise ValueError(
                        f"stage '{stage.name}': input '{inp}' is not an earlier stage "
                        f"(earlier stages: {', '.join(seen) or 'none'})"
                    )
                if not seen[inp].produces_backbone:
                    raise ValueError(f"stage '{stage.name}': input '{inp}' does not produce a backbone")
            seen[stage.name] = stage
        wanted = self.registry.stage
        if wanted is not None and not (wanted in seen and seen[wanted].produces_backbone):
            backbones = [name for name, s in seen.items() if s.produces_backbone]
            raise ValueError(f"registry.stage: '{wanted}' is not a stage that produces a backbone "
                             f"(those are: {', '.join(backbones) or 'none'})")
        return self

    def registered_stage(self) -> str | None:
        """The stage whose backbone goes to the model registry: configured, else the last backbone stage."""
        if self.registry.stage:
            return self.registry.stage
        backbones = [s.name for s in self.stages if s.produces_backbone]
        return backbones[-1] if backbones else None

    def model_name(self) -> str:
        return self.registry.model_name or self.name

    def champion_uri(self) -> str:
        """The registry URI of the version holding the alias: `models:/<model_name>@<alias>`."""
        return f"models:/{self.model_name()}@{self.registry.alias}"

    def warm_start_stages(self) -> list[str]:
        """The stages `registry.warm_start` starts from the champion: those of a kind that warm starts, no input."""
        return [s.name for s in self.stages if s.warm_starts and getattr(s, "input", None) is None]

    def stage(self, name: str) -> StageBase:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------------
# loading, overrides and error messages


def _format_loc(loc: tuple, data: Any) -> str:
    """('stages', 0, 'pretext', 'epochs') -> 'stages[simclr].epochs' (union tags dropped)."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            name = None
            if isinstance(node, list) and 0 <= item < len(node) and isinstance(node[item], dict):
                name = node[item].get("name")
            parts.append(f"[{name}]" if name else f"[{item}]")
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
            continue
        if isinstance(node, dict) and item not in node and item in STAGE_KINDS:
            continue  # discriminated-union tag, not a key the user wrote
        parts.append(("." if parts else "") + str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "<root>"


def _format_errors(err: ValidationError, data: Any = None, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = _format_loc(tuple(e["loc"]), data)
        if prefix:
            loc = prefix if loc == "<root>" else f"{prefix}.{loc}"
        msg = e["msg"].removeprefix("Value error, ")
        if msg.startswith(("settings", "augment")) and ": " in msg:
            # a nested method-settings or augmentation-policy error, already formatted with its own key paths
            lines.extend(f"{loc}.{line}" for line in msg.splitlines())
            continue
        unknown = re.match(r"^unknown key '([^']+)' (.*)$", msg, re.S)
        if unknown:
            key, rest = unknown.groups()
            loc = key if loc == "<root>" else f"{loc}.{key}"
            msg = f"unknown key {rest}"
        if e["type"] == "union_tag_invalid":
            msg = f"kind must be one of: {', '.join(STAGE_KINDS)}"
        elif e["type"] == "union_tag_not_found":
            msg = f"each stage needs kind: {' | '.join(STAGE_KINDS)}"
        got = e.get("input")
        if e["type"] not in ("missing", "value_error", "union_tag_not_found") and not isinstance(got, (dict, list)):
            msg += f" (got {got!r})"
        lines.append(f"{loc}: {msg}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    """Apply `a.b.c=value` in place. Stages may be addressed by name or index: `stages.simclr.epochs=2`."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. stages.simclr.epochs=2")
    key, _, raw = assignment.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {assignment!r}: empty key")
    node: Any = data
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            match = [s for s in node if isinstance(s, dict) and s.get("name") == part]
            if match:
                node = match[0]
            elif part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                names = [s.get("name") for s in node if isinstance(s, dict)]
                raise ConfigError(f"--set {key}: no stage '{part}' at {where} (stages: {', '.join(map(str, names))})")
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"--set {key}: {where} is not a mapping")
    if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: {'.'.join(path[:-1])} is not a mapping")
    node[path[-1]] = _parse_value(raw)


def load_config_data(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{p}: YAML syntax error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate_config(data: dict, source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid configuration\n{_format_errors(err, data)}") from None


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read, override and validate a pipeline config. Raises ConfigError with key paths."""
    data = copy.deepcopy(load_config_data(path))
    for assignment in overrides:
        apply_override(data, assignment)
    return validate_config(data, source=str(path))


def dump_config(config: PipelineConfig) -> str:
    """The resolved config (defaults filled in) as YAML; saved with every run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict/list -> {'a.b': v}; stages keyed by name. Used for MLflow params."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, list) and data and all(isinstance(v, dict) and "name" in v for v in data):
        for value in data:
            out.update(flatten(value, f"{prefix}{value['name']}."))
    else:
        out[prefix.rstrip(".")] = data
    return out
