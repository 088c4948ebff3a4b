"""Batched, on-device image augmentations for contrastive pretraining.

Why: the training data lives in memory as one uint8 tensor, and lightly's ``SimCLRTransform`` works on one
PIL image at a time in DataLoader workers, which dominates the step time on small images. Here every
augmentation is a handful of tensor ops over the whole batch (on whatever device the batch is on), with
per-sample random parameters drawn as tensors, so a 32 px batch costs little next to the backbone.

Only torch/torchvision are used here; this module must not import the ``pipeline`` package.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SimCLRAugment", "Normalize", "EvalTransform", "to_float", "LUMA_WEIGHTS"]

# ITU-R BT.601 luma weights, the same ones torchvision's rgb_to_grayscale uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# RGB -> YIQ (rows Y, I, Q). Y is the BT.601 luma, so a hue rotation (which only turns the I/Q plane)
# leaves the grayscale of an image unchanged.
_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.596, -0.274, -0.322),
    (0.211, -0.523, 0.312),
)

# Indices of the colour-jitter ops; ``order`` in the sampled params holds a permutation of these per sample.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


def to_float(x: Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1]; floating tensors are returned unchanged.

    Why: the dataset stays uint8 in memory (4x smaller); conversion happens per batch on the device.
    """
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if not torch.is_floating_point(x):
        raise TypeError(f"expected uint8 or floating images, got {x.dtype}")
    return x


