"""STML: Self-Taught Metric Learning without Labels (Kim, Kim, Cho & Kwak, CVPR 2022).

A teacher (EMA of the student's backbone and big head g) embeds the views of a batch; the
*contextualized* similarity of every pair (pairwise Gaussian affinity plus agreement of k-reciprocal
neighbour sets) becomes a soft pseudo label, and the student learns from it with a relaxed contrastive
loss on both of its heads, f (small, kept for retrieval) and g (big, training only). A KL term distils
g's batch structure into f. Batches are built from neighbourhoods in the current embedding
(:func:`neighbour_batches`), so that every batch has real positives to find.

Where the paper leaves room, this module follows the authors' code (github.com/tjddus9597/STML-CVPR22,
``code/loss.py``, ``code/main.py``, ``code/net/*.py``, ``code/dataset/sampler.py``):

- Views are laid out view-major: row ``v * B + i`` is view ``v`` of image ``i`` (``torch.cat(views)``).
- k' = k * views nearest neighbours, *self included* (a point is its own nearest neighbour), and all
  views of an image are forced into each other's k' set (their affinity is set to 1 for ranking only;
  W keeps the real W_P). k' is capped at the batch size.
- k-reciprocal sets R(i) = {j in kNN(i) : i in kNN(j)} therefore contain i.
- Query expansion averages the W~ rows of the ``round(k'/2)`` nearest neighbours (self included; numpy
  rounding, half to even, at least 1; for the usual even k' this is k'/2).
- Ties in the ranking (self vs. the other views, all at affinity 1) are broken self first, then by
  index, so results are deterministic (the authors' ``torch.topk`` leaves them to the kernel).
- Student distances are divided by their row mean taken over all B entries, the zero diagonal included
  (``d / d.mean(1)``); losses average over the B(B-1) off-diagonal pairs. The student embeddings are
  not L2-normalized in the losses (authors' default ``student_norm=0``); teacher g embeddings are.
- The KL term is KL(softmax(-d^g_i) || softmax(-d^f_i)) with temperature 1, over full rows (the
  diagonal, distance 0, included), summed over rows and divided by B; the g side is detached.
- The total is (RC(f) + RC(g)) / 2 + KL (``rc_weight`` and ``kl_weight``, both 1, scale the two terms).
- Pooling is global average + global max pooling, summed (``pooling: gap`` keeps the average alone, for
  small images whose last feature map is 2x2); heads are linear with orthogonal init and
  zero bias. The teacher runs in eval mode, and its BN buffers follow the student's by the same EMA as
  its weights (the authors' ``Momentum_Update`` over the state dict).
- The EMA uses the post-step student weights (our ``after_optimizer_step`` contract; the authors update
  just before ``opt.step()``, a one-step lag).

With these choices the losses equal the authors' ``STML_loss`` on random batches to float32 rounding.

Pipeline hooks: :meth:`STML.epoch_batches` re-embeds the training images every epoch and returns this
rank's neighbourhood batches; :meth:`STML.export_module` exports the retrieval embedder
(:class:`STMLEmbedder`, rebuilt by :func:`rebuild_exported`).

The paper fine-tunes an ImageNet-pretrained backbone; in this pipeline STML is meant as a refinement
stage on a pretrained backbone (e.g. after MoCo). From scratch it trains, but the teacher's eval-mode BN
statistics lag the student's for the first few thousand steps.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import Tensor, nn

from pretext.base import Method
from pretext.embeddings import embed_images, embed_sharded
from pretext.settings import STMLSettings
from pretext.transforms import SimCLRAugment

__all__ = [
    "STML",
    "STMLEmbedder",
    "pooled_features",
    "contextualized_similarity",
    "pseudo_label_stats",
    "relaxed_contrastive_loss",
    "self_distillation_kl",
    "neighbour_batches",
    "neighbour_batch_count",
    "embed_for_sampling",
    "rebuild_exported",
    "EXPORT_KIND",
]


# -- embedding network ----------------------------------------------------------------------------

POOLINGS = ("gap+gmp", "gap", "gem")
GEM_P = 3.0  # STML's GeM exponent: fixed, so the momentum teacher needs no copy of it


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _off_diagonal(n: int, device: torch.device) -> Tensor:
    """Boolean mask of the pairs i != j of an n x n matrix."""
    return ~torch.eye(n, dtype=torch.bool, device=device)


def pooled_features(backbone: nn.Module, x: Tensor, pooling: str = "gap+gmp") -> Tensor:
    """GAP + GMP (summed; the authors'), GAP alone or GeM (p = 3) of the backbone's last feature map, (B, C); not
    timm's pooling.

    Uses ``backbone.forward_features`` (timm) when there is one: (B, C, h, w) maps are pooled over space,
    (B, T, C) token sequences over tokens; a backbone without it must return pooled (B, C) features.
    """
    _check_pooling(pooling)
    forward_features = getattr(backbone, "forward_features", None)
    feats = forward_features(x) if callable(forward_features) else backbone(x)
    if feats.dim() in (3, 4):
        dims = (2, 3) if feats.dim() == 4 else (1,)
        if pooling == "gem":  # GeM (pretext.pooling): (mean x^p)^(1/p) over space or tokens
            return feats.float().clamp(min=1e-6).pow(GEM_P).mean(dim=dims).pow(1.0 / GEM_P)
        pooled = feats.mean(dim=dims)
        return pooled + feats.amax(dim=dims) if pooling == "gap+gmp" else pooled
    if feats.dim() == 2:
        return feats
    raise ValueError(f"cannot pool backbone features of shape {tuple(feats.shape)}")


def _orthogonal_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """The authors' head init: orthogonal weight, zero bias (keeps initial distances undistorted)."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.orthogonal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class STMLEmbedder(nn.Module):
    """Backbone -> pooling (GAP+GMP or GAP) -> linear head -> L2 normalization: STML's retrieval embedding.

    Takes the same input as the backbone (normalized by the method's mean/std, as evaluation prepares
    it), so it drops in wherever a backbone artifact is embedded; ``num_features`` is the output width.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, *, normalize: bool = True,
                 pooling: str = "gap+gmp") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.normalize_output = bool(normalize)
        _check_pooling(pooling)
        self.pooling = pooling
        self.num_features = int(head.out_features)

    def forward(self, x: Tensor) -> Tensor:
        z = self.head(pooled_features(self.backbone, x, self.pooling)).float()
        return F.normalize(z, dim=1) if self.normalize_output else z


EXPORT_KIND = "stml_embedder"


def rebuild_exported(backbone: nn.Module, meta: dict[str, Any]) -> STMLEmbedder:
    """The module of an STML artifact around a freshly built backbone; load the artifact's state dict into it.

    ``meta`` is the artifact metadata: ``feature_dim`` (the backbone's), ``embedding_dim`` and ``pooling``.
    """
    if meta.get("export") != EXPORT_KIND:
        raise ValueError(f"not an STML export: export={meta.get('export')!r}")
    head = nn.Linear(int(meta["feature_dim"]), int(meta["embedding_dim"]))
    return STMLEmbedder(backbone, head, normalize=bool(meta.get("l2_normalize", True)),
                        pooling=str(meta.get("pooling", "gap+gmp")))


# -- pseudo labels ---------------------------------------------------------------------------------

def _at_least_fp32(x: Tensor) -> Tensor:
    """Half/bf16 -> float32, float64 kept (so exact checks can run in double precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _pairwise_distances(x: Tensor) -> Tensor:
    """Euclidean distances, (B, B), computed directly rather than via |x|^2 + |y|^2 - 2xy.

    Why: the matmul form (and TF32) loses the exact zero diagonal and reorders near ties, which would
    change kNN ranks; batches are small, so the direct form costs little.
    """
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")


def view_identity(batch_size: int, views: int, device: torch.device | str | None = None) -> Tensor:
    """Image index of every row of a view-major batch: row v * batch_size + i -> i."""
    return torch.arange(batch_size, device=device).repeat(views)


@torch.no_grad()
def contextualized_similarity(
    t: Tensor,
    k: int,
    views: int,
    sigma: float,
    *,
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """STML's pseudo labels W (N, N), symmetric, in [0, 1], from teacher embeddings ``t`` (N, D).

    ``t`` holds ``views`` views of N / views images, view-major (row v * B + i is view v of image i);
    pass L2-normalized embeddings (the method does), they are used as given. With k' = min(k * views, N):

    - W_P(i, j) = exp(-||t_i - t_j||^2 / sigma);
    - kNN(i): the k' highest W_P in row i, where the views of i's image (i included) rank first;
    - R(i) = {j in kNN(i) : i in kNN(j)} (k-reciprocal; contains i);
    - W~(i, j) = |R(i) & R(j)| / |R(i)| for j in R(i), else 0;
    - W^(i) = mean of W~(n) over the round(k'/2) nearest n of i (query expansion, self included);
    - W_C = (W^ + W^T) / 2 and W = (W_P + W_C) / 2.

    ``return_parts`` also returns a dict with W_P, knn (N, k') ranked indices, reciprocal (N, N) bool,
    W_tilde, W_hat and W_C, for inspection and tests. No gradient flows (these are labels).
    """
    if t.dim() != 2:
        raise ValueError(f"t must be (N, D), got {tuple(t.shape)}")
    n = t.shape[0]
    if k < 1 or views < 1 or n % views != 0:
        raise ValueError(f"need k >= 1, views >= 1 and N divisible by views; got k={k}, views={views}, N={n}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    t = _at_least_fp32(t.detach())
    device = t.device
    w_p = torch.exp(-_pairwise_distances(t).pow(2) / sigma)

    ident = view_identity(n // views, views, device)
    same_image = ident[:, None] == ident[None, :]
    # Ranking score: views of the same image are forced to the top (the authors set their affinity to 1);
    # 2 on the diagonal and a stable sort make the order of these ties "self, then other views by index".
    score = torch.where(same_image, torch.ones_like(w_p), w_p)
    score.fill_diagonal_(2.0)
    k_prime = min(k * views, n)
    knn = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k_prime]
    half = max(1, int(np.around(k_prime / 2)))

    in_knn = torch.zeros(n, n, dtype=torch.bool, device=device)
    in_knn.scatter_(1, knn, True)
    reciprocal = in_knn & in_knn.t()
    r = reciprocal.float()
    overlap = r @ r.t()  # |R(i) & R(j)|
    w_tilde = r * overlap / r.sum(dim=1, keepdim=True)  # |R(i)| >= 1: i is in R(i)
    w_hat = w_tilde[knn[:, :half]].mean(dim=1)
    w_c = 0.5 * (w_hat + w_hat.t())
    w = 0.5 * (w_p + w_c)
    if return_parts:
        parts = {"W_P": w_p, "knn": knn, "reciprocal": reciprocal, "W_tilde": w_tilde, "W_hat": w_hat, "W_C": w_c}
        return w, parts
    return w


def pseudo_label_stats(W: Tensor, parts: dict[str, Tensor]) -> dict[str, Tensor]:
    """How informative a batch's pseudo labels are, without labels (logged every epoch by the trainer).

    - ``pseudo_label_mean`` / ``pseudo_label_std``: of W over the pairs i != j. A small std means flat
      labels: every pair is pulled and pushed alike, and the student learns little but uniformity (a sigma too
      large for how close the teacher's unit embeddings lie).
    - ``reciprocal_fraction``: |R(i)| / k' averaged over i, the share of each k'-nearest set that is reciprocal.
      i and its other views always are, so the floor is views / k' (0.2 at k = 5, 2 views), not 0. Low when the
      views are so unlike their images that neighbourhoods do not survive augmentation, which leaves W_C near
      zero.
    """
    n = W.shape[0]
    off_diagonal = W[_off_diagonal(n, W.device)]
    k_prime = parts["knn"].shape[1]
    reciprocal = parts["reciprocal"].float().sum(dim=1) / k_prime
    return {"pseudo_label_mean": off_diagonal.mean(), "pseudo_label_std": off_diagonal.std(),
            "reciprocal_fraction": reciprocal.mean()}


# -- losses ----------------------------------------------------------------------------------------

def mean_normalized_distances(emb: Tensor) -> Tensor:
    """Pairwise distances divided by their row mean over all B entries (zero diagonal included).

    Why: makes the loss invariant to the embedding's scale, so the margin delta means "relative to a
    typical distance in this batch"; the mean over B (not B - 1) is the authors' ``d.mean(1)``.
    """
    d = _pairwise_distances(emb)
    return d / d.mean(dim=1, keepdim=True).clamp_min(1e-12)


def relaxed_contrastive_loss(emb: Tensor, W: Tensor, delta: float) -> Tensor:
    """Mean over i != j of  W_ij d_ij^2 + (1 - W_ij) max(0, delta - d_ij)^2  on mean-normalized distances.

    Soft labels W pull similar pairs together and push dissimilar ones beyond delta, in proportion.
    """
    n = emb.shape[0]
    if n < 2:
        raise ValueError("the relaxed contrastive loss needs at least 2 embeddings")
    if W.shape != (n, n):
        raise ValueError(f"W must be ({n}, {n}), got {tuple(W.shape)}")
    d = mean_normalized_distances(_at_least_fp32(emb))
    W = W.to(d.dtype)
    off_diagonal = _off_diagonal(n, d.device)
    pull = W * d.pow(2)
    push = (1.0 - W) * torch.relu(delta - d).pow(2)
    return (pull + push)[off_diagonal].sum() / (n * (n - 1))


def self_distillation_kl(emb_f: Tensor, emb_g: Tensor) -> Tensor:
    """KL(softmax(-d^g_i) || softmax(-d^f_i)) summed over rows / B, temperature 1, g side detached.

    Why: the big head g models the batch structure more easily; f (the kept embedding) is taught to
    rank neighbours like g without g being pulled toward f.
    """
    n = emb_f.shape[0]
    log_q = F.log_softmax(-mean_normalized_distances(_at_least_fp32(emb_f)), dim=1)
    log_p = F.log_softmax(-mean_normalized_distances(_at_least_fp32(emb_g.detach())), dim=1).to(log_q.dtype)
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True) / n


# -- the method ------------------------------------------------------------------------------------

@torch.no_grad()
def _ema_buffers(student: nn.Module, teacher: nn.Module, m: float) -> None:
    """EMA of floating buffers (BN running stats), copy of the others (num_batches_tracked)."""
    for b_s, b_t in zip(student.buffers(), teacher.buffers()):
        if b_t.dtype.is_floating_point:
            b_t.mul_(m).add_(b_s.to(b_t.dtype), alpha=1.0 - m)
        else:
            b_t.copy_(b_s)


def _batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _first_conv_channels(module: nn.Module) -> int | None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            return int(layer.in_channels)
    return None


class STML(Method):
    """Student backbone with heads f and g; teacher = EMA(backbone, g). See the module docstring.

    ``training_step(images)`` takes a neighbourhood batch (from :func:`neighbour_batches`; the loss
    does not depend on the order inside it), makes ``views`` augmented views of every image and
    returns ``{"loss", "loss_rc", "loss_kl"}`` and the batch's :func:`pseudo_label_stats`.
    """

    name = "stml"
    settings_model = STMLSettings

    def __init__(self, backbone, feature_dim, settings, **kwargs: Any) -> None:
        super().__init__(backbone, feature_dim, settings, **kwargs)
        s: STMLSettings = self.settings
        self.views = int(s.views)
        self.augment = SimCLRAugment(input_size=self.input_size, **s.augment.model_dump())
        self.f = _orthogonal_linear(self.feature_dim, s.embedding_dim)
        self.g = _orthogonal_linear(self.feature_dim, s.big_embedding_dim)
        if s.bn_freeze:
            for norm in _batch_norms(self.backbone):
                norm.requires_grad_(False)
        # The teacher starts as an exact copy (also of a backbone loaded from an earlier stage).
        self.teacher_backbone = copy.deepcopy(self.backbone)
        self.teacher_g = copy.deepcopy(self.g)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_g)
        self.teacher_backbone.eval()
        self.teacher_g.eval()

    def train(self, mode: bool = True) -> "STML":
        """The teacher always runs in eval mode (EMA'd BN statistics), as in the authors' code; with
        ``bn_freeze`` so do the student backbone's BatchNorm layers."""
        super().train(mode)
        if self.settings.bn_freeze:
            for norm in _batch_norms(self.backbone):
                norm.eval()
        self.teacher_backbone.eval()
        self.teacher_g.eval()
        return self

    # -- pieces ----------------------------------------------------------------------------------
    def student_embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f, g) student embeddings of a normalized batch, not L2-normalized (as the authors train)."""
        feats = pooled_features(self.backbone, x, self.settings.pooling)
        return self.f(feats), self.g(feats)

    @torch.no_grad()
    def teacher_embed(self, x: Tensor) -> Tensor:
        """L2-normalized teacher g embeddings (float32) of a normalized batch."""
        feats = pooled_features(self.teacher_backbone, x, self.settings.pooling)
        return F.normalize(self.teacher_g(feats).float(), dim=1)

    def make_views(self, images: Tensor) -> Tensor:
        """``views`` augmented copies, view-major (row v * B + i is view v of image i), normalized."""
        with torch.no_grad():
            x = self.augment(images.repeat(self.views, 1, 1, 1))
            return self.normalize(x).contiguous(memory_format=self.memory_format)

    # -- contract --------------------------------------------------------------------------------
    def training_step(self, images: Tensor) -> dict[str, Any]:
        s: STMLSettings = self.settings
        x = self.make_views(images)
        emb_f, emb_g = self.student_embed(x)
        t = self.teacher_embed(x)  # the teacher sees the very same views as the student
        # Distances, kNN ranks and softmaxes in fp32 even under bf16 autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            emb_f, emb_g = emb_f.float(), emb_g.float()
            W, parts = contextualized_similarity(t, s.num_neighbors, self.views, s.sigma, return_parts=True)
            loss_rc = 0.5 * (relaxed_contrastive_loss(emb_f, W, s.delta) + relaxed_contrastive_loss(emb_g, W, s.delta))
            loss_kl = self_distillation_kl(emb_f, emb_g)
            loss = s.rc_weight * loss_rc + s.kl_weight * loss_kl
        return {"loss": loss, "loss_rc": loss_rc.detach(), "loss_kl": loss_kl.detach(),
                **pseudo_label_stats(W, parts)}

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        """Teacher <- momentum * teacher + (1 - momentum) * student, weights and BN statistics alike."""
        m = float(self.settings.momentum)
        update_momentum(self.backbone, self.teacher_backbone, m)
        update_momentum(self.g, self.teacher_g, m)
        _ema_buffers(self.backbone, self.teacher_backbone, m)
        _ema_buffers(self.g, self.teacher_g, m)

    def embedder(self, head: Literal["f", "g"] = "f", *, copy_modules: bool = True,
                 normalize: bool = True) -> STMLEmbedder:
        """The embedding network: backbone + pooling + head f, L2-normalized unless ``normalize=False``.

        ``copy_modules`` (default) returns an independent copy in eval mode, safe to save; without it
        the modules are shared with the method (for embedding the training set during training).
        ``head="g"`` gives the big head (what the authors' sampler embeds with).
        """
        if head not in ("f", "g"):
            raise ValueError(f"head must be 'f' or 'g', got {head!r}")
        backbone, linear = self.backbone, (self.f if head == "f" else self.g)
        if copy_modules:
            return STMLEmbedder(copy.deepcopy(backbone), copy.deepcopy(linear), normalize=normalize,
                                pooling=self.settings.pooling).eval()
        shared = STMLEmbedder(backbone, linear, normalize=normalize, pooling=self.settings.pooling)
        shared.training = self.training  # so that toggling eval/train on it restores the method's mode
        return shared

    def artifact_extras(self) -> dict[str, Any]:
        s: STMLSettings = self.settings
        return {"stml": {"embedding_dim": s.embedding_dim, "pooling": s.pooling, "head": "f",
                         "l2_normalized": bool(s.normalize_embedding)}}

    # -- pipeline hooks --------------------------------------------------------------------------
    def epoch_batches(
        self, images: Any, *, epoch: int, rank: int, world_size: int, batch_size: int, seed: int
    ) -> list[np.ndarray]:
        """Nearest-neighbour batches from the student's current g embeddings of all ``images``.

        Re-embedded every epoch, as the authors do; with several ranks each embeds its share and the shares
        are all-gathered (:func:`embed_shared`), so every rank holds the same embeddings. As many batches as the default sampler gives, ``(N // world_size) //
        batch_size``, so the trainer's step count and LR schedule hold: that takes ``steps * ceil(batch_size
        / k) * world_size`` queries (about N / k), a fresh random subset every epoch -- the authors' epoch.
        """
        n = len(images)
        steps = (n // world_size) // batch_size
        if steps < 1:
            raise ValueError(f"stml: {n} images are too few for {world_size} worker(s) with batches of {batch_size}")
        k = int(self.settings.num_neighbors)
        num_queries = min(n, steps * math.ceil(batch_size / k) * world_size)
        embeddings = embed_shared(self, images, rank=rank, world_size=world_size)
        return neighbour_batches(embeddings, num_neighbors=k, batch_size=batch_size, seed=seed, epoch=epoch,
                                 rank=rank, world_size=world_size, num_queries=num_queries)

    def export_module(self) -> tuple[nn.Module, dict[str, Any]]:
        """The retrieval embedder (backbone + pooling + f), sharing the method's modules.

        f is exported as trained -- not L2-normalized, compared by Euclidean distance, as the authors
        evaluate it -- unless ``normalize_embedding`` is set.

        Its state dict holds ``backbone.*`` and ``head.*``; :func:`rebuild_exported` makes the empty module
        back from a timm backbone and these facts.
        """
        s: STMLSettings = self.settings
        normalize = bool(s.normalize_embedding)
        meta = {"export": EXPORT_KIND, "embedding_dim": int(s.embedding_dim), "pooling": s.pooling,
                "l2_normalize": normalize}
        return self.embedder("f", copy_modules=False, normalize=normalize), meta


# -- neighbourhood batches -------------------------------------------------------------------------

def _check_sampler_args(num_images: int, num_neighbors: int, batch_size: int, world_size: int,
                        num_queries: int | None) -> int:
    if num_neighbors < 1:
        raise ValueError(f"num_neighbors must be >= 1, got {num_neighbors}")
    if not 1 <= batch_size <= num_images:
        raise ValueError(f"batch_size must be in [1, {num_images}] (distinct images per batch), got {batch_size}")
    queries = num_images if num_queries is None else int(num_queries)
    if not 1 <= queries <= num_images:
        raise ValueError(f"num_queries must be in [1, {num_images}], got {num_queries}")
    if not 1 <= world_size <= queries:
        raise ValueError(f"world_size must be in [1, {queries}] (a query per rank at least), got {world_size}")
    return queries


def neighbour_batch_count(num_images: int, *, num_neighbors: int, batch_size: int, world_size: int = 1,
                          num_queries: int | None = None) -> int:
    """Batches per rank and epoch of :func:`neighbour_batches`; depends on sizes only, not on embeddings.

    Why a separate function: the trainer needs steps per epoch (LR schedule) before any embedding exists.
    """
    queries = _check_sampler_args(num_images, num_neighbors, batch_size, world_size, num_queries)
    per_rank = math.ceil(queries / world_size)
    groups_per_batch = math.ceil(batch_size / num_neighbors)
    return math.ceil(per_rank / groups_per_batch)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN/inf values")
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    return x


def neighbour_batches(
    embeddings: np.ndarray,
    *,
    num_neighbors: int,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    num_queries: int | None = None,
    search_chunk: int = 4096,
    return_queries: bool = False,
) -> list[np.ndarray] | tuple[list[np.ndarray], list[np.ndarray]]:
    """One epoch of STML batches for ``rank``: lists of ``batch_size`` distinct indices into ``embeddings``.

    Semantics:

    - Queries: a permutation of all N images drawn from (seed, epoch) -- the same on every rank -- cut to
      ``num_queries`` (default N: every image is a query once per epoch); rank r takes every
      ``world_size``-th of them from position r, so the ranks' query sets are disjoint and together cover
      the queries. Each rank gets :func:`neighbour_batch_count` batches (DDP stays in lockstep): a rank
      with fewer queries pads its last slots with repeats of its own queries.
    - A batch is ``ceil(batch_size / num_neighbors)`` groups. A group is the query followed by its
      nearest neighbours by cosine similarity (exact faiss search), ``num_neighbors`` images in all with
      the query counted -- the query is its own nearest neighbour, as in the authors' sampler and in the
      k' = k * views of the loss. Images already in the batch are skipped (no duplicates) and the next
      nearest are taken; a query already placed as someone else's neighbour heads no group and adds
      ``num_neighbors`` of its nearest free neighbours instead. The last group is cut to fill exactly
      ``batch_size``.

    ``return_queries`` also returns each batch's queries in slot order. Embeddings can be any (N, D)
    (rows are L2-normalized here); the authors embed with the student's g head (see
    :func:`embed_for_sampling`) and search Euclidean on raw embeddings -- cosine is used here.
    """
    from pretext.search import inner_product_index

    x = _unit_rows(embeddings)
    n = x.shape[0]
    queries_total = _check_sampler_args(n, num_neighbors, batch_size, world_size, num_queries)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    num_batches = neighbour_batch_count(n, num_neighbors=num_neighbors, batch_size=batch_size,
                                        world_size=world_size, num_queries=num_queries)
    groups = math.ceil(batch_size / num_neighbors)

    rng = np.random.default_rng([int(seed), int(epoch)])
    mine = rng.permutation(n)[:queries_total][rank::world_size].astype(np.int64)
    slots = np.empty(num_batches * groups, dtype=np.int64)
    slots[: len(mine)] = mine
    missing = len(slots) - len(mine)
    if missing:
        # Pad with this rank's own queries (disjointness across ranks is kept), preferring ones not already
        # in the last, partly filled batch.
        pad_rng = np.random.default_rng([int(seed), int(epoch), int(rank)])
        pool = pad_rng.permutation(mine)
        partial = mine[(len(mine) // groups) * groups :]
        pool = np.concatenate([pool[~np.isin(pool, partial)], pool[np.isin(pool, partial)]])
        slots[len(mine) :] = np.resize(pool, missing)

    # With fewer than batch_size images placed, the nearest batch_size + num_neighbors always hold enough
    # free ones, so one exact search per query suffices.
    k_search = min(n, batch_size + num_neighbors)
    index = inner_product_index(np.ascontiguousarray(x, dtype=np.float32), k_search)  # GPU when faiss has one

    batches: list[np.ndarray] = []
    batch_queries: list[np.ndarray] = []
    slots_per_chunk = max(1, search_chunk // groups) * groups
    for start in range(0, len(slots), slots_per_chunk):
        chunk = slots[start : start + slots_per_chunk]
        _, neighbours = index.search(x[chunk], k_search)
        for b in range(0, len(chunk), groups):
            placed: set[int] = set()
            batch: list[int] = []
            for q, row in zip(chunk[b : b + groups].tolist(), neighbours[b : b + groups]):
                size = min(num_neighbors, batch_size - len(batch))
                if size <= 0:
                    break
                target = len(batch) + size
                if q not in placed:
                    placed.add(q)
                    batch.append(q)
                for c in row.tolist():
                    if len(batch) == target:
                        break
                    if c >= 0 and c != q and c not in placed:
                        placed.add(c)
                        batch.append(c)
            batches.append(np.asarray(batch, dtype=np.int64))
            batch_queries.append(chunk[b : b + groups].copy())
    if return_queries:
        return batches, batch_queries
    return batches


def embed_shared(method: "STML", images: Any, *, rank: int, world_size: int) -> np.ndarray:
    """All N student embeddings for the sampler on every rank, each rank embedding its share
    (:func:`pretext.embeddings.embed_sharded`)."""
    return embed_sharded(lambda rows: embed_for_sampling(method, rows), images, rank=rank, world_size=world_size,
                         device=next(method.parameters()).device)


@torch.no_grad()
def embed_for_sampling(
    method: STML,
    images: np.ndarray,
    *,
    head: Literal["f", "g"] = "g",
    in_chans: int | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Student embeddings (N, D) float32 of uint8 (N, C, H, W) images for :func:`neighbour_batches`.

    The evaluation transform (resize to ``input_size``, the method's normalization), the student's g
    head by default, as the authors' sampler; the method's train/eval mode is restored afterwards.
    """
    model = method.embedder(head, copy_modules=False)
    if device is None:
        device = next(method.parameters()).device
    if in_chans is None:
        in_chans = _first_conv_channels(method.backbone) or int(images.shape[1])
    mean, std = method.input_normalization()
    was_training = method.training
    try:
        return embed_images(model, images, input_size=method.input_size, mean=mean, std=std, in_chans=in_chans,
                            batch_size=batch_size, device=device, precision=precision)
    finally:
        method.train(was_training)
