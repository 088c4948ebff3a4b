"""Tests for the batched augmentations in pretext.transforms (small CPU batches, no timing)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pretext.transforms import EvalTransform, Normalize, SimCLRAugment, to_float

# Everything random switched off: only the (full-size) crop-resize remains.
NO_RANDOM = dict(cj_prob=0.0, random_gray_scale=0.0, gaussian_blur=0.0, hf_prob=0.0, vf_prob=0.0, rr_prob=0.0,
                 min_scale=1.0, max_scale=1.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b=8, c=3, h=32, w=32, seed=0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=_gen(seed))


def _smooth_images(b=4, c=3, h=32, w=32, seed=0) -> torch.Tensor:
    """Low-frequency images, so blur/resize comparisons are not dominated by pixel noise."""
    small = torch.rand(b, c, 4, 4, generator=_gen(seed))
    return TF.resize(small, [h, w], antialias=False)


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


# -- shape, dtype, range ---------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("in_size", [28, 96])
def test_shape_dtype_range(channels, in_size):
    aug = SimCLRAugment(input_size=32)
    x = _images(b=16, c=channels, h=in_size, w=in_size)
    y = aug(x, generator=_gen(1))
    assert y.shape == (16, channels, 32, 32)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert y.min() >= 0.0 and y.max() <= 1.0


def test_uint8_and_non_square_input():
    aug = SimCLRAugment(input_size=24, rr_prob=0.5)
    x = (torch.rand(6, 3, 40, 28, generator=_gen(0)) * 255).to(torch.uint8)
    y = aug(x, generator=_gen(1))
    assert y.shape == (6, 3, 24, 24) and y.dtype == torch.float32
    assert 0.0 <= y.min() <= y.max() <= 1.0


# -- randomness ------------------------------------------------------------------------------------------
def test_calls_differ_and_seed_reproduces():
    aug = SimCLRAugment(input_size=32)
    x = _images()
    assert not torch.equal(aug(x), aug(x))
    assert torch.equal(aug(x, generator=_gen(7)), aug(x, generator=_gen(7)))
    assert not torch.equal(aug(x, generator=_gen(7)), aug(x, generator=_gen(8)))


def test_samples_in_batch_get_own_crops():
    aug = SimCLRAugment(input_size=32, **{**NO_RANDOM, "min_scale": 0.2, "max_scale": 0.6})
    x = _images(b=1).expand(16, -1, -1, -1)  # the same image 16 times
    p = aug.sample_params(16, "cpu", _gen(3), in_size=(32, 32))
    assert p["area"].unique().numel() == 16 and p["crop_cx"].unique().numel() == 16
    y = aug.apply(x, p)
    diffs = (y[:, None] - y[None, :]).abs().flatten(2).amax(dim=2)
    off_diag = diffs[~torch.eye(16, dtype=torch.bool)]
    assert (off_diag > 1e-3).all()


# -- geometry --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_size", [28, 96])
@pytest.mark.parametrize("channels", [1, 3])
def test_full_crop_equals_resize(in_size, channels):
    x = _images(b=4, c=channels, h=in_size, w=in_size)
    expected = TF.resize(x, [32, 32], antialias=False)  # grid_sample does not antialias
    for ratio in [(1.0, 1.0), (3 / 4, 4 / 3)]:  # the default ratio falls back to the whole (square) image
        aug = SimCLRAugment(input_size=32, ratio=ratio, **NO_RANDOM)
        p = aug.sample_params(4, "cpu", _gen(0), in_size=(in_size, in_size))
        assert torch.allclose(p["area"], torch.ones(4))
        torch.testing.assert_close(aug.apply(x, p), expected, atol=1e-2, rtol=0)
        torch.testing.assert_close(aug(x, generator=_gen(0)), expected, atol=1e-5, rtol=0)


def test_crop_box_matches_resized_crop():
    """A sampled sub-box equals torchvision's resized_crop of the same box (box made pixel-aligned)."""
    aug = SimCLRAugment(input_size=16, **{**NO_RANDOM, "min_scale": 0.25, "max_scale": 0.25}, ratio=(1.0, 1.0))
    x = _images(b=2, h=32, w=32)
    p = aug.sample_params(2, "cpu", _gen(0), in_size=(32, 32))
    # crop 16x16 at pixel (top=4, left=12): centre in normalised coords
    p["crop_cx"] = torch.full((2,), (12 + 8) / 16 - 1.0)
    p["crop_cy"] = torch.full((2,), (4 + 8) / 16 - 1.0)
    torch.testing.assert_close(aug.apply(x, p), x[..., 4:20, 12:28], atol=1e-5, rtol=0)


