"""Settings of each pretext method, validated when the config is read.

These models import only pydantic so that a config error is reported in well under two seconds,
long before torch is imported. Each method class in this package points at its settings model.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    augment: AugmentSettings = AugmentSettings()


# name -> settings model; the matching module and class are in pretext/__init__.py (METHODS).
METHOD_SETTINGS: dict[str, type[MethodSettings]] = {
    "simclr": SimCLRSettings,
}
