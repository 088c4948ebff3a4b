"""Augmentation policies by name: their parameters and validation, without torch.

A stage's `augment:` is a list of `{name: <policy>, <param>: <value>, ...}`. This module only knows the
names and checks the parameters, so a config error is reported before torch is imported;
`downstream.augment` builds the torchvision transforms. Per-image policies run in list order on every
image with its own random draw; batch-level policies (mixup, cutmix) mix images and labels of a whole
batch, so they need labels (fine-tune stages only) and must come last.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from pretext.settings import StrictSettings


def _ordered(pair: tuple[float, float] | None, what: str) -> None:
    if pair is not None and pair[0] > pair[1]:
        raise ValueError(f"{what} must be (low, high) with low <= high, got {list(pair)}")


class Policy(StrictSettings):
    """One named augmentation; subclasses add its parameters."""

    name: str


class Flip(Policy):
    """Random horizontal (or vertical) flip."""

    p: float = Field(0.5, ge=0.0, le=1.0)
    vertical: bool = False


class Crop(Policy):
    """Random resized crop back to the image's own size."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @model_validator(mode="after")
    def _check(self) -> "Crop":
        _ordered(self.scale, "scale")
        _ordered(self.ratio, "ratio")
        if not (0.0 < self.scale[0] and self.scale[1] <= 1.0):
            raise ValueError(f"scale must lie in (0, 1], got {list(self.scale)}")
        if self.ratio[0] <= 0.0:
            raise ValueError(f"ratio must be positive, got {list(self.ratio)}")
        return self


class Affine(Policy):
    """Random affine: rotation, translation (fraction of size), scale and shear."""

    degrees: float = Field(10.0, ge=0.0, le=180.0)
    translate: tuple[float, float] | None = (0.1, 0.1)
    scale: tuple[float, float] | None = (0.9, 1.1)
    shear: float | None = Field(None, ge=0.0, le=90.0)

    @model_validator(mode="after")
    def _check(self) -> "Affine":
        _ordered(self.scale, "scale")
        if self.translate is not None and not all(0.0 <= t <= 1.0 for t in self.translate):
            raise ValueError(f"translate fractions must lie in [0, 1], got {list(self.translate)}")
        if self.scale is not None and self.scale[0] <= 0.0:
            raise ValueError(f"scale must be positive, got {list(self.scale)}")
        return self


class Rotation(Policy):
    """Random rotation by up to +-degrees."""

    degrees: float = Field(15.0, ge=0.0, le=180.0)


class ColorJitter(Policy):
    """Brightness/contrast/saturation/hue jitter, applied with probability p (no-op on gray channels)."""

    brightness: float = Field(0.4, ge=0.0)
    contrast: float = Field(0.4, ge=0.0)
    saturation: float = Field(0.4, ge=0.0)
    hue: float = Field(0.1, ge=0.0, le=0.5)
    p: float = Field(0.8, ge=0.0, le=1.0)


class GaussianBlur(Policy):
    kernel_size: int = Field(3, ge=1, le=31)
    sigma: tuple[float, float] = (0.1, 2.0)
    p: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "GaussianBlur":
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        _ordered(self.sigma, "sigma")
        if self.sigma[0] <= 0.0:
            raise ValueError(f"sigma must be positive, got {list(self.sigma)}")
        return self


class Jpeg(Policy):
    """JPEG re-encoding at a random quality (compression artefacts)."""

    quality: tuple[int, int] = (50, 95)
    p: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "Jpeg":
        _ordered(self.quality, "quality")
        if not (1 <= self.quality[0] and self.quality[1] <= 100):
            raise ValueError(f"quality must lie in [1, 100], got {list(self.quality)}")
        return self


class RandAugment(Policy):
    num_ops: int = Field(2, ge=1, le=10)
    magnitude: int = Field(9, ge=0)
    num_magnitude_bins: int = Field(31, ge=2)

    @model_validator(mode="after")
    def _check(self) -> "RandAugment":
        if self.magnitude >= self.num_magnitude_bins:
            raise ValueError(f"magnitude must be below num_magnitude_bins ({self.num_magnitude_bins}), got {self.magnitude}")
        return self