def test_flips_and_rot90_geometry():
    x = _images(b=3, h=32, w=32)
    hf = SimCLRAugment(input_size=32, **{**NO_RANDOM, "hf_prob": 1.0})
    torch.testing.assert_close(hf(x), torch.flip(x, dims=[-1]), atol=1e-5, rtol=0)
    vf = SimCLRAugment(input_size=32, **{**NO_RANDOM, "vf_prob": 1.0})
    torch.testing.assert_close(vf(x), torch.flip(x, dims=[-2]), atol=1e-5, rtol=0)
    rr = SimCLRAugment(input_size=32, **{**NO_RANDOM, "rr_prob": 1.0})  # lightly: 90 deg counter-clockwise
    torch.testing.assert_close(rr(x), TF.rotate(x, 90), atol=1e-5, rtol=0)
    both = SimCLRAugment(input_size=32, **{**NO_RANDOM, "hf_prob": 1.0, "rr_prob": 1.0})  # flip, then rotate
    torch.testing.assert_close(both(x), TF.rotate(torch.flip(x, dims=[-1]), 90), atol=1e-5, rtol=0)


def test_arbitrary_rotation_matches_torchvision_inside():
    x = _smooth_images(b=2)
    aug = SimCLRAugment(input_size=32, **{**NO_RANDOM, "rr_prob": 1.0}, rr_degrees=(30.0, 30.0))
    ref = TF.rotate(x, 30.0, interpolation=TF.InterpolationMode.BILINEAR)
    # corners differ by design (edge-extended vs black fill); the inscribed region must agree
    torch.testing.assert_close(aug(x)[..., 8:24, 8:24], ref[..., 8:24, 8:24], atol=1e-4, rtol=0)


# -- crop statistics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.2, 0.6)])
@pytest.mark.parametrize("in_size", [(32, 32), (24, 40)])
def test_crop_scale_statistics(scale, in_size):
    aug = SimCLRAugment(input_size=32, min_scale=scale[0], max_scale=scale[1])
    p = aug.sample_params(20000, "cpu", _gen(0), in_size=in_size)
    ok = ~p["crop_fallback"]
    assert ok.float().mean() > 0.99
    area, aspect = p["area"][ok], p["aspect"][ok]
    assert area.min() >= scale[0] - 1e-6 and area.max() <= scale[1] + 1e-6
    assert aspect.min() >= 3 / 4 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
    if in_size[0] == in_size[1]:  # (on non-square images, boxes that do not fit are redrawn: biased)
        assert abs(aspect.log().mean().item()) < 0.02  # log-uniform, symmetric around 1
    assert (p["crop_w"] <= 1 + 1e-6).all() and (p["crop_h"] <= 1 + 1e-6).all()
    # the box stays inside the image
    assert (p["crop_cx"].abs() <= 1 - p["crop_w"] + 1e-6).all()
    assert (p["crop_cy"].abs() <= 1 - p["crop_h"] + 1e-6).all()
    if scale == (0.2, 0.6) and in_size[0] == in_size[1]:  # every attempt fits: the area is uniform
        assert abs(area.mean().item() - 0.4) < 0.01


