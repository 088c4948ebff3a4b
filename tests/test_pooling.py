"""GeM and NetVLAD pooling: the formulas, and a metric-learning artifact that embeds with the pooling it was
trained with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretext.pooling import GeM, NetVLAD

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_gem_spans_average_to_max_pooling_and_learns_p():
    x = torch.rand(2, 3, 4, 5) + 0.01
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(2, 3)))
    near_max = GeM(p=200.0)(x)
    torch.testing.assert_close(near_max, x.amax(dim=(2, 3)), rtol=0.03, atol=0.0)
    gem = GeM(p=3.0)
    gem(x).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs() > 0


def test_netvlad_equals_the_formula():
    torch.manual_seed(0)
    vlad = NetVLAD(dim=4, clusters=3, alpha=5.0)
    vlad.init_centres(F.normalize(torch.randn(3, 4), dim=1))
    x = torch.randn(2, 4, 3, 2)
    got = vlad(x)
    expected = []
    for b in range(2):
        desc = F.normalize(x[b].reshape(4, -1).T, dim=1)  # (N, C) local descriptors, L2-normalized
        logits = desc @ vlad.assign.weight[:, :, 0, 0].T + vlad.assign.bias  # (N, K)
        a = torch.softmax(logits, dim=1)
        v = torch.stack([(a[:, k:k + 1] * (desc - vlad.centres[k])).sum(0) for k in range(3)])  # (K, C)
        v = F.normalize(v, dim=1).flatten()
        expected.append(F.normalize(v, dim=0))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert got.shape == (2, 12) and int(vlad.initialised) == 1
    # the assignment follows the centres: w_k = 2 alpha c_k, b_k = -alpha |c_k|^2
    torch.testing.assert_close(vlad.assign.weight[:, :, 0, 0], 10.0 * vlad.centres)


@pytest.mark.parametrize("pooling", ["gem", "netvlad"])
def test_metric_artifact_embeds_with_its_pooling(tmp_path, pooling):
    from downstream.metric import MetricLearning
    from pipeline.backbones import build_backbone, load_backbone, save_backbone

    torch.manual_seed(0)
    backbone, dim = build_backbone("test_resnet")
    method = MetricLearning(backbone, dim, {"pooling": pooling, "netvlad_clusters": 4, "embedding_dim": 8},
                            input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    images = np.random.default_rng(0).integers(0, 256, (40, 3, 16, 16), dtype=np.uint8)
    method.set_train_labels(np.repeat(np.arange(4), 10))
    method.epoch_batches(images, epoch=0, rank=0, world_size=1, batch_size=8, seed=0)
    if pooling == "netvlad":
        assert int(method.pool.initialised) == 1  # centres from k-means of the backbone's local descriptors
    module, meta = method.export_module()
    save_backbone(tmp_path / "art", module, name="test_resnet", small_image_stem=False, in_chans=3, kwargs={},
                  feature_dim=dim, input_size=16, mean=[0.5] * 3, std=[0.25] * 3, provenance=meta)
    loaded = load_backbone(tmp_path / "art")
    method.eval()
    x = torch.from_numpy(images[:6]).float() / 255
    expected = method.embed(x)
    got = loaded(method.normalize(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got.shape == (6, 8)


def test_stml_can_pool_with_gem():
    """A refine (STML) stage's `pooling: gem` is GeM with p = 3 on the feature map (student and teacher alike)."""
    from pipeline.backbones import build_backbone
    from pretext.stml import pooled_features

    torch.manual_seed(0)
    backbone, _ = build_backbone("test_resnet")
    x = torch.rand(2, 3, 16, 16)
    fmap = backbone.forward_features(x)
    torch.testing.assert_close(pooled_features(backbone, x, "gem"), GeM(p=3.0)(fmap))