class TrivialAugment(Policy):
    num_magnitude_bins: int = Field(31, ge=2)


class AutoAugment(Policy):
    policy: Literal["imagenet", "cifar10", "svhn"] = "imagenet"


class AugMix(Policy):
    severity: int = Field(3, ge=1, le=10)
    mixture_width: int = Field(3, ge=1, le=10)
    chain_depth: int = Field(-1, ge=-1, le=10, description="-1: a random depth in [1, 3]")
    alpha: float = Field(1.0, gt=0.0)


class RandomErasing(Policy):
    """Cutout: erase a random rectangle (to `value`) with probability p."""

    p: float = Field(0.5, ge=0.0, le=1.0)
    scale: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)
    value: float = Field(0.0, ge=0.0, le=255.0, description="fill value in pixel units (0-255)")

    @model_validator(mode="after")
    def _check(self) -> "RandomErasing":
        _ordered(self.scale, "scale")
        _ordered(self.ratio, "ratio")
        if not (0.0 < self.scale[0] and self.scale[1] < 1.0):
            raise ValueError(f"scale must lie in (0, 1), got {list(self.scale)}")
        return self


class MixUp(Policy):
    """Batch-level: convex mix of image pairs and their one-hot labels, weight ~ Beta(alpha, alpha)."""

    alpha: float = Field(0.2, gt=0.0)


class CutMix(Policy):
    """Batch-level: paste a box from another image; labels mixed by the box area."""

    alpha: float = Field(1.0, gt=0.0)


# name -> parameter model. The torch builders in downstream/augment.py are keyed by the same names.
POLICIES: dict[str, type[Policy]] = {
    "flip": Flip,
    "crop": Crop,
    "affine": Affine,
    "rotation": Rotation,
    "color_jitter": ColorJitter,
    "gaussian_blur": GaussianBlur,
    "jpeg": Jpeg,
    "randaugment": RandAugment,
    "trivialaugment": TrivialAugment,
    "autoaugment": AutoAugment,
    "augmix": AugMix,
    "random_erasing": RandomErasing,
    "mixup": MixUp,
    "cutmix": CutMix,
}

# Policies that mix whole batches and their labels; the rest act on one image at a time.
BATCH_POLICIES: tuple[str, ...] = ("mixup", "cutmix")


def policy_names() -> list[str]:
    return list(POLICIES)


class PolicyError(ValueError):
    """A bad `augment:` list; the message starts with `augment[i]` so the config error names the key."""


def validate_policies(items: Any, *, allow_batch: bool) -> list[dict[str, Any]]:
    """Check an `augment:` list and return it with every default filled in.

    `allow_batch` is false for label-free stages: mixup and cutmix need labels.
    """
    if items is None:
        return []
    if not isinstance(items, list):
        raise PolicyError(f"augment: expected a list of {{name: ..., <params>}}, got {type(items).__name__}")
    out: list[dict[str, Any]] = []
    seen_batch = False
    for i, item in enumerate(items):
        where = f"augment[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise PolicyError(f"{where}: expected a mapping with a name (known: {', '.join(POLICIES)}), got {item!r}")
        name = item["name"]
        if name not in POLICIES:
            import difflib

            hint = difflib.get_close_matches(str(name), list(POLICIES), n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            raise PolicyError(f"{where}.name: unknown augmentation '{name}' (known: {', '.join(POLICIES)}){extra}")
        if name in BATCH_POLICIES:
            if not allow_batch:
                raise PolicyError(f"{where}.name: '{name}' mixes labels and is for fine-tune stages only")
            seen_batch = True
        elif seen_batch:
            raise PolicyError(f"{where}.name: '{name}' comes after a batch-level policy; "
                              f"put {', '.join(BATCH_POLICIES)} last")
        try:
            policy = POLICIES[name].model_validate(item)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            unknown = msg.startswith("unknown key '")
            key = f"{where}.{loc}" if loc and not unknown else where
            raise PolicyError(f"{key} ({name}): {msg}") from None
        out.append(policy.model_dump(mode="json"))
    return out
