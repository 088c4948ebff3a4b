"""Augmentation policies (see `downstream.policies`) built on torchvision transforms v2.

`ImageAugment` applies the per-image policies to a uint8 batch one image at a time: a v2 transform called
on a whole batch draws one set of random parameters for all of it, which would make every image of a
batch get the same crop. uint8 is what the automatic policies (RandAugment, AutoAugment, ...) and JPEG
expect. `BatchMix` applies mixup/cutmix to a float batch and turns labels into soft targets.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torchvision.transforms import v2

from downstream.policies import BATCH_POLICIES, validate_policies


def _maybe(transform, p: float):
    return transform if p >= 1.0 else v2.RandomApply([transform], p=p)


def _build_one(policy: dict[str, Any], size: tuple[int, int]):
    """One per-image policy as a v2 transform for images of `size` (H, W)."""
    name = policy["name"]
    if name == "flip":
        cls = v2.RandomVerticalFlip if policy["vertical"] else v2.RandomHorizontalFlip
        return cls(p=policy["p"])
    if name == "crop":
        return v2.RandomResizedCrop(size, scale=tuple(policy["scale"]), ratio=tuple(policy["ratio"]), antialias=True)
    if name == "affine":
        return v2.RandomAffine(degrees=policy["degrees"], translate=policy["translate"], scale=policy["scale"],
                               shear=policy["shear"])
    if name == "rotation":
        return v2.RandomRotation(degrees=policy["degrees"])
    if name == "color_jitter":
        jitter = v2.ColorJitter(brightness=policy["brightness"], contrast=policy["contrast"],
                                saturation=policy["saturation"], hue=policy["hue"])
        return _maybe(jitter, policy["p"])
    if name == "gaussian_blur":
        return _maybe(v2.GaussianBlur(policy["kernel_size"], sigma=tuple(policy["sigma"])), policy["p"])
    if name == "jpeg":
        return _maybe(v2.JPEG(quality=tuple(policy["quality"])), policy["p"])
    if name == "randaugment":
        return v2.RandAugment(num_ops=policy["num_ops"], magnitude=policy["magnitude"],
                              num_magnitude_bins=policy["num_magnitude_bins"])
    if name == "trivialaugment":
        return v2.TrivialAugmentWide(num_magnitude_bins=policy["num_magnitude_bins"])
    if name == "autoaugment":
        return v2.AutoAugment(policy=v2.AutoAugmentPolicy(policy["policy"]))
    if name == "augmix":
        return v2.AugMix(severity=policy["severity"], mixture_width=policy["mixture_width"],
                         chain_depth=policy["chain_depth"], alpha=policy["alpha"])
    if name == "random_erasing":
        return v2.RandomErasing(p=policy["p"], scale=tuple(policy["scale"]), ratio=tuple(policy["ratio"]),
                                value=int(round(policy["value"])))
    raise KeyError(f"no per-image builder for augmentation '{name}'")


class ImageAugment:
    """Per-image policies for uint8 batches (B, C, H, W); every image gets its own random draw."""

    def __init__(self, policies: list[dict[str, Any]]) -> None:
        self.policies = [p for p in policies if p["name"] not in BATCH_POLICIES]
        self._by_size: dict[tuple[int, int], Callable[[Tensor], Tensor]] = {}

    def __bool__(self) -> bool:
        return bool(self.policies)

    def transform(self, size: tuple[int, int]) -> Callable[[Tensor], Tensor]:
        if size not in self._by_size:
            self._by_size[size] = v2.Compose([_build_one(p, size) for p in self.policies])
        return self._by_size[size]

    def __call__(self, batch: Tensor) -> Tensor:
        if not self.policies:
            return batch
        if batch.dtype != torch.uint8 or batch.ndim != 4:
            raise TypeError(f"ImageAugment expects a uint8 (B, C, H, W) batch, got {batch.dtype} {tuple(batch.shape)}")
        transform = self.transform(tuple(batch.shape[-2:]))
        return torch.stack([transform(image) for image in batch])


class BatchMix:
    """mixup and/or cutmix (one of them, chosen at random per batch, when both are listed).

    Returns the mixed float batch and soft targets (B, num_classes). Without a batch-level policy it is
    the identity and labels stay class indices.
    """

    def __init__(self, policies: list[dict[str, Any]], num_classes: int | None) -> None:
        mixes = []
        for p in policies:
            if p["name"] not in BATCH_POLICIES:
                continue
            if not num_classes:
                raise ValueError(f"augmentation '{p['name']}' needs labels and a class count (fine-tune stages only)")
            cls = v2.MixUp if p["name"] == "mixup" else v2.CutMix
            mixes.append(cls(alpha=p["alpha"], num_classes=num_classes))
        self.mix = None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def __bool__(self) -> bool:
        return self.mix is not None

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.mix is None:
            return images, labels
        return self.mix(images, labels)


def build_augment(policies: list[dict[str, Any]] | None, *, num_classes: int | None = None,
                  allow_batch: bool = True) -> tuple[ImageAugment, BatchMix]:
    """Validate a policy list (defaults filled in) and build its per-image and batch-level parts."""
    checked = validate_policies(list(policies or []), allow_batch=allow_batch)
    return ImageAugment(checked), BatchMix(checked, num_classes)
