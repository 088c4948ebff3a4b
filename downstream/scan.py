"""SCAN (Van Gansbeke et al., "SCAN: Learning to Classify Images without Labels", ECCV 2020).

k-means on a frozen embedding is the baseline every deep-clustering paper beats. SCAN instead trains a
clustering head (softmax over C clusters) on top of a pretrained backbone:

- **Phase 1, SCAN loss.** Each image's nearest neighbours in the input's embedding (mined once, before
  training) probably share its class. A batch holds anchors and one random neighbour of each; the loss makes
  their cluster distributions agree, ``-log <p(anchor), p(neighbour)>``, minus ``entropy_weight`` times the
  entropy of the batch's mean distribution, which keeps all images from collapsing into one cluster. Several
  heads train side by side from different initialisations (optionally with over-clustering heads that have
  more clusters); the head with the lowest SCAN loss is kept.
- **Phase 2, self-labelling.** Images the kept head assigns with probability above ``confidence_threshold``
  on a weak view become their own targets for a strongly augmented view (cross-entropy weighted by the
  inverse frequency of each cluster among the confident images, so large clusters do not swallow small
  ones). It corrects the neighbours' mistakes the SCAN loss had to follow.

The backbone is frozen by default (``backbone_lr_scale: 0``, kept in eval mode so its BatchNorm statistics do
not drift); a small rate lets it adapt, as the authors do. The exported module is backbone + kept head and
returns cluster probabilities, so a cluster artifact assigns images with a confidence.

Written after the paper and the authors' public description of their losses; the batch construction and the
phase schedule are ours (they fit the shared training loop: index batches per epoch, one method object).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downstream.augment import ImageAugment
from downstream.settings import ScanSettings
from pretext.base import Method, weight_decay_groups
from pretext.embeddings import embed_sharded, map_chunks
from pretext.transforms import SimCLRAugment, to_float

EXPORT_KIND = "scan_clusterer"
EPS = 1e-8


def scan_loss(anchor_logits: Tensor, neighbour_logits: Tensor, entropy_weight: float) -> dict[str, Tensor]:
    """SCAN's loss for one head: consistency between anchors and neighbours minus weighted entropy of the mean
    cluster distribution. Returns total, consistency and entropy (the entropy is maximal, log C, when the
    batch spreads evenly over the clusters)."""
    anchors = F.softmax(anchor_logits.float(), dim=1)
    neighbours = F.softmax(neighbour_logits.float(), dim=1)
    consistency = -torch.log((anchors * neighbours).sum(dim=1).clamp_min(EPS)).mean()
    mean = anchors.mean(dim=0)
    entropy = -(mean * torch.log(mean.clamp_min(EPS))).sum()
    return {"loss": consistency - entropy_weight * entropy, "consistency": consistency, "entropy": entropy}


def self_label_loss(weak_logits: Tensor, strong_logits: Tensor, threshold: float) -> dict[str, Tensor]:
    """Cross-entropy of the strong view against the weak view's confident predictions, each cluster weighted
    by its inverse frequency among them. With no confident image the loss is a zero that keeps the graph."""
    probs = F.softmax(weak_logits.detach().float(), dim=1)
    confidence, target = probs.max(dim=1)
    mask = confidence > threshold
    share = mask.float().mean()
    if not bool(mask.any()):
        return {"loss": strong_logits.sum() * 0.0, "confident_share": share}
    clusters = strong_logits.shape[1]
    counts = torch.bincount(target[mask], minlength=clusters).float()
    weight = torch.where(counts > 0, counts.sum() / counts.clamp_min(1.0), torch.zeros_like(counts))
    loss = F.cross_entropy(strong_logits[mask].float(), target[mask], weight=weight)
    return {"loss": loss, "confident_share": share}


def pair_batches(neighbours: np.ndarray, *, steps: int, batch_size: int, seed: int, epoch: int, rank: int,
                 world_size: int) -> list[np.ndarray]:
    """`steps` index batches for this rank: the first half anchors (a seeded permutation shared by all ranks,
    each rank taking its own slice), the second half one random neighbour of each anchor."""
    n = len(neighbours)
    half = batch_size // 2
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(n)[rank::world_size]
    need = steps * half
    anchors = np.resize(order, need) if len(order) < need else order[:need]
    pick = np.random.default_rng([int(seed), int(epoch), int(rank)]).integers(0, neighbours.shape[1], size=need)
    partners = neighbours[anchors, pick]
    return [np.concatenate([anchors[s * half:(s + 1) * half], partners[s * half:(s + 1) * half]])
            for s in range(steps)]


class ClusterHeads(nn.Module):
    """`num_heads` linear heads with `clusters` outputs each (plus the over-clustering heads, if any)."""

    def __init__(self, feature_dim: int, clusters: int, num_heads: int, overclusters: int = 0) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(feature_dim, clusters) for _ in range(num_heads))
        self.over = nn.ModuleList(nn.Linear(feature_dim, overclusters) for _ in range(num_heads if overclusters else 0))

    def forward(self, features: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        return [h(features) for h in self.heads], [h(features) for h in self.over]


class ScanClusterer(nn.Module):
    """The exported cluster model: backbone -> one head -> cluster probabilities (B, C)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return F.softmax(self.head(self.backbone(x)).float(), dim=1)


