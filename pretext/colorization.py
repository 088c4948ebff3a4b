"""Colorization (Zhang, Isola, Efros 2016): predict the ab channels of CIE Lab from the L channel.

The backbone sees only lightness (L*/100, what evaluation feeds it through
``pretext.embeddings.lab_lightness``, to within 2e-5) and must infer colour, which needs semantics (skies are blue,
grass green), so its features become useful without labels. As in the paper the output is a
distribution over quantized ab bins, trained with soft targets and class rebalancing (otherwise
desaturated greys dominate), and decoded with the annealed mean. A plain L2 regression on ab is
available as the baseline the paper compares against.

Resolution: the decoder predicts at input_size/4 (``OUTPUT_STRIDE``), like the paper, against the true
ab averaged down to that size: colour varies slowly, and a quarter-resolution target keeps the
per-pixel soft-encoding and the Q-way softmax cheap. Lab conversions run in float32 with autocast off
(bf16's 8-bit mantissa would cost ab units); everything runs batched on the training device.

This module must not import ``pipeline``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretext.base import Method
from pretext.settings import ColorizationSettings
from pretext.transforms import Normalize, SimCLRAugment, to_float

__all__ = ["Colorization", "rgb_to_lab", "lab_to_rgb", "in_gamut_ab_bins"]

# sRGB (D65) <-> XYZ, the matrix and white point scikit-image uses, so our Lab matches skimage.color.
# (Evaluation's lab_lightness uses the longer-precision Y row 0.2126729, 0.7151522, 0.0721750; the two
# L values differ by < 1e-3 on the 0..100 scale, i.e. < 1e-5 of the backbone input.)
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_F_THRESHOLD = 0.008856  # (6/29)^3 as skimage rounds it
_F_SLOPE = 7.787  # 1 / (3 (6/29)^2)
_F_INV_THRESHOLD = 0.2068966  # 6/29

AB_RANGE = 110.0  # bins cover ab in [-110, 110]; regression targets are ab / 110
OUTPUT_STRIDE = 4  # predictions at input_size / 4


def _matrix(rows, like: Tensor) -> Tensor:
    return torch.as_tensor(rows, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


_RGB_FROM_XYZ = torch.linalg.inv(torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64))


def _no_autocast(t: Tensor):
    """Colour maths and bin bookkeeping stay in float32 even inside the trainer's bf16 autocast."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _work_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (tests against skimage); anything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] (B, 3, H, W) -> CIE Lab (D65), L in 0..100; matches skimage.color.rgb2lab."""
    with _no_autocast(rgb):
        x = rgb.to(_work_dtype(rgb))
        lin = torch.where(x > 0.04045, ((x.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, x / 12.92)
        m = _matrix(_XYZ_FROM_RGB, x) / _matrix(_WHITE_D65, x).view(3, 1)
        t = torch.einsum("ij,bjhw->bihw", m, lin)
        f = torch.where(t > _F_THRESHOLD, t.clamp_min(_F_THRESHOLD) ** (1.0 / 3.0), _F_SLOPE * t + 16.0 / 116.0)
        fx, fy, fz = f.unbind(1)
        return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_rgb(lab: Tensor, clip: bool = True) -> Tensor:
    """CIE Lab (B, 3, H, W) -> sRGB; matches skimage.color.lab2rgb when ``clip`` (negative Z and RGB clipped).

    ``clip=False`` returns the unclipped sRGB values, which is how the gamut test sees out-of-range colours.
    """
    with _no_autocast(lab):
        x = lab.to(_work_dtype(lab))
        L, a, b = x.unbind(1)
        fy = (L + 16.0) / 116.0
        fx = fy + a / 500.0
        fz = fy - b / 200.0
        if clip:
            fz = fz.clamp_min(0.0)
        f = torch.stack([fx, fy, fz], dim=1)
        t = torch.where(f > _F_INV_THRESHOLD, f**3, (f - 16.0 / 116.0) / _F_SLOPE)
        xyz = t * _matrix(_WHITE_D65, x).view(1, 3, 1, 1)
        lin = torch.einsum("ij,bjhw->bihw", _matrix(_RGB_FROM_XYZ, x), xyz)
        srgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055, 12.92 * lin)
        return srgb.clamp(0.0, 1.0) if clip else srgb


def in_gamut_ab_bins(grid_size: float = 10.0, ab_range: float = AB_RANGE, l_step: float = 1.0) -> Tensor:
    """Centres (Q, 2) of the ab grid cells that some sRGB colour can show.

    A centre (a, b), a multiple of ``grid_size`` within [-ab_range, ab_range], is kept when for some L in
    0..100 (step ``l_step``) the Lab colour (L, a, b) converts to sRGB inside [0, 1]. With grid 10 that is
    225 bins; the paper's 313 were the bins occupied by ImageNet pixels, a data statistic we do not have,
    whereas the sRGB gamut is known in advance and is the same for every dataset.
    """
    k = int(math.floor(ab_range / grid_size + 1e-9))
    axis = torch.arange(-k, k + 1, dtype=torch.float64) * grid_size
    lightness = torch.arange(0.0, 100.0 + 1e-9, l_step, dtype=torch.float64)
    a, b, L = torch.meshgrid(axis, axis, lightness, indexing="ij")
    lab = torch.stack([L, a, b], dim=0).reshape(1, 3, -1, 1)
    rgb = lab_to_rgb(lab, clip=False).reshape(3, len(axis), len(axis), len(lightness))
    tol = 1e-9
    ok = ((rgb >= -tol) & (rgb <= 1.0 + tol)).all(dim=0).any(dim=-1)
    aa, bb = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([aa[ok], bb[ok]], dim=1).float()


class Colorization(Method):
    """L -> ab bins (or ab regression) with a small upsampling decoder on the backbone's feature map.

    Buffers: ``ab_bins`` (Q, 2) the bin centres; ``ab_prior`` (Q,) the empirical bin distribution, a
    running mean of the soft-encoded histograms of the batches seen (the first ``PRIOR_WINDOW`` batches
    count equally, later ones as an EMA with rate 1/PRIOR_WINDOW), so rebalancing needs no pass over the
    data beforehand and follows the data of whichever stage trains. Under DDP, rank 0's buffers are
    broadcast at every forward, so all workers weight with the same prior.
    """

    name = "colorization"
    settings_model = ColorizationSettings
    requires_color = True
    backbone_channels = 1
    input_transform = "lab_l"

    PRIOR_WINDOW = 500
    PRIOR_SIGMA = 5.0  # Gaussian smoothing of the prior over ab (the paper's sigma)
    L_MEAN, L_STD = 0.5, 0.25  # fixed stats for L/100 of natural images, saved with the artifact

    def __init__(self, backbone, feature_dim, settings, **kwargs: Any) -> None:
        super().__init__(backbone, feature_dim, settings, **kwargs)
        s: ColorizationSettings = self.settings
        # Input is L/100, whatever the dataset's RGB statistics: evaluation reads these back from the artifact.
        self.normalize = Normalize([self.L_MEAN], [self.L_STD])
        self.augment = SimCLRAugment(
            input_size=self.input_size, min_scale=s.min_scale, max_scale=1.0, cj_prob=0.0,
            random_gray_scale=0.0, gaussian_blur=0.0, hf_prob=0.5,
        )
        self.output_size = max(1, self.input_size // OUTPUT_STRIDE)

        bins = in_gamut_ab_bins(s.grid_size)
        self.register_buffer("ab_bins", bins)
        q = bins.shape[0]
        self.register_buffer("ab_prior", torch.full((q,), 1.0 / q))
        self.register_buffer("prior_batches", torch.zeros((), dtype=torch.long))
        # Row i spreads bin i's mass over its neighbours: smoothing p is p @ kernel (mass preserved).
        d2 = torch.cdist(bins.double(), bins.double()) ** 2
        kernel = torch.exp(-d2 / (2.0 * self.PRIOR_SIGMA**2))
        self.register_buffer("_smoothing", (kernel / kernel.sum(1, keepdim=True)).float(), persistent=False)

        c = s.decoder_channels
        out_channels = q if s.loss == "classification" else 2

        def block(cin: int, cout: int, k: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        # Kept small on purpose: the backbone, not the decoder, should have to understand the image.
        self.decoder_in = nn.Sequential(block(self.feature_dim, c, 1), block(c, c, 3))
        self.decoder_mid = block(c, c, 3)  # after upsampling to output_size / 2
        self.decoder_out = nn.Sequential(block(c, c, 3), nn.Conv2d(c, out_channels, 1))  # at output_size

    @property
    def num_bins(self) -> int:
        return int(self.ab_bins.shape[0])

    # -- Lab targets ----------------------------------------------------------------------------------------
    def lab_inputs(self, rgb: Tensor) -> tuple[Tensor, Tensor]:
        """RGB [0, 1] (B, 3, S, S) -> (normalized L/100 for the backbone, true ab at the output resolution)."""
        if rgb.shape[1] != 3:
            raise ValueError(f"colorization needs RGB batches (B, 3, H, W), got {tuple(rgb.shape)}")
        lab = rgb_to_lab(rgb)
        x = self.normalize(lab[:, :1] / 100.0).contiguous(memory_format=self.memory_format)
        ab = F.interpolate(lab[:, 1:], size=(self.output_size, self.output_size), mode="area")
        return x, ab

    @torch.no_grad()
    def soft_encode(self, ab: Tensor, chunk: int = 65536) -> tuple[Tensor, Tensor]:
        """ab (N, 2) -> the ``soft_neighbors`` nearest bins (N, k), nearest first, and their Gaussian weights
        (N, k) summing to 1. Chunked so that the (N, Q) distance matrix stays small on large batches."""
        k = min(self.settings.soft_neighbors, self.num_bins)
        sigma2 = 2.0 * self.settings.soft_sigma**2
        bins = self.ab_bins.float()
        idx, wts = [], []
        with _no_autocast(ab):
            for part in ab.float().split(chunk):
                d2 = torch.cdist(part, bins) ** 2
                near_d2, near = d2.topk(k, dim=1, largest=False, sorted=True)
                # Shift by the nearest distance: the same normalized weights, no underflow far from every bin.
                w = torch.exp(-(near_d2 - near_d2[:, :1]) / sigma2)
                idx.append(near)
                wts.append(w / w.sum(1, keepdim=True))
        return torch.cat(idx), torch.cat(wts)

    # -- class rebalancing --------------------------------------------------------------------------------
    @torch.no_grad()
    def update_prior(self, idx: Tensor, wts: Tensor) -> None:
        """Fold one batch's soft-encoded ab histogram into the running prior."""
        hist = torch.zeros_like(self.ab_prior).index_add_(0, idx.reshape(-1), wts.reshape(-1).to(self.ab_prior.dtype))
        hist = hist / hist.sum().clamp_min(1e-12)
        n = (self.prior_batches + 1).clamp(max=self.PRIOR_WINDOW).to(self.ab_prior.dtype)  # no host sync
        self.ab_prior.add_((hist - self.ab_prior) / n)
        self.prior_batches.add_(1)

    @torch.no_grad()
    def rebalance_weights(self) -> tuple[Tensor, Tensor]:
        """(w, p): w ∝ ((1 - λ) p + λ / Q)^-1 with p the Gaussian-smoothed prior, scaled so that E_p[w] = 1.

        Rare (saturated) colours get large weights, so the loss is not dominated by the greys and browns
        that most pixels have; λ = 1 turns rebalancing off (all weights 1).
        """
        lam = self.settings.rebalance_lambda
        with _no_autocast(self.ab_prior):
            p = self.ab_prior.float() @ self._smoothing.float()
            p = p / p.sum().clamp_min(1e-12)
            w = 1.0 / ((1.0 - lam) * p + lam / self.num_bins)
            return w / (p * w).sum(), p

    # -- network --------------------------------------------------------------------------------------------
    def head_output(self, x: Tensor) -> Tensor:
        """Normalized L (B, 1, S, S) -> logits (B, Q, S/4, S/4), or ab / 110 (B, 2, ...) for regression.

        ``forward_features`` gives the backbone's last feature map before pooling (timm ResNets: (B, C, h, w)).
        """
        feats = self.backbone.forward_features(x)
        if feats.dim() != 4:
            raise ValueError(
                f"colorization needs a convolutional backbone whose forward_features returns (B, C, h, w); "
                f"got shape {tuple(feats.shape)}"
            )
        s = self.output_size
        y = self.decoder_in(feats)
        y = self.decoder_mid(F.interpolate(y, size=(max(1, s // 2),) * 2, mode="bilinear", align_corners=False))
        y = F.interpolate(y, size=(s, s), mode="bilinear", align_corners=False)
        return self.decoder_out(y)

    def annealed_mean(self, logits: Tensor, temperature: float | None = None) -> Tensor:
        """Bin logits (B, Q, h, w) -> ab (B, 2, h, w): expectation of the bin centres under softmax(log q / T).

        softmax(log q / T) equals softmax(logits / T). T = 1 is the mean (desaturated), T -> 0 the mode
        (vivid but patchy); the paper's 0.38 sits between.
        """
        t = self.settings.annealed_temperature if temperature is None else float(temperature)
        with _no_autocast(logits):
            probs = torch.softmax(logits.float() / t, dim=1)
            return torch.einsum("bqhw,qc->bchw", probs, self.ab_bins.float())

    def _decode(self, out: Tensor) -> Tensor:
        if self.settings.loss == "classification":
            return self.annealed_mean(out)
        return out.float() * AB_RANGE

    @staticmethod
    def ab_distance(pred: Tensor, true: Tensor) -> Tensor:
        """Mean Euclidean ab distance per pixel (CIE76 ΔE with L given, in Lab units)."""
        return torch.linalg.vector_norm(pred.float() - true.float(), dim=1).mean()

    # -- training ---------------------------------------------------------------------------------------------
    def training_step(self, images: Tensor) -> dict[str, Any]:
        with torch.no_grad():
            crops = self.augment(images)
            x, ab = self.lab_inputs(crops)
        out = self.head_output(x)
        if self.settings.loss == "regression":
            loss = F.mse_loss(out.float(), ab / AB_RANGE)
        else:
            q = self.num_bins
            ab_flat = ab.permute(0, 2, 3, 1).reshape(-1, 2)
            idx, wts = self.soft_encode(ab_flat)
            if self.training:
                self.update_prior(idx, wts)
            w, _ = self.rebalance_weights()
            log_q = F.log_softmax(out.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, q)
            cross_entropy = -(log_q.gather(1, idx) * wts).sum(1)
            loss = (w[idx[:, 0]] * cross_entropy).mean()
        with torch.no_grad():
            ab_error = self.ab_distance(self._decode(out.detach()), ab)
        return {"loss": loss, "ab_error": ab_error}

    # -- evaluation -------------------------------------------------------------------------------------------
    def _resize(self, images: Tensor) -> Tensor:
        s = self.input_size
        images = to_float(images)
        if images.shape[-2:] != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return images.clamp(0.0, 1.0)

    @torch.no_grad()
    def predict_ab(self, images: Tensor) -> Tensor:
        """RGB [0, 1] (B, 3, H, W), resized to input_size -> predicted ab (B, 2, S/4, S/4), in eval mode."""
        was_training = self.training
        self.eval()
        try:
            x, _ = self.lab_inputs(self._resize(images))
            return self._decode(self.head_output(x))
        finally:
            self.train(was_training)

    @torch.no_grad()
    def ab_error(self, images: Tensor) -> float:
        """Mean per-pixel Euclidean ab error of the prediction vs the truth, both at input_size/4."""
        images = self._resize(images)
        _, ab = self.lab_inputs(images)
        return float(self.ab_distance(self.predict_ab(images), ab))

    @torch.no_grad()
    def gray_baseline_error(self, images: Tensor) -> float:
        """The same error for predicting ab = 0 everywhere (a grayscale image): the bar to beat."""
        _, ab = self.lab_inputs(self._resize(images))
        return float(self.ab_distance(torch.zeros_like(ab), ab))

    @torch.no_grad()
    def save_examples_png(self, images: Tensor, path: str | Path, n: int = 6, scale: int = 3) -> Path:
        """A PNG grid, one row per image: gray input | prediction | truth, at input_size x ``scale``.

        The prediction keeps the true L at full resolution and upsamples the predicted ab, as the paper does.
        """
        from PIL import Image

        images = self._resize(images[:n])
        lab = rgb_to_lab(images)
        ab_pred = F.interpolate(self.predict_ab(images), size=images.shape[-2:], mode="bilinear", align_corners=False)
        gray = lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], dim=1))
        pred = lab_to_rgb(torch.cat([lab[:, :1], ab_pred.to(lab.dtype)], dim=1))
        rows = [torch.cat([g, p, t.to(g.dtype)], dim=2) for g, p, t in zip(gray, pred, images)]  # (3, S, 3S)
        grid = torch.cat(rows, dim=1)
        grid = F.interpolate(grid[None].float(), scale_factor=scale, mode="nearest")[0]
        array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
        return path

    @torch.no_grad()
    def heldout_report(
        self, images: Tensor, out_dir: Any, batch_size: int = 128
    ) -> tuple[dict[str, float], dict[str, str]]:
        """Held-out ab error next to the gray baseline (logged as `heldout_ab_error`, `heldout_gray_ab_error`),
        and an example grid PNG (gray | prediction | truth) as an artifact."""
        if len(images) == 0:
            return {}, {}
        err = gray = 0.0
        for chunk in images.split(batch_size):
            err += self.ab_error(chunk) * len(chunk)
            gray += self.gray_baseline_error(chunk) * len(chunk)
        png = self.save_examples_png(images, Path(out_dir) / "colorization_examples.png", n=8)
        return {"ab_error": err / len(images), "gray_ab_error": gray / len(images)}, {"colorization_examples": str(png)}

    def artifact_extras(self) -> dict[str, Any]:
        s: ColorizationSettings = self.settings
        return {"loss": s.loss, "ab_bins": self.num_bins, "grid_size": s.grid_size, "output_stride": OUTPUT_STRIDE}