def _luma(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 1, H, W) grayscale (BT.601 for C=3, the image itself for C=1)."""
    if x.shape[1] == 1:
        return x
    w = x.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


class Normalize(nn.Module):
    """(x - mean) / std per channel on a (B, C, H, W) batch, with mean/std kept as buffers.

    Buffers (not Python floats) so that ``.to(device)`` moves them with the model and they are saved in
    the state dict. ``mean``/``std`` of length C normalise per channel; length 1 is broadcast; a length-3
    mean/std applied to 1-channel input is accepted only when its three values are equal (e.g. the
    (0.5, 0.5, 0.5) default), otherwise the statistics are ambiguous and we raise.
    """

    def __init__(self, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean and std must have the same length, got {mean_t.numel()} and {std_t.numel()}")
        if not bool((std_t > 0).all()):
            raise ValueError("std must be positive")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def _stats(self, channels: int) -> tuple[Tensor, Tensor]:
        n = self.mean.shape[1]
        if n == channels or n == 1:
            return self.mean, self.std
        if channels == 1 and bool((self.mean == self.mean[:, :1]).all() and (self.std == self.std[:, :1]).all()):
            return self.mean[:, :1], self.std[:, :1]
        raise ValueError(f"Normalize has {n} channel statistics but the input has {channels} channels")

    def forward(self, x: Tensor) -> Tensor:
        mean, std = self._stats(x.shape[1])
        return (x - mean.to(x.dtype)) / std.to(x.dtype)


class EvalTransform(nn.Module):
    """Deterministic resize for embedding images at evaluation: shorter side -> input_size, centre square.

    Bilinear with antialiasing so that downscaling (e.g. 96 -> 32) does not alias. Accepts uint8 or float
    [0, 1] input and returns float (B, C, input_size, input_size).
    """

    def __init__(self, input_size: int = 32) -> None:
        super().__init__()
        self.input_size = int(input_size)

    def forward(self, x: Tensor) -> Tensor:
        x = to_float(x)
        s = self.input_size
        h, w = x.shape[-2:]
        if (h, w) == (s, s):
            return x
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))  # as torchvision's center_crop
        return x[..., top : top + s, left : left + s].clamp(0.0, 1.0)


class SimCLRAugment(nn.Module):
    """Batched equivalent of ``lightly.transforms.SimCLRTransform`` (one view per call, no normalisation).

    Parameter names and defaults follow lightly; ``max_scale`` and ``kernel_size`` are additions, and
    ``ratio`` (keyword, aspect-ratio range of the crop) exposes torchvision's fixed (3/4, 4/3).
    Every sample gets its own random parameters, drawn as tensors on the input's device
    (see :meth:`sample_params`); :meth:`apply` then runs, in lightly's order:

    1. random resized crop + horizontal/vertical flip + rotation, fused into one ``affine_grid`` +
       ``grid_sample`` (bilinear, align_corners=False, border padding). Crop boxes are continuous
       (sub-pixel) rather than rounded to whole pixels as torchvision does; downscaling is plain
       bilinear (no antialias), so feed inputs near ``input_size`` (or pre-resize) for best quality.
       With ``rr_degrees`` set, the corners uncovered by an arbitrary-angle rotation are edge-extended
       rather than filled with black.
    2. colour jitter with probability ``cj_prob``: brightness, contrast, saturation, hue, each in its own
       random order *per sample* (like torchvision's ColorJitter, which permutes per image) and clamped
       to [0, 1] after every op. Each op is a per-sample 3x3 affine colour map, so one ``bmm`` per step
       covers the whole batch; hue is a rotation of the I/Q plane in YIQ space, cheap and differentiable
       (an approximation of torchvision's HSV hue shift). 1-channel input gets brightness/contrast only.
    3. random grayscale with probability ``random_gray_scale`` (BT.601 luma, channel count kept).
    4. Gaussian blur with probability ``gaussian_blur``, sigma ~ U(sigmas), as one separable depthwise
       convolution in which every sample has its own kernel (non-blurred samples get a delta kernel).

    ``forward(x, generator)`` takes float (B, C, H, W) in [0, 1] (uint8 is converted), C in {1, 3}, and
    returns float (B, C, input_size, input_size) in [0, 1]. A ``generator`` (on ``x.device``) makes the
    output reproducible.
    """

    def __init__(
        self,
        input_size: int = 32,
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        cj_bright: float = 0.8,
        cj_contrast: float = 0.8,
        cj_sat: float = 0.8,
        cj_hue: float = 0.2,
        min_scale: float = 0.08,
        max_scale: float = 1.0,
        random_gray_scale: float = 0.2,
        gaussian_blur: float = 0.5,
        kernel_size: int | None = None,
        sigmas: tuple[float, float] = (0.1, 2.0),
        vf_prob: float = 0.0,
        hf_prob: float = 0.5,
        rr_prob: float = 0.0,
        rr_degrees: float | tuple[float, float] | None = None,
        *,
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    ) -> None:
        super().__init__()
        if not 0.0 < min_scale <= max_scale <= 1.0:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got ({min_scale}, {max_scale})")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"need 0 < ratio[0] <= ratio[1], got {ratio}")
        if not 0.0 <= sigmas[0] <= sigmas[1]:
            raise ValueError(f"need 0 <= sigmas[0] <= sigmas[1], got {sigmas}")
        self.input_size = int(input_size)
        self.cj_prob = float(cj_prob)
        # lightly multiplies every jitter strength by cj_strength; torchvision caps hue at 0.5.
        self.brightness = float(cj_strength * cj_bright)
        self.contrast = float(cj_strength * cj_contrast)
        self.saturation = float(cj_strength * cj_sat)
        self.hue = min(float(cj_strength * cj_hue), 0.5)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.random_gray_scale = float(random_gray_scale)
        self.gaussian_blur = float(gaussian_blur)
        if kernel_size is None:
            # SimCLR's choice: ~10% of the image side, odd, and at least 3 taps.
            kernel_size = max(3, int(round(0.1 * self.input_size)) // 2 * 2 + 1)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.sigmas = (float(sigmas[0]), float(sigmas[1]))
        self.vf_prob, self.hf_prob, self.rr_prob = float(vf_prob), float(hf_prob), float(rr_prob)
        if rr_degrees is None:
            self.rr_degrees = None  # lightly: rotate by exactly 90 degrees (counter-clockwise)
        elif isinstance(rr_degrees, (int, float)):
            self.rr_degrees = (-float(rr_degrees), float(rr_degrees))
        else:
            self.rr_degrees = (float(rr_degrees[0]), float(rr_degrees[1]))
        self.crop_attempts = 10  # as torchvision's RandomResizedCrop

        # Hue rotation by angle t in YIQ, written as M(t) = I + (cos t - 1) * Q + sin t * S, so that t = 0
        # gives exactly the identity. Built in float64 once.
        yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
        inv = torch.linalg.inv(yiq)
        e_iq = torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
        j = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
        self.register_buffer("_hue_q", (inv @ e_iq @ yiq).float(), persistent=False)
        self.register_buffer("_hue_s", (inv @ j @ yiq).float(), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, scale=({self.min_scale}, {self.max_scale}), cj_prob={self.cj_prob}, "
            f"jitter=(b={self.brightness}, c={self.contrast}, s={self.saturation}, h={self.hue}), "
            f"gray={self.random_gray_scale}, blur={self.gaussian_blur} (k={self.kernel_size}, sigmas={self.sigmas}), "
            f"hf={self.hf_prob}, vf={self.vf_prob}, rr={self.rr_prob} ({self.rr_degrees or 90})"
        )

    # -- parameters ---------------------------------------------------------------------------------------
    @staticmethod
    def _rand(n: int | tuple[int, ...], device, generator) -> Tensor:
        shape = (n,) if isinstance(n, int) else n
        return torch.rand(shape, device=device, generator=generator)

    def sample_params(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        in_size: tuple[int, int] | None = None,
    ) -> dict[str, Tensor]:
        """Draw every random choice for a batch, as tensors on ``device`` (no Python loop over samples).

        ``in_size`` = (H, W) of the input (default square); it matters only for the crop aspect ratio.
        Returned keys (all shape (B,) unless noted):
        ``crop_w``/``crop_h`` crop side as a fraction of the input width/height, ``crop_cx``/``crop_cy`` its
        centre in normalised [-1, 1] coordinates, ``area`` = crop_w * crop_h (fraction of the input area),
        ``aspect`` = crop width / height in pixels, ``crop_fallback`` (bool) no attempt fitted;
        ``hflip``/``vflip`` (bool), ``angle`` rotation in radians (counter-clockwise);
        ``brightness``/``contrast``/``saturation`` factors and ``hue`` angle in radians (identity values for
        samples without jitter), ``jitter`` (bool), ``order`` (B, 4) per-sample permutation of the ops;
        ``gray`` (bool); ``blur`` (bool) and ``sigma``.
        The same draws are made whatever the probabilities, so two augmenters that differ only in a
        probability see the same random stream for a given seed (handy for A/B checks).
        """
        b = int(batch_size)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        h_in, w_in = in_size if in_size is not None else (1, 1)
        p: dict[str, Tensor] = {}

        # Random resized crop (torchvision semantics): up to 10 attempts of (area, log-uniform ratio); the
        # first box that fits wins, otherwise a centred crop with the ratio clamped into range.
        k = self.crop_attempts
        area = self.min_scale + (self.max_scale - self.min_scale) * self._rand((b, k), dev, generator)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * self._rand((b, k), dev, generator))
        # pixel w = sqrt(a*H*W*r), h = sqrt(a*H*W/r)  ->  as fractions of W and H:
        fw = torch.sqrt(area * aspect * (h_in / w_in))
        fh = torch.sqrt(area / aspect * (w_in / h_in))
        fits = (fw <= 1.0) & (fh <= 1.0)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt (0 if none fits)
        ok = fits.any(dim=1)
        in_ratio = w_in / h_in
        if in_ratio < self.ratio[0]:
            fb_w, fb_h = 1.0, in_ratio / self.ratio[0]
        elif in_ratio > self.ratio[1]:
            fb_w, fb_h = self.ratio[1] / in_ratio, 1.0
        else:
            fb_w, fb_h = 1.0, 1.0
        crop_w = torch.where(ok, fw.gather(1, first).squeeze(1), torch.full((b,), fb_w, device=dev))
        crop_h = torch.where(ok, fh.gather(1, first).squeeze(1), torch.full((b,), fb_h, device=dev))
        # Uniform position of the box inside the image (fallback boxes are centred).
        u = self._rand((b, 2), dev, generator) * 2.0 - 1.0
        p["crop_w"], p["crop_h"] = crop_w, crop_h
        p["crop_cx"] = torch.where(ok, u[:, 0] * (1.0 - crop_w), torch.zeros_like(crop_w))
        p["crop_cy"] = torch.where(ok, u[:, 1] * (1.0 - crop_h), torch.zeros_like(crop_h))
        p["area"] = crop_w * crop_h
        p["aspect"] = (crop_w * w_in) / (crop_h * h_in)
        p["crop_fallback"] = ~ok

        # Flips and rotation.
        p["hflip"] = self._rand(b, dev, generator) < self.hf_prob
        p["vflip"] = self._rand(b, dev, generator) < self.vf_prob
        rotate = self._rand(b, dev, generator) < self.rr_prob
        lo, hi = (math.radians(d) for d in (self.rr_degrees or (90.0, 90.0)))
        angle = lo + (hi - lo) * self._rand(b, dev, generator)
        p["angle"] = torch.where(rotate, angle, torch.zeros_like(angle))

        # Colour jitter: factors ~ U[max(0, 1 - s), 1 + s] (torchvision), hue ~ U[-h, h] turns of the
        # colour wheel; samples without jitter get identity values, so the jitter code needs no masks.
        jitter = self._rand(b, dev, generator) < self.cj_prob
        f = self._rand((b, 4), dev, generator)
        one = torch.ones((), device=dev)
        for name, s, col in (("brightness", self.brightness, 0), ("contrast", self.contrast, 1),
                             ("saturation", self.saturation, 2)):
            lo = max(0.0, 1.0 - s)
            p[name] = torch.where(jitter, lo + (1.0 + s - lo) * f[:, col], one)
        p["hue"] = torch.where(jitter, (2.0 * f[:, 3] - 1.0) * (self.hue * 2.0 * math.pi), torch.zeros((), device=dev))
        p["jitter"] = jitter
        p["order"] = self._rand((b, 4), dev, generator).argsort(dim=1)

        p["gray"] = self._rand(b, dev, generator) < self.random_gray_scale
        p["blur"] = self._rand(b, dev, generator) < self.gaussian_blur
        p["sigma"] = self.sigmas[0] + (self.sigmas[1] - self.sigmas[0]) * self._rand(b, dev, generator)
        return p

    # -- ops ----------------------------------------------------------------------------------------------
    def _geometry(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Crop + flips + rotation as one affine map from output to input normalised coordinates.

        For an output point o, the source point is  diag(crop_w, crop_h) @ F @ R(-angle) @ o + centre,
        where F = diag(+-1, +-1) holds the flips (lightly's order: crop, hflip, vflip, rotate).
        In image coordinates (y down) a counter-clockwise rotation by t has inverse [[c, -s], [s, c]].
        """
        b = x.shape[0]
        cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
        sx = torch.where(p["hflip"], -p["crop_w"], p["crop_w"]).to(x.dtype)
        sy = torch.where(p["vflip"], -p["crop_h"], p["crop_h"]).to(x.dtype)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        theta = torch.stack(
            [
                torch.stack([sx * cos, -sx * sin, p["crop_cx"].to(x.dtype)], dim=1),
                torch.stack([sy * sin, sy * cos, p["crop_cy"].to(x.dtype)], dim=1),
            ],
            dim=1,
        )
        s = self.input_size
        grid = F.affine_grid(theta, [b, x.shape[1], s, s], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _jitter(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Colour jitter as up to four per-sample affine colour maps, each followed by a clamp.

        At step k every sample applies its own k-th op: brightness  f*x;  contrast  f*x + (1-f)*mean(gray);
        saturation  f*x + (1-f)*gray;  hue  M(t) x.  All four are written as (A, c) with A (B, C, C), so a
        step is one bmm regardless of which op each sample is on.
        """
        b, c = x.shape[:2]
        dt, dev = x.dtype, x.device
        eye = torch.eye(c, dtype=dt, device=dev).expand(b, c, c)
        fb = p["brightness"].to(dt).view(b, 1, 1)
        fc = p["contrast"].to(dt).view(b, 1, 1)
        if c == 3:
            fs = p["saturation"].to(dt).view(b, 1, 1)
            luma_row = x.new_tensor(LUMA_WEIGHTS).view(1, 1, 3)
            t = p["hue"].to(dt).view(b, 1, 1)
            mats = torch.stack(
                [
                    fb * eye,
                    fc * eye,
                    fs * eye + (1.0 - fs) * luma_row.expand(b, 3, 3),
                    eye + (torch.cos(t) - 1.0) * self._hue_q.to(dt) + torch.sin(t) * self._hue_s.to(dt),
                ],
                dim=1,
            )  # (B, 4, 3, 3), indexed by _BRIGHTNESS, _CONTRAST, _SATURATION, _HUE
            order = p["order"]
        else:
            # Gray input: saturation and hue are no-ops; keep the relative order of brightness/contrast.
            mats = torch.stack([fb * eye, fc * eye], dim=1)  # (B, 2, 1, 1)
            order = p["order"][p["order"] <= _CONTRAST].view(b, 2)
        n_ops = order.shape[1]
        batch_idx = torch.arange(b, device=dev)
        contrast_bias = (order == _CONTRAST).to(dt) * (1.0 - fc.view(b, 1))  # (B, n_ops), 0 unless contrast
        luma = x.new_tensor(LUMA_WEIGHTS if c == 3 else (1.0,))
        flat = x.reshape(b, c, -1)
        for k in range(n_ops):
            a = mats[batch_idx, order[:, k]]  # (B, C, C)
            mean_gray = flat.mean(dim=2) @ luma  # (B,) per-image mean of the grayscale, as torchvision
            bias = (contrast_bias[:, k] * mean_gray).view(b, 1, 1)
            flat = torch.baddbmm(bias, a, flat).clamp_(0.0, 1.0)
        return flat.view_as(x)

    def _grayscale(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        if x.shape[1] == 1:
            return x
        return torch.where(p["gray"].view(-1, 1, 1, 1), _luma(x).expand_as(x), x)

    def _blur(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Separable Gaussian blur, one kernel per sample, as a depthwise conv with groups = B*C."""
        b, c, h, w = x.shape
        k = self.kernel_size
        if k == 1:
            return x
        r = k // 2
        taps = torch.arange(k, device=x.device, dtype=x.dtype) - r
        sigma = p["sigma"].to(x.dtype).clamp_min(1e-6).view(b, 1)
        kern = torch.exp(-0.5 * (taps / sigma) ** 2)
        kern = kern / kern.sum(dim=1, keepdim=True)
        delta = (taps == 0).to(x.dtype).expand(b, k)
        kern = torch.where(p["blur"].view(b, 1), kern, delta)  # (B, k); identity for non-blurred samples
        kern = kern.repeat_interleave(c, dim=0)  # (B*C, k), matches the (b, c) channel layout
        mode = "reflect" if r < min(h, w) else "replicate"
        y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode=mode)
        y = F.conv2d(y, kern.view(b * c, 1, 1, k), groups=b * c)
        y = F.conv2d(y, kern.view(b * c, 1, k, 1), groups=b * c)
        return y.view(b, c, h, w)

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Apply given parameters (from :meth:`sample_params`) to a float batch in [0, 1]."""
        x = to_float(x)
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, C, H, W) with C in {{1, 3}}, got {tuple(x.shape)}")
        x = self._geometry(x, params)
        if self.cj_prob > 0.0:
            x = self._jitter(x, params)
        if self.random_gray_scale > 0.0:
            x = self._grayscale(x, params)
        if self.gaussian_blur > 0.0:
            x = self._blur(x, params)
        return x.clamp(0.0, 1.0)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x: float (B, C, H, W) in [0, 1] (uint8 accepted); returns (B, C, input_size, input_size) in [0, 1]."""
        params = self.sample_params(x.shape[0], x.device, generator, in_size=tuple(x.shape[-2:]))
        return self.apply(x, params)
