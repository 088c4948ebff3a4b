"""Supervised deep metric learning as a training stage: backbone -> linear head -> L2-normalized embedding.

Trained with a pair-based loss (``downstream.metric_losses``) on class-balanced batches
(:func:`m_per_class_batches`: m images of each class in the batch, so every batch holds positives), and
exported as an embedder (:class:`MetricEmbedder`, rebuilt by :func:`rebuild_exported`) that retrieval and
clustering use in place of the bare backbone. The usual protocol trains on some classes and evaluates
retrieval (Recall@K, MAP@R) on classes never seen in training.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downstream.metric_losses import build_criterion
from downstream.settings import MetricSettings
from pretext.base import Method
from pretext.pooling import NetVLAD, PooledBackbone, feature_map, make_pool, pooled_width
from pretext.transforms import SimCLRAugment

__all__ = ["MetricLearning", "MetricEmbedder", "m_per_class_batches", "rebuild_exported", "EXPORT_KIND"]

EXPORT_KIND = "metric_embedder"


class MetricEmbedder(nn.Module):
    """Backbone (its own pooling) -> linear head -> L2 normalization; ``num_features`` is the output width.

    Takes the same input as the backbone (normalized as the artifact says), so it drops in wherever a
    backbone artifact is embedded.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = int(head.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


def rebuild_exported(backbone: nn.Module, meta: dict[str, Any]) -> MetricEmbedder:
    """The module of a metric-learning artifact around a freshly built backbone (load its state dict next).
    Artifacts trained with GeM or NetVLAD pooling (`pooling` in the metadata) embed with it; older ones have
    none and use the backbone's own average pooling."""
    if meta.get("export") != EXPORT_KIND:
        raise ValueError(f"not a metric-learning export: export={meta.get('export')!r}")
    feature_dim = int(meta["feature_dim"])
    pooling = meta.get("pooling") or "avg"
    if pooling != "avg":
        pool = make_pool(pooling, feature_dim, clusters=int(meta.get("netvlad_clusters") or 16))
        backbone = PooledBackbone(backbone, pool, feature_dim)
        feature_dim = backbone.num_features
    return MetricEmbedder(backbone, nn.Linear(feature_dim, int(meta["embedding_dim"])))


def m_per_class_batches(labels: np.ndarray, *, images_per_class: int, batch_size: int, num_batches: int, seed: int,
                        epoch: int, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """``num_batches`` batches for ``rank``, each ``batch_size`` indices in groups of m images of one class.

    Semantics: for every step one global batch of ``world_size * batch_size`` slots is drawn from
    (seed, epoch, step), the same on every rank: ``ceil(world_size * batch_size / m)`` class slots, filled
    from a random permutation of the classes (cycled, each cycle a fresh permutation, when the batch has
    more slots than there are classes, so a class then fills several groups). Rank r takes the slots
    ``r * batch_size`` .. ``(r + 1) * batch_size``, so the ranks' shares are disjoint; each class's images
    in the global batch are drawn without replacement (with replacement only if the class has fewer
    images than slots). With m not dividing ``batch_size`` a rank's last group is cut short.
    """
    labels = np.asarray(labels).reshape(-1)
    m = int(images_per_class)
    if m < 1 or batch_size < 1 or num_batches < 0:
        raise ValueError(f"need images_per_class >= 1, batch_size >= 1, num_batches >= 0; "
                         f"got {images_per_class}, {batch_size}, {num_batches}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    classes, inverse = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"m-per-class batches need at least 2 classes, got {len(classes)}")
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    global_size = world_size * batch_size
    groups = math.ceil(global_size / m)
    out = []
    for step in range(num_batches):
        rng = np.random.default_rng([int(seed), int(epoch), step])
        cycles = math.ceil(groups / len(classes))
        slots = np.concatenate([rng.permutation(len(classes)) for _ in range(cycles)])[:groups]
        batch = np.empty(groups * m, dtype=np.int64)
        for c in np.unique(slots):
            where = np.flatnonzero(slots == c)
            need = len(where) * m
            pool = members[c]
            picked = rng.choice(pool, size=need, replace=need > len(pool))
            for k, g in enumerate(where):
                batch[g * m : (g + 1) * m] = picked[k * m : (k + 1) * m]
        out.append(batch[rank * batch_size : (rank + 1) * batch_size])
    return out


@torch.no_grad()
def pca_whitening(x: Tensor, out_dim: int, rcond: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(weight (out_dim, D), bias (out_dim,)) of the linear map that projects `x` (N, D) onto its top principal
    components and scales each to unit variance: ``W = diag(s^-1) U^T``, ``b = -W mean``. Components beyond the
    sample's rank (N - 1), or with a singular value below `rcond` times the largest, get zero weight, so a small
    or degenerate sample never blows up noise directions."""
    x = x.double()
    mean = x.mean(dim=0)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    rank = int((s > s[0] * rcond).sum()) if len(s) else 0
    k = max(0, min(out_dim, rank, len(x) - 1))
    std = s[:k] / max(len(x) - 1, 1) ** 0.5
    weight = torch.zeros(out_dim, x.shape[1], dtype=torch.float64, device=x.device)
    weight[:k] = vt[:k] / std[:, None]
    bias = -(weight @ mean)
    return weight.float(), bias.float()


class MetricLearning(Method):
    """Labeled method: ``training_step(images, labels)`` embeds (augmented) images and applies the loss.

    The criterion gathers embeddings across DDP workers before mining; Embedding Expansion, when enabled,
    adds synthetic points between positive pairs and mines the hardest negatives among all points.
    """

    name = "metric"
    settings_model = MetricSettings
    needs_labels = True

    def __init__(self, backbone, feature_dim, settings, **kwargs: Any) -> None:
        super().__init__(backbone, feature_dim, settings, **kwargs)
        s: MetricSettings = self.settings
        # GeM / NetVLAD on the backbone's feature map instead of its average pooling (exported with the head)
        self.pool = (make_pool(s.pooling, self.feature_dim, clusters=s.netvlad_clusters, gem_p=s.gem_p)
                     if s.pooling != "avg" else None)
        width = self.feature_dim if self.pool is None else pooled_width(self.pool, self.feature_dim)
        self.head = nn.Linear(width, s.embedding_dim)
        self.augment = SimCLRAugment(input_size=self.input_size, **s.augment.model_dump()) if s.augment_views else None
        ee = s.embedding_expansion
        self.criterion = build_criterion(s.loss, s.resolved_miner(), margin=s.margin,
                                         quadruplet_margin2=s.quadruplet_margin2,
                                         expansion_points=ee.points if ee.enabled else 0)
        self._train_labels: np.ndarray | None = None

    def descriptors(self, images: Tensor) -> Tensor:
        """Global descriptors of a [0, 1] batch: the backbone's pooled features, or GeM / NetVLAD of its map."""
        if self.pool is None:
            return self.encode(images)
        x = self.normalize(images).contiguous(memory_format=self.memory_format)
        return self.pool(feature_map(self.backbone, x))

    def embed(self, images: Tensor) -> Tensor:
        """L2-normalized embeddings of a [0, 1] batch (no augmentation)."""
        return F.normalize(self.head(self.descriptors(images)).float(), dim=1)

    def training_step(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Any]:
        if labels is None:
            raise ValueError("metric learning needs labels for every batch")
        if self.augment is not None:
            with torch.no_grad():
                images = self.augment(images)
        return self.criterion(self.embed(images), labels)

    # -- pipeline hooks --------------------------------------------------------------------------
    def set_train_labels(self, labels: np.ndarray) -> None:
        self._train_labels = np.asarray(labels, dtype=np.int64)

    def epoch_batches(self, images: Any, *, epoch: int, rank: int, world_size: int, batch_size: int,
                      seed: int) -> list[np.ndarray]:
        """m-per-class batches; as many as the default sampler gives, ``(N // world_size) // batch_size``,
        so the trainer's step count and LR schedule hold."""
        if self._train_labels is None:
            raise RuntimeError("metric learning: the training labels were not attached (set_train_labels)")
        if isinstance(self.pool, NetVLAD) and not int(self.pool.initialised):
            self._init_netvlad(images, seed)
        n = len(images)
        steps = (n // world_size) // batch_size
        if steps < 1:
            raise ValueError(f"metric: {n} images are too few for {world_size} worker(s) with batches of {batch_size}")
        return m_per_class_batches(self._train_labels, images_per_class=self.settings.images_per_class,
                                   batch_size=batch_size, num_batches=steps, seed=seed, epoch=epoch, rank=rank,
                                   world_size=world_size)

    @torch.no_grad()
    def _init_netvlad(self, images: Any, seed: int, max_images: int = 512, max_descriptors: int = 50_000) -> None:
        """NetVLAD's centres from k-means of the input backbone's L2-normalized local descriptors on a seeded
        sample of the training images (as the paper initialises them). Every rank computes the same sample; under
        DDP rank 0's centres are broadcast so that all ranks start identical."""
        import torch.distributed as dist

        from clustering import kmeans

        device = self.head.weight.device
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(images), size=min(max_images, len(images)), replace=False))
        was_training = self.training
        self.eval()
        try:
            maps = [feature_map(self.backbone, self.normalize(self.eval_view(
                torch.from_numpy(np.asarray(images[rows[i:i + 64]])).to(device))))
                    for i in range(0, len(rows), 64)]
        finally:
            self.train(was_training)
        local = F.normalize(torch.cat(maps).float(), dim=1).permute(0, 2, 3, 1).reshape(-1, maps[0].shape[1])
        local = local[torch.from_numpy(rng.permutation(len(local))[:max_descriptors]).to(local.device)]
        centres = torch.from_numpy(kmeans(local.cpu().numpy(), self.pool.clusters, seed=seed).centroids).to(device)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.broadcast(centres, src=0)
        self.pool.init_centres(centres)
        if self.settings.netvlad_whiten_init:
            weight, bias = pca_whitening(torch.cat([self.pool(m) for m in maps]), self.head.out_features)
            if distributed:
                dist.broadcast(weight, src=0)
                dist.broadcast(bias, src=0)
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)

    def export_module(self) -> tuple[nn.Module, dict[str, Any]]:
        """The retrieval embedder (backbone [+ GeM/NetVLAD] + head, L2-normalized), sharing the method's modules."""
        s: MetricSettings = self.settings
        backbone = self.backbone if self.pool is None else PooledBackbone(self.backbone, self.pool, self.feature_dim)
        embedder = MetricEmbedder(backbone, self.head)
        embedder.training = self.training
        meta = {"export": EXPORT_KIND, "embedding_dim": int(s.embedding_dim), "l2_normalize": True,
                "pooling": s.pooling}
        if s.pooling == "netvlad":
            meta["netvlad_clusters"] = int(s.netvlad_clusters)
        return embedder, meta

    def artifact_extras(self) -> dict[str, Any]:
        s: MetricSettings = self.settings
        return {"metric": {"loss": s.loss, "miner": s.resolved_miner(), "embedding_dim": s.embedding_dim,
                           "pooling": s.pooling,
                           "embedding_expansion": s.embedding_expansion.model_dump()}}
