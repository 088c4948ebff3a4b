"""Embedding a set of images with a backbone: batched, no gradients, on the fastest device."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Grayscale -> 3 channels for RGB backbones; RGB -> luma (ITU-R 601) for 1-channel backbones."""
    if x.shape[1] == in_chans:
        return x
    if x.shape[1] == 1 and in_chans == 3:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 3 and in_chans == 1:
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ValueError(f"cannot map {x.shape[1]} channels to {in_chans}")


def lab_lightness(rgb: torch.Tensor) -> torch.Tensor:
    """CIE L* / 100 of sRGB in [0, 1] (D65): what a colorization backbone was trained on."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    if linear.shape[1] == 3:
        w = torch.tensor([0.212671, 0.715160, 0.072169], device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
        y = (linear * w).sum(1, keepdim=True)
    else:
        y = linear
    f = torch.where(y > (6 / 29) ** 3, y.clamp_min(1e-12) ** (1 / 3), y / (3 * (6 / 29) ** 2) + 4 / 29)
    return (116 * f - 16) / 100


def prepare_batch(
    batch: torch.Tensor,
    *,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    in_chans: int,
    input_transform: str = "rgb",
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalized float at the backbone's input size (the evaluation transform)."""
    x = batch.float().div_(255.0)
    x = lab_lightness(x) if input_transform == "lab_l" else match_channels(x, in_chans)
    if x.shape[-2:] != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: np.ndarray,
    *,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    in_chans: int = 3,
    input_transform: str = "rgb",
    batch_size: int = 512,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Pooled features (N, D) float32 of uint8 images (N, C, H, W); (0, 0) for no images."""
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    was_training = model.training
    model.eval().to(device)

    def features(batch: torch.Tensor) -> torch.Tensor:
        x = prepare_batch(batch, input_size=input_size, mean=mean, std=std, in_chans=in_chans,
                          input_transform=input_transform)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model(x)

    try:
        return map_chunks(features, images, dim=0, batch_size=batch_size, device=device)
    finally:
        model.train(was_training)


@torch.no_grad()
def map_chunks(fn, images, *, dim: int, batch_size: int = 256, device: torch.device | str = "cpu") -> np.ndarray:
    """`fn` over uint8 rows of `images` (any array-like, e.g. a memory map), `batch_size` rows at a time moved to
    `device`, as one float32 (N, dim) array: only one chunk is ever on the device."""
    # Each chunk is copied: torch cannot safely wrap a read-only memory map.
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start:start + batch_size], copy=True)).to(device)
        chunks.append(fn(batch).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)


def embed_sharded(embed, images, *, rank: int, world_size: int, device: torch.device | str = "cpu") -> np.ndarray:
    """`embed(rows)` of every row of `images` on every rank, each rank computing only rows ``rank::world_size``
    (a 1/world_size share of the cost) and the shares all-gathered. `embed` maps a uint8 (n, C, H, W) array to a
    float (n, D) array; `device` is where the gather runs (NCCL needs the rank's GPU). One process, or no process
    group: `embed(images)` on all rows."""
    import torch.distributed as dist

    n = len(images)
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return np.asarray(embed(images), dtype=np.float32)
    mine = np.asarray(embed(images[np.arange(rank, n, world_size)]), dtype=np.float32)
    per_rank = -(-n // world_size)  # rank r holds ceil((n - r) / world) rows: pad every share to the largest
    padded = torch.zeros(per_rank, mine.shape[1], dtype=torch.float32, device=device)
    padded[: len(mine)] = torch.from_numpy(mine).to(device)
    shares = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(shares, padded)
    out = np.empty((n, mine.shape[1]), dtype=np.float32)
    for r, share in enumerate(shares):
        rows = np.arange(r, n, world_size)
        out[rows] = share[: len(rows)].cpu().numpy()
    return out