def rebuild_exported(backbone: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """The empty exported module around a fresh backbone (pipeline.backbones.load_backbone fills it)."""
    return ScanClusterer(backbone, nn.Linear(int(meta["feature_dim"]), int(meta["clusters"])))


class SCAN(Method):
    name = "scan"
    settings_model = ScanSettings
    needs_neighbours = True  # the training loop hands over the mined neighbours (set_neighbours)
    wants_rows = True  # phase 1 on cached features looks up each batch's rows

    def __init__(self, backbone, feature_dim, settings, **kwargs: Any) -> None:
        super().__init__(backbone, feature_dim, settings, **kwargs)
        s: ScanSettings = self.settings
        if not s.clusters:
            raise ValueError("scan: settings.clusters must be set (the cluster stage fills it in)")
        self.heads = ClusterHeads(self.feature_dim, s.clusters, s.num_heads, s.overclusters)
        self.augment = SimCLRAugment(input_size=self.input_size, **s.augment.model_dump())
        self.weak = SimCLRAugment(input_size=self.input_size, min_scale=s.augment.min_scale, hf_prob=0.5,
                                  cj_prob=0.0, random_gray_scale=0.0, gaussian_blur=0.0)
        self.strong = ImageAugment(s.strong_augment)
        self.frozen = s.backbone_lr_scale == 0.0
        if self.frozen:
            self.backbone.requires_grad_(False)
        # Running SCAN loss per head (phase 1) and the head kept for phase 2 and export; buffers, so that they
        # are checkpointed and, under DDP, broadcast from rank 0.
        self.register_buffer("head_loss", torch.zeros(s.num_heads))
        self.register_buffer("kept_head", torch.zeros((), dtype=torch.long))
        self.phase = "scan"
        self.neighbours: np.ndarray | None = None
        # Frozen backbone + feature_cache: every training image's features, computed once (`cache_features`);
        # not a buffer: rebuilt from the images on resume, never checkpointed.
        self.cached: Tensor | None = None

    # -- the loop's hooks --------------------------------------------------------------------------
    def set_neighbours(self, neighbours: np.ndarray) -> None:
        self.neighbours = np.asarray(neighbours, dtype=np.int64)

    def train(self, mode: bool = True) -> "SCAN":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics
        return self

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        groups = weight_decay_groups(self.heads.parameters(), weight_decay)
        if not self.frozen:
            for group in weight_decay_groups(self.backbone.parameters(), weight_decay):
                groups.append({**group, "lr_scale": self.settings.backbone_lr_scale})
        return groups

    def epoch_batches(self, images: Any, *, epoch: int, rank: int, world_size: int, batch_size: int,
                      seed: int) -> list | None:
        """Phase 1: anchor + neighbour batches, as many as the default sampler gives (the LR schedule and DDP
        stay in lockstep). Phase 2: the default shuffled batches. Choosing the kept head happens here, once,
        when phase 2 begins (every rank holds rank 0's running losses: DDP broadcasts buffers)."""
        scan_phase = epoch < self.settings.scan_epochs
        if not scan_phase and self.phase == "scan":
            self.kept_head.fill_(int(torch.argmin(self.head_loss)))
        self.phase = "scan" if scan_phase else "selflabel"
        if not scan_phase:
            return None
        if self.neighbours is None or len(self.neighbours) != len(images):
            raise ValueError("scan: the mined neighbours do not match the training images")
        if self.uses_cache and self.cached is None:
            self.cache_features(images, rank=rank, world_size=world_size)
        steps = (len(images) // world_size) // batch_size
        return pair_batches(self.neighbours, steps=steps, batch_size=batch_size, seed=seed, epoch=epoch,
                            rank=rank, world_size=world_size)

    @property
    def uses_cache(self) -> bool:
        return self.frozen and self.settings.feature_cache

    @torch.no_grad()
    def cache_features(self, images: Any, *, rank: int = 0, world_size: int = 1, batch_size: int = 256) -> None:
        """The frozen backbone's features of every training image as it is (resized, normalized, eval mode):
        exactly what the exported clusterer computes when it assigns them. Each rank embeds a share; all get
        every row (:func:`pretext.embeddings.embed_sharded`)."""
        device = next(self.heads.parameters()).device
        was_training = self.training
        self.eval()
        try:
            features = embed_sharded(
                lambda rows: map_chunks(lambda batch: self.encode(self.eval_view(batch)), rows, dim=self.feature_dim,
                                        batch_size=batch_size, device=device),
                images, rank=rank, world_size=world_size, device=device)
        finally:
            self.train(was_training)
        self.cached = torch.from_numpy(features).to(device)

    # -- training ----------------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        if self.frozen:
            with torch.no_grad():
                return self.encode(x)
        return self.encode(x)

    def training_step(self, images: Tensor, rows: Tensor | None = None) -> dict[str, Any]:
        return self._scan_step(images, rows) if self.phase == "scan" else self._self_label_step(images)

    def _scan_step(self, images: Tensor, rows: Tensor | None = None) -> dict[str, Any]:
        half = images.shape[0] // 2
        if self.uses_cache and self.cached is not None and rows is not None:
            feats = self.cached[rows.to(self.cached.device)]
        else:
            with torch.no_grad():
                views = self.augment(to_float(images))
            feats = self.features(views)
        heads, over = self.heads(feats)
        s: ScanSettings = self.settings
        terms = [scan_loss(h[:half], h[half:2 * half], s.entropy_weight) for h in heads]
        over_terms = [scan_loss(h[:half], h[half:2 * half], s.entropy_weight) for h in over]
        loss = torch.stack([t["loss"] for t in terms + over_terms]).sum()
        with torch.no_grad():
            current = torch.stack([t["loss"].detach() for t in terms])
            if bool(self.head_loss.any()):
                self.head_loss.mul_(0.9).add_(0.1 * current)
            else:  # the first step
                self.head_loss.copy_(current)
            best = int(torch.argmin(self.head_loss))
            confident = (F.softmax(heads[best].detach().float(), dim=1).max(dim=1).values
                         > s.confidence_threshold).float().mean()
        return {"loss": loss, "consistency": terms[best]["consistency"].detach(),
                "entropy": terms[best]["entropy"].detach(), "confident_share": confident}

    def _self_label_step(self, images: Tensor) -> dict[str, Any]:
        with torch.no_grad():
            x = to_float(images)
            weak = self.weak(x)
            strong = self.weak(x)
            strong_u8 = (strong * 255.0).round().to(torch.uint8).cpu()
            strong = to_float(self.strong(strong_u8).to(x.device))
        kept = int(self.kept_head)
        heads, over = self.heads(self.features(torch.cat([weak, strong])))
        n = weak.shape[0]
        out = self_label_loss(heads[kept][:n], heads[kept][n:], self.settings.confidence_threshold)
        # The other heads get a zero-weighted term: every parameter stays in the graph, as DDP requires.
        unused = sum(h.sum() for i, h in enumerate(heads) if i != kept) + sum(h.sum() for h in over)
        probs = F.softmax(heads[kept][:n].detach().float(), dim=1).mean(dim=0)
        entropy = -(probs * torch.log(probs.clamp_min(EPS))).sum()
        return {"loss": out["loss"] + 0.0 * unused, "confident_share": out["confident_share"], "entropy": entropy}

    # -- export --------------------------------------------------------------------------------------
    def export_module(self) -> tuple[nn.Module, dict[str, Any]]:
        kept = int(self.kept_head) if self.phase == "selflabel" else int(torch.argmin(self.head_loss))
        meta = {"export": EXPORT_KIND, "clusters": int(self.settings.clusters), "kept_head": kept}
        return ScanClusterer(self.backbone, self.heads.heads[kept]), meta

    @torch.no_grad()
    def cluster_probabilities(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Probabilities (N, C) of the kept head on [0, 1] images at input size (eval mode restored after)."""
        module, _ = self.export_module()
        was_training = self.training
        self.eval()
        try:
            return torch.cat([module(self.normalize(images[i:i + batch_size]))
                              for i in range(0, len(images), batch_size)])
        finally:
            self.train(was_training)