def test_probabilities_are_respected():
    aug = SimCLRAugment(input_size=32, hf_prob=0.5, cj_prob=0.8, random_gray_scale=0.2, gaussian_blur=0.5)
    p = aug.sample_params(20000, "cpu", _gen(0))
    for key, prob in [("hflip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)]:
        assert abs(p[key].float().mean().item() - prob) < 0.02, key
    assert (p["sigma"] >= 0.1).all() and (p["sigma"] <= 2.0).all()
    assert p["brightness"].min() >= 0.2 - 1e-6 and p["brightness"].max() <= 1.8 + 1e-6
    assert p["hue"].abs().max() <= 0.2 * 2 * math.pi + 1e-6
    assert (p["order"].sort(dim=1).values == torch.arange(4)).all()  # a permutation per sample
    assert p["order"][:, 0].unique().numel() == 4  # and the order varies between samples


# -- colour ----------------------------------------------------------------------------------------------
def test_random_grayscale_all_channels_equal():
    aug = SimCLRAugment(input_size=32, random_gray_scale=1.0)
    y = aug(_images(), generator=_gen(0))
    assert torch.allclose(y[:, 0], y[:, 1]) and torch.allclose(y[:, 1], y[:, 2])


def test_blur_lowers_total_variation_same_seed():
    x = _images(b=16)
    kw = dict(input_size=32, sigmas=(1.0, 2.0))
    sharp = SimCLRAugment(gaussian_blur=0.0, **kw)(x, generator=_gen(5))
    blurred = SimCLRAugment(gaussian_blur=1.0, **kw)(x, generator=_gen(5))
    assert _total_variation(blurred) < 0.8 * _total_variation(sharp)
    for i in range(16):  # per sample, too
        assert _total_variation(blurred[i]) < _total_variation(sharp[i])


def test_blur_identity_cases():
    x = _images(b=4)
    # sigma -> 0 is a delta kernel
    tiny = SimCLRAugment(input_size=32, **{**NO_RANDOM, "gaussian_blur": 1.0}, sigmas=(1e-3, 1e-3))
    torch.testing.assert_close(tiny(x), x, atol=1e-5, rtol=0)
    # samples not selected for blur are untouched, the selected ones are blurred
    aug = SimCLRAugment(input_size=32, **{**NO_RANDOM, "gaussian_blur": 0.5}, sigmas=(1.5, 1.5))
    p = aug.sample_params(4, "cpu", _gen(0))
    p["blur"] = torch.tensor([True, False, True, False])
    y = aug.apply(x, p)
    assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3])
    assert not torch.allclose(y[0], x[0], atol=1e-3)


def test_blur_matches_torchvision_gaussian_blur():
    x = _images(b=2)
    aug = SimCLRAugment(input_size=32, **{**NO_RANDOM, "gaussian_blur": 1.0}, kernel_size=5, sigmas=(1.3, 1.3))
    torch.testing.assert_close(aug(x), TF.gaussian_blur(x, [5, 5], [1.3, 1.3]), atol=1e-5, rtol=0)


