"""Deep metric learning losses: pytorch-metric-learning's where they exist, plus what it lacks.

Taken from pytorch-metric-learning (pml): contrastive, triplet (+ semi-hard / hard triplet mining), margin
(+ distance-weighted sampling) and multi-similarity (+ its miner). Written here:

- :class:`QuadrupletLoss` (Chen et al., CVPR 2017) with batch-hard quadruplet mining;
- Embedding Expansion (Ko & Gu, CVPR 2020): :func:`expand_embeddings` and the hardest-negative mining
  over original + synthetic points (:func:`expansion_indices`), usable with every loss here;
- :class:`MetricCriterion`, which gathers the batch from all DDP workers before mining, so that mining and
  the loss see the global batch.

All embeddings are L2-normalized before they get here (the margins assume unit vectors). Distances are
pml's default Euclidean ``LpDistance``; multi-similarity uses cosine similarity, as in pml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners
from torch import Tensor, nn

__all__ = [
    "QuadrupletLoss",
    "quadruplet_loss",
    "mine_quadruplets",
    "ExpandedBatch",
    "positive_pairs",
    "expand_embeddings",
    "expansion_indices",
    "MetricCriterion",
    "build_criterion",
    "gather_across_workers",
    "DEFAULT_MARGINS",
    "TUPLE_FORM",
]

# The loss's main margin when the settings leave it unset.
DEFAULT_MARGINS: dict[str, float] = {"contrastive": 1.0, "triplet": 0.2, "margin": 0.2, "quadruplet": 0.2}

# Which index tuples a loss consumes. "pair": (a1, p, a2, n) with independent negative pairs;
# "triplet": (a, p, n) sharing the anchor (pml's margin loss is triplet-based too); "quadruplet": (a, p, n1, n2).
TUPLE_FORM: dict[str, str] = {
    "contrastive": "pair",
    "multi_similarity": "pair",
    "triplet": "triplet",
    "margin": "triplet",
    "quadruplet": "quadruplet",
    "fastap": "listwise",
    "smoothap": "listwise",
}


def _connected_zero(embeddings: Tensor) -> Tensor:
    """A zero loss that still depends on the embeddings (backward and DDP's gradient hooks run as usual)."""
    return (embeddings * 0.0).sum()


# -- quadruplet loss -------------------------------------------------------------------------------

def quadruplet_loss(embeddings: Tensor, anchors: Tensor, positives: Tensor, negatives1: Tensor, negatives2: Tensor,
                    *, margin1: float = 0.2, margin2: float = 0.1) -> Tensor:
    """Quadruplet loss (Chen, Chen, Zhang & Huang, "Beyond triplet loss", CVPR 2017) on given index tuples.

    For quadruplets (a, p, n1, n2) with y_a = y_p, y_n1 != y_a, y_n2 not in {y_a, y_n1} and d the
    Euclidean distance between embeddings:

        L = mean over quadruplets of  [d(a,p) - d(a,n1) + margin1]_+  +  [d(a,p) - d(n1,n2) + margin2]_+

    The first term is the triplet loss; the second asks every intra-class distance to be smaller than an
    inter-class distance between two other classes (margin2 < margin1, as in the paper). Chen et al. use
    squared distances of a learned metric; on unit embeddings plain Euclidean distance is used here, as
    pml's triplet loss does, so margins mean the same in both. No quadruplets -> a zero loss.
    """
    if len(anchors) == 0:
        return _connected_zero(embeddings)
    e = embeddings
    d_ap = (e[anchors] - e[positives]).norm(dim=1)
    d_an = (e[anchors] - e[negatives1]).norm(dim=1)
    d_nn = (e[negatives1] - e[negatives2]).norm(dim=1)
    return (F.relu(d_ap - d_an + margin1) + F.relu(d_ap - d_nn + margin2)).mean()


@torch.no_grad()
def mine_quadruplets(embeddings: Tensor, labels: Tensor, *, anchors: Tensor | None = None,
                     positives: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch-hard quadruplets: every positive pair (a, p), the nearest negative n1 of a, and the nearest
    n2 to n1 whose class is neither a's nor n1's. Pairs without such points are dropped.

    ``anchors``/``positives`` restrict the pairs (Embedding Expansion passes the original points only);
    by default every ordered pair of distinct same-label points. n1 and n2 range over all points.
    """
    labels = labels.view(-1)
    dist = torch.cdist(embeddings.float(), embeddings.float())
    if anchors is None:
        anchors, positives = positive_pairs(labels, ordered=True)
    diff = labels[:, None] != labels[None, :]
    inf = torch.tensor(float("inf"), device=dist.device)
    n1 = torch.where(diff, dist, inf).argmin(dim=1)  # nearest negative of every point
    has_n1 = diff.any(dim=1)
    # n2 for a given (a, n1): nearest point to n1 with a label other than y_a and y_n1.
    a_n1 = n1[anchors]
    allowed = (labels[None, :] != labels[anchors][:, None]) & (labels[None, :] != labels[a_n1][:, None])
    n2_dist = torch.where(allowed, dist[a_n1], inf)
    n2 = n2_dist.argmin(dim=1)
    keep = has_n1[anchors] & allowed.any(dim=1)
    return anchors[keep], positives[keep], a_n1[keep], n2[keep]


class QuadrupletLoss(nn.Module):
    """pml-style call ``loss(embeddings, labels, indices_tuple=None)``; mines batch-hard quadruplets when
    no (a, p, n1, n2) tuple is given. See :func:`quadruplet_loss` for the formula."""

    def __init__(self, margin1: float = 0.2, margin2: float = 0.1) -> None:
        super().__init__()
        if not margin2 < margin1:
            raise ValueError(f"quadruplet loss: margin2 ({margin2}) should be smaller than margin1 ({margin1})")
        self.margin1, self.margin2 = float(margin1), float(margin2)
        self.distance = distances.LpDistance()  # what Embedding Expansion mines with

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple=None) -> Tensor:
        if indices_tuple is None:
            indices_tuple = mine_quadruplets(embeddings, labels)
        return quadruplet_loss(embeddings, *indices_tuple, margin1=self.margin1, margin2=self.margin2)


# -- Embedding Expansion ---------------------------------------------------------------------------

def positive_pairs(labels: Tensor, *, ordered: bool = False) -> tuple[Tensor, Tensor]:
    """Index pairs (i, j), i != j, with equal labels: i < j, or both orders when ``ordered``."""
    labels = labels.view(-1)
    same = labels[:, None] == labels[None, :]
    mask = torch.ones_like(same).triu(1) if not ordered else ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    i, j = torch.where(same & mask)
    return i, j


@dataclass
class ExpandedBatch:
    """Original embeddings followed by the synthetic ones.

    ``pair_of[k]`` is, for point k, the index into (``pair_i``, ``pair_j``) of the positive pair it was
    made from, or -1 for an original point. Points [0, num_original) are the originals.
    """

    embeddings: Tensor
    labels: Tensor
    pair_of: Tensor
    pair_i: Tensor
    pair_j: Tensor
    num_original: int


def expand_embeddings(embeddings: Tensor, labels: Tensor, points: int = 2, *, normalize: bool = True) -> ExpandedBatch:
    """Embedding Expansion (Ko & Gu, CVPR 2020): ``points`` synthetic embeddings per positive pair.

    For every unordered positive pair (i, j) and k = 1..n (n = ``points``):
        z_k = e_i + k / (n + 1) * (e_j - e_i),
    evenly spaced on the segment between the two embeddings (the authors' ``get_embedding_aug``), then
    L2-normalized (``normalize``) back onto the unit sphere. Each z_k carries the pair's label. Gradients
    flow through the synthetic points to both endpoints.
    """
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    labels = labels.view(-1)
    pair_i, pair_j = positive_pairs(labels)
    steps = torch.arange(1, points + 1, device=embeddings.device, dtype=embeddings.dtype) / (points + 1)
    # (P, n, D): for each pair, n points from e_i towards e_j
    e_i, e_j = embeddings[pair_i], embeddings[pair_j]
    synth = e_i[:, None, :] + steps[None, :, None] * (e_j - e_i)[:, None, :]
    synth = synth.reshape(-1, embeddings.shape[1])
    if normalize:
        synth = F.normalize(synth, dim=1)
    pair_ids = torch.arange(len(pair_i), device=embeddings.device).repeat_interleave(points)
    n = len(labels)
    return ExpandedBatch(
        embeddings=torch.cat([embeddings, synth]),
        labels=torch.cat([labels, labels[pair_i].repeat_interleave(points)]),
        pair_of=torch.cat([torch.full((n,), -1, dtype=torch.long, device=embeddings.device), pair_ids]),
        pair_i=pair_i,
        pair_j=pair_j,
        num_original=n,
    )


def _closeness(distance: distances.BaseDistance, embeddings: Tensor) -> Tensor:
    """(M, M) matrix where smaller means closer, whatever the loss's distance (similarities are negated)."""
    mat = distance(embeddings)
    return -mat if distance.is_inverted else mat


@torch.no_grad()
def expansion_indices(batch: ExpandedBatch, form: Literal["pair", "triplet", "quadruplet"],
                      distance: distances.BaseDistance | None = None) -> tuple[Tensor, ...]:
    """Index tuples into ``batch.embeddings``: original positive pairs, hardest negatives among all points.

    Positive pairs are the ordered pairs (a, p) of original points with one label. Negatives are mined
    among the original *and* synthetic points of other classes:

    - ``pair`` (contrastive, multi-similarity): for each (a, p), the hardest negative pair (x, n), x in the
      pair's group {a, p} + the synthetic points made from (a, p), n any point of another class: the
      closest such pair (the paper's hard negative pair mining). Returns (a, p, x, n).
    - ``triplet`` (triplet, margin): the anchor is shared, so n is the closest point of another class to a.
      Returns (a, p, n). (The authors' HPHN triplet also lets a's synthetic points stand in for a; pml's
      triplet losses need one anchor per triplet, so only a does here.)
    - ``quadruplet``: (a, p, n1, n2) with n1 as for ``triplet`` and n2 the closest point to n1 whose class
      is neither a's nor n1's.
    """
    distance = distance or distances.LpDistance()
    emb, labels, n = batch.embeddings.detach().float(), batch.labels, batch.num_original
    a, p = positive_pairs(labels[:n], ordered=True)
    if form == "quadruplet":
        return mine_quadruplets(emb, labels, anchors=a, positives=p)
    d = _closeness(distance, emb)
    neg = labels[:, None] != labels[None, :]
    d_neg = torch.where(neg, d, torch.tensor(float("inf"), device=d.device))
    hardest_dist, hardest = d_neg.min(dim=1)  # per point: its closest point of another class
    has_neg = neg.any(dim=1)
    if form == "triplet":
        keep = has_neg[a]
        return a[keep], p[keep], hardest[a][keep]
    if form != "pair":
        raise ValueError(f"form must be 'pair', 'triplet' or 'quadruplet', got {form!r}")
    # group of an unordered pair u: its two endpoints and its synthetic points; pick the member whose
    # hardest negative is closest.
    num_pairs = len(batch.pair_i)
    pair_lut = torch.full((n, n), -1, dtype=torch.long, device=d.device)
    pair_lut[batch.pair_i, batch.pair_j] = torch.arange(num_pairs, device=d.device)
    pair_lut[batch.pair_j, batch.pair_i] = torch.arange(num_pairs, device=d.device)
    inf = torch.tensor(float("inf"), device=d.device)
    synth_best = torch.full((num_pairs,), float("inf"), device=d.device)
    synth_arg = torch.zeros(num_pairs, dtype=torch.long, device=d.device)
    synth = torch.arange(n, len(labels), device=d.device)
    if len(synth):
        # scatter-min of the synthetic points' hardest-negative distances into their pairs
        owner = batch.pair_of[synth]
        synth_best = synth_best.scatter_reduce(0, owner, hardest_dist[synth], reduce="amin")
        is_best = hardest_dist[synth] == synth_best[owner]
        synth_arg[owner[is_best]] = synth[is_best]
    u = pair_lut[a, p]
    cand = torch.stack([torch.where(has_neg[a], hardest_dist[a], inf), torch.where(has_neg[p], hardest_dist[p], inf),
                        synth_best[u]], dim=1)
    choice = cand.argmin(dim=1)
    x = torch.stack([a, p, synth_arg[u]], dim=1).gather(1, choice[:, None]).squeeze(1)
    keep = torch.isfinite(cand.min(dim=1).values)
    return a[keep], p[keep], x[keep], hardest[x][keep]


# -- distributed gather ----------------------------------------------------------------------------

def gather_across_workers(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int]:
    """The global batch: this worker's rows first (with gradient), then the other workers' (without).

    Uses pml's ``utils.distributed.gather`` (an ``all_gather``; the local part is the tensor itself, so
    its gradient flows). Outside DDP it returns the inputs and world size 1.
    """
    from pytorch_metric_learning.utils import distributed as pml_dist

    if not pml_dist.is_distributed() or torch.distributed.get_world_size() == 1:
        return embeddings, labels, 1
    all_emb, all_labels, _ = pml_dist.gather(embeddings, labels)
    return all_emb, all_labels, torch.distributed.get_world_size()


# -- the criterion ---------------------------------------------------------------------------------

def _grouped_by_label(embeddings: Tensor, labels: Tensor, loss_name: str) -> tuple[Tensor, Tensor]:
    """The gathered batch sorted by label. Smooth-AP (pml) reads the batch as consecutive equal-sized classes;
    m-per-class batches give that when every class of the global batch has one group of m images."""
    order = torch.argsort(labels, stable=True)
    embeddings, labels = embeddings[order], labels[order]
    if loss_name == "smoothap":
        counts = torch.unique(labels, return_counts=True)[1]
        if counts.unique().numel() != 1:
            raise ValueError(f"loss 'smoothap' needs the same number of images of every class in a global batch, got "
                             f"{sorted(counts.tolist())}: make batch_size a multiple of settings.images_per_class "
                             "and at most images_per_class x the number of classes")
    return embeddings, labels


class MetricCriterion(nn.Module):
    """embeddings, labels -> loss: gather across workers, (expand,) mine, apply the loss.

    Why not pml's ``DistributedLossWrapper``/``DistributedMinerWrapper``: each gathers on its own, and
    Embedding Expansion must sit between the gather and the mining so that miner and loss see the same
    expanded global batch. Under DDP each worker computes the loss of the global batch but only its own rows
    carry gradient; DDP averages gradients over workers, so the gradient is scaled by the world size (as
    the pml wrapper does) while the reported value stays the global batch's loss.
    """

    def __init__(self, loss_name: str, loss: nn.Module, miner: nn.Module | None = None, *,
                 expansion_points: int = 0) -> None:
        super().__init__()
        if loss_name not in TUPLE_FORM:
            raise ValueError(f"unknown loss '{loss_name}' (known: {', '.join(TUPLE_FORM)})")
        self.loss_name = loss_name
        self.loss = loss
        self.miner = miner
        self.expansion_points = int(expansion_points)

    def forward(self, embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb, lab, world = gather_across_workers(embeddings.float(), labels.view(-1))
            out: dict[str, Tensor] = {}
            if self.expansion_points > 0:
                batch = expand_embeddings(emb, lab, self.expansion_points)
                indices = expansion_indices(batch, TUPLE_FORM[self.loss_name], getattr(self.loss, "distance", None))
                emb, lab = batch.embeddings, batch.labels
                out["synthetic_points"] = torch.tensor(float(len(lab) - batch.num_original))
            elif self.miner is not None:
                indices = self.miner(emb, lab)
            else:
                indices = None
            if indices is not None:
                out["mined_tuples"] = torch.tensor(float(len(indices[0])))
            if TUPLE_FORM[self.loss_name] == "listwise":
                emb, lab = _grouped_by_label(emb, lab, self.loss_name)
                loss = self.loss(emb, lab)
            else:
                loss = self.loss(emb, lab, indices)
        if world > 1:
            loss = loss * world - loss.detach() * (world - 1)  # value: the loss; gradient: world x
        out["loss"] = loss
        return out


def build_criterion(loss: str, miner: str = "none", *, margin: float | None = None, quadruplet_margin2: float = 0.1,
                    expansion_points: int = 0) -> MetricCriterion:
    """A criterion from registry names (see ``downstream.settings.LOSS_MINERS`` for valid pairs)."""
    m = DEFAULT_MARGINS.get(loss) if margin is None else float(margin)
    if expansion_points and TUPLE_FORM.get(loss) == "listwise":
        raise ValueError(f"Embedding Expansion mines tuples; loss '{loss}' is listwise (average precision)")
    if loss == "contrastive":
        fn: nn.Module = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=m)
    elif loss == "triplet":
        fn = losses.TripletMarginLoss(margin=m)
    elif loss == "margin":
        fn = losses.MarginLoss(margin=m, nu=0.0, beta=1.2, triplets_per_anchor="all")
    elif loss == "multi_similarity":
        fn = losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
    elif loss == "quadruplet":
        fn = QuadrupletLoss(margin1=m, margin2=quadruplet_margin2)
    elif loss == "fastap":  # Cakir et al. 2019: AP from a histogram of distances (soft binning)
        fn = losses.FastAPLoss(num_bins=10)
    elif loss == "smoothap":  # Brown et al. 2020: AP with the rank's step function replaced by a sigmoid
        fn = losses.SmoothAPLoss(temperature=0.01)
    else:
        raise ValueError(f"unknown loss '{loss}' (known: {', '.join(TUPLE_FORM)})")

    mining: nn.Module | None
    if miner in ("none", None):
        mining = None
    elif miner in ("all", "semihard", "hard") and loss == "triplet":
        mining = miners.TripletMarginMiner(margin=m, type_of_triplets=miner)
    elif miner == "distance_weighted":
        mining = miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    elif miner == "multi_similarity":
        mining = miners.MultiSimilarityMiner(epsilon=0.1)
    elif miner == "hard" and loss == "quadruplet":
        mining = None  # QuadrupletLoss mines batch-hard quadruplets itself
    else:
        raise ValueError(f"miner '{miner}' does not fit loss '{loss}'")
    if expansion_points:
        mining = None  # Embedding Expansion mines over original + synthetic points
    return MetricCriterion(loss, fn, mining, expansion_points=expansion_points)