def test_pca_whitening_gives_unit_variance_components():
    """The projection NetVLAD's head starts from: the sample's top principal components, each at unit variance
    and zero mean; rows beyond the sample's rank stay zero."""
    from downstream.metric import pca_whitening

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(50, 12)) @ np.diag(np.linspace(0.1, 5.0, 12)) + 3.0).float()
    weight, bias = pca_whitening(x, 6)
    z = (x @ weight.t() + bias).double()
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(6, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cov(z.t()), torch.eye(6, dtype=torch.float64), atol=1e-3, rtol=0)
    weight, bias = pca_whitening(x[:4], 6)  # rank 3: three directions, three zero rows
    assert (weight.abs().sum(dim=1) > 0).tolist() == [True] * 3 + [False] * 3
    degenerate = torch.cat([x[:, :3], 2 * x[:, :1]], dim=1)  # a column that copies another: rank 3 of 4
    weight, _ = pca_whitening(degenerate, 4)
    assert (weight.abs().sum(dim=1) > 0).tolist() == [True] * 3 + [False]
    assert float(weight.abs().max()) < 100  # no direction scaled up by 1 / (a rounding error)
    assert float(pca_whitening(x[:1], 4)[0].abs().sum()) == 0.0  # one image: nothing to whiten


def test_netvlad_head_starts_as_pca_whitening_of_the_sample():
    from downstream.metric import MetricLearning
    from pipeline.backbones import build_backbone

    torch.manual_seed(0)
    backbone, dim = build_backbone("test_resnet")
    images = np.random.default_rng(0).integers(0, 256, (40, 3, 16, 16), dtype=np.uint8)
    for whiten in (True, False):
        method = MetricLearning(backbone, dim, {"pooling": "netvlad", "netvlad_clusters": 4, "embedding_dim": 8,
                                                "netvlad_whiten_init": whiten},
                                input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
        method.set_train_labels(np.repeat(np.arange(4), 10))
        method.epoch_batches(images, epoch=0, rank=0, world_size=1, batch_size=8, seed=0)
        method.eval()
        with torch.no_grad():
            z = method.head(method.descriptors(torch.from_numpy(images).float() / 255)).double()
        variances = z.var(dim=0)
        if whiten:  # the k-means sample is all 40 images here: whitened exactly
            torch.testing.assert_close(variances, torch.ones(8, dtype=torch.float64), atol=1e-3, rtol=0)
        else:
            assert variances.max() < 0.1  # nn.Linear's default init: far from unit variance


def test_evaluate_features_can_pool_a_backbone_with_gem(tmp_path):
    """An evaluate stage's `features: backbone` + `pooling: gem` embeds with GeM (p = 3) of the artifact's feature
    map; `pooling: gem` on an artifact's embedding is refused with the key named."""
    from pydantic import ValidationError

    from pipeline.backbones import build_backbone, save_backbone
    from pipeline.config import EvaluateStage
    from pipeline.evaluate import backbone_features

    torch.manual_seed(0)
    backbone, dim = build_backbone("test_resnet")
    save_backbone(tmp_path / "art", backbone, name="test_resnet", small_image_stem=False, in_chans=3, kwargs={},
                  feature_dim=dim, input_size=64, mean=[0.5] * 3, std=[0.25] * 3)
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 64, 64), dtype=np.uint8)  # a 2x2 final map
    got = backbone_features(tmp_path / "art", images, 4, bare=True, pooling="gem")
    x = (torch.from_numpy(images).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        expected = GeM(p=3.0)(backbone.eval().forward_features(x))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, backbone_features(tmp_path / "art", images, 4, bare=True), atol=1e-3)

    EvaluateStage(name="e", kind="evaluate", input="pretrained", features="backbone", pooling="gem")
    with pytest.raises(ValidationError, match="set features: backbone"):
        EvaluateStage(name="e", kind="evaluate", input="pretrained", pooling="gem")


def test_netvlad_initialises_from_grayscale_images_for_an_rgb_backbone():
    """Grayscale training images and an RGB backbone with per-channel (ImageNet) statistics: NetVLAD's start
    embeds them as the loop's batches are (repeated to 3 channels), the same centres as from the RGB copies."""
    from downstream.metric import MetricLearning
    from pipeline.backbones import build_backbone

    gray = np.random.default_rng(0).integers(0, 256, (40, 1, 16, 16), dtype=np.uint8)
    centres = []
    for images in (gray, np.repeat(gray, 3, axis=1)):
        torch.manual_seed(0)
        backbone, dim = build_backbone("test_resnet")
        method = MetricLearning(backbone, dim, {"pooling": "netvlad", "netvlad_clusters": 4, "embedding_dim": 8},
                                input_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        method.set_train_labels(np.repeat(np.arange(4), 10))
        method.epoch_batches(images, epoch=0, rank=0, world_size=1, batch_size=8, seed=0)
        assert int(method.pool.initialised) == 1
        centres.append(method.pool.centres.detach().clone())
    torch.testing.assert_close(centres[0], centres[1])