def _jitter_only(channels=3, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply colour jitter with fixed factors to a batch (no geometry change, no other ops)."""
    aug = SimCLRAugment(input_size=32, **{**NO_RANDOM, "cj_prob": 1.0})
    x = _images(b=4, c=channels)
    p = aug.sample_params(4, "cpu", _gen(0))
    p.update(brightness=torch.ones(4), contrast=torch.ones(4), saturation=torch.ones(4), hue=torch.zeros(4))
    p.update({k: v if torch.is_tensor(v) else torch.full((4,), float(v)) for k, v in params.items()})
    return x, aug.apply(x, p)


def test_identity_jitter_factors_and_zero_hue():
    x, y = _jitter_only()
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)


def test_hue_on_gray_image_is_identity():
    aug = SimCLRAugment(input_size=32, **{**NO_RANDOM, "cj_prob": 1.0})
    gray = _images(b=8, c=1).expand(-1, 3, -1, -1).contiguous()
    p = aug.sample_params(8, "cpu", _gen(0))
    p.update(brightness=torch.ones(8), contrast=torch.ones(8), saturation=torch.ones(8),
             hue=torch.linspace(-math.pi, math.pi, 8))
    torch.testing.assert_close(aug.apply(gray, p), gray, atol=1e-5, rtol=0)


def test_hue_rotation_keeps_luma_and_changes_colour():
    x, y = _jitter_only(hue=0.3)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    inside = ((y > 1e-4) & (y < 1 - 1e-4)).all(dim=1, keepdim=True)  # where no clamp kicked in
    assert inside.float().mean() > 0.3
    torch.testing.assert_close(((y * luma).sum(1, keepdim=True))[inside], ((x * luma).sum(1, keepdim=True))[inside],
                               atol=1e-5, rtol=0)
    assert (y - x).abs().max() > 0.05


@pytest.mark.parametrize("op,factor,ref", [
    ("brightness", 1.5, TF.adjust_brightness),
    ("contrast", 0.4, TF.adjust_contrast),
    ("saturation", 1.7, TF.adjust_saturation),
])
def test_single_jitter_ops_match_torchvision(op, factor, ref):
    # tolerance: torchvision's float grayscale uses 0.2989 for red, we use BT.601's 0.299
    x, y = _jitter_only(**{op: factor})
    torch.testing.assert_close(y, ref(x, factor), atol=2e-4, rtol=0)


def test_jitter_order_is_per_sample():
    aug = SimCLRAugment(input_size=32, **{**NO_RANDOM, "cj_prob": 1.0})
    x = _images(b=2)
    p = aug.sample_params(2, "cpu", _gen(0))
    p.update(brightness=torch.full((2,), 1.6), contrast=torch.full((2,), 0.3), saturation=torch.ones(2),
             hue=torch.zeros(2), order=torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]]))
    y = aug.apply(x, p)
    torch.testing.assert_close(y[0], TF.adjust_contrast(TF.adjust_brightness(x[0], 1.6), 0.3), atol=2e-4, rtol=0)
    torch.testing.assert_close(y[1], TF.adjust_brightness(TF.adjust_contrast(x[1], 0.3), 1.6), atol=2e-4, rtol=0)


def test_one_channel_jitter_uses_brightness_and_contrast():
    x, y = _jitter_only(channels=1, brightness=1.5, contrast=0.5, saturation=0.0, hue=1.0)
    aug_order = SimCLRAugment(input_size=32).sample_params(4, "cpu", _gen(0))["order"]
    for i in range(4):
        b_first = (aug_order[i] == 0).nonzero() < (aug_order[i] == 1).nonzero()
        ref = (TF.adjust_contrast(TF.adjust_brightness(x[i], 1.5), 0.5) if b_first
               else TF.adjust_brightness(TF.adjust_contrast(x[i], 0.5), 1.5))
        torch.testing.assert_close(y[i], ref, atol=2e-4, rtol=0)


def test_differentiable():
    x = _images(b=4).requires_grad_(True)
    SimCLRAugment(input_size=32, cj_prob=1.0, random_gray_scale=0.0)(x, generator=_gen(0)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# -- helpers ---------------------------------------------------------------------------------------------
def test_to_float():
    x = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    torch.testing.assert_close(to_float(x), torch.tensor([[0.0, 128 / 255, 1.0]]))
    f = torch.rand(3)
    assert to_float(f) is f


def test_normalize_one_and_three_channels():
    x3, x1 = _images(b=2, c=3), _images(b=2, c=1)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    torch.testing.assert_close(Normalize(mean, std)(x3), TF.normalize(x3, list(mean), list(std)))
    torch.testing.assert_close(Normalize([0.3], [0.2])(x1), (x1 - 0.3) / 0.2)
    torch.testing.assert_close(Normalize()(x1), (x1 - 0.5) / 0.5)  # equal 3-value default works on gray
    with pytest.raises(ValueError):
        Normalize(mean, std)(x1)
    assert {name for name, _ in Normalize().named_buffers()} == {"mean", "std"}


def test_eval_transform():
    ev = EvalTransform(input_size=32)
    x = _images(b=2, h=96, w=96)
    torch.testing.assert_close(ev(x), TF.resize(x, [32, 32], antialias=True), atol=1e-5, rtol=0)
    y = _images(b=2, h=48, w=64)  # shorter side -> 32, centre square
    expected = TF.center_crop(TF.resize(y, [32, 43], antialias=True), [32, 32])
    torch.testing.assert_close(ev(y), expected, atol=1e-5, rtol=0)
    assert torch.equal(ev(_images(b=1)), _images(b=1))
    assert ev((x * 255).to(torch.uint8)).dtype == torch.float32
