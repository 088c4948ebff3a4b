"""Global descriptors from a CNN's last feature map: GeM and NetVLAD, drop-in replacements for average pooling.

- **GeM** (Radenović, Tolias & Chum, TPAMI 2018): ``(mean_i x_i^p)^(1/p)`` per channel with a learnable p
  (init 3): p = 1 is average pooling, p -> infinity max pooling. The standard global descriptor for instance
  retrieval.
- **NetVLAD** (Arandjelović et al., CVPR 2016): each local descriptor (L2-normalized) is soft-assigned to K
  learned centres, ``a_k(x) = softmax_k(w_k . x + b_k)``, and the residuals are summed per centre,
  ``V_k = sum_i a_k(x_i) (x_i - c_k)``; each V_k is L2-normalized (intra-normalization), then the
  flattened K x C vector. Initialised from k-means centres c_k of local descriptors with ``w_k = 2 alpha c_k``,
  ``b_k = -alpha |c_k|^2``, as the paper does.

:class:`PooledBackbone` runs a timm backbone's ``forward_features`` (the unpooled map) and one of these; the
metric stage trains with it and exports it, so an artifact embeds with the pooling it was trained with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOLINGS = ("avg", "gem", "netvlad")


class GeM(nn.Module):
    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        p = self.p.clamp(min=1.0)
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class NetVLAD(nn.Module):
    def __init__(self, dim: int, clusters: int = 16, alpha: float = 100.0) -> None:
        super().__init__()
        self.dim, self.clusters, self.alpha = int(dim), int(clusters), float(alpha)
        self.assign = nn.Conv2d(dim, clusters, kernel_size=1, bias=True)
        self.centres = nn.Parameter(torch.randn(clusters, dim) * 0.1)
        # 1 once the centres come from k-means of real descriptors (a checkpoint keeps it: no re-init on resume)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.long))

    @property
    def out_dim(self) -> int:
        return self.dim * self.clusters

    @torch.no_grad()
    def init_centres(self, centres: Tensor) -> None:
        """Centres (K, C) from k-means of L2-normalized local descriptors; the assignment follows them."""
        centres = centres.to(self.centres)
        self.centres.copy_(centres)
        self.assign.weight.copy_((2.0 * self.alpha * centres)[:, :, None, None])
        self.assign.bias.copy_(-self.alpha * centres.pow(2).sum(dim=1))
        self.initialised.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(x.float(), dim=1)  # descriptor-wise L2, (B, C, H, W)
        soft = F.softmax(self.assign(x).flatten(2), dim=1)  # (B, K, HW)
        descriptors = x.flatten(2)  # (B, C, HW)
        # sum_i a_k(x_i) x_i - c_k sum_i a_k(x_i)
        vlad = torch.einsum("bkn,bcn->bkc", soft, descriptors) - soft.sum(dim=2)[:, :, None] * self.centres[None]
        vlad = F.normalize(vlad, dim=2)  # intra-normalization
        return F.normalize(vlad.flatten(1), dim=1)


def make_pool(pooling: str, feature_dim: int, *, clusters: int = 16, gem_p: float = 3.0) -> nn.Module:
    """GeM or NetVLAD for a feature map of `feature_dim` channels."""
    if pooling == "gem":
        return GeM(gem_p)
    if pooling == "netvlad":
        return NetVLAD(feature_dim, clusters)
    raise ValueError(f"pooling must be one of gem, netvlad (avg is the backbone's own), got {pooling!r}")


def pooled_width(pool: nn.Module, feature_dim: int) -> int:
    return pool.out_dim if isinstance(pool, NetVLAD) else feature_dim


def feature_map(backbone: nn.Module, x: Tensor) -> Tensor:
    """A timm backbone's unpooled last feature map (B, C, H, W); CNNs only."""
    fmap = backbone.forward_features(x)
    if fmap.ndim != 4:
        raise ValueError("pooling gem / netvlad needs a CNN feature map (B, C, H, W); this backbone's "
                         f"forward_features gives {tuple(fmap.shape)}")
    return fmap


class PooledBackbone(nn.Module):
    """A timm CNN's feature map -> a pooling module (GeM, NetVLAD); ``num_features`` is the descriptor's width."""

    def __init__(self, backbone: nn.Module, pool: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.num_features = pooled_width(pool, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(feature_map(self.backbone, x))
