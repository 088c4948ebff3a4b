"""SCAN's building blocks: the loss terms, self-labelling, neighbour batches, and the method on a toy set where
neighbours carry the classes: phase 1 finds the classes, phase 2 trains on its own confident labels, the frozen
backbone does not move and the exported module gives cluster probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from downstream.scan import SCAN, pair_batches, scan_loss, self_label_loss


def test_scan_loss_terms():
    c = 4
    confident = torch.eye(c)[torch.tensor([0, 1, 2, 3])] * 50.0  # each anchor sure of its own cluster
    same = scan_loss(confident, confident, entropy_weight=1.0)
    assert same["consistency"] < 1e-6 and float(same["entropy"]) == pytest.approx(math.log(c), abs=1e-5)
    other = scan_loss(confident, confident.roll(1, dims=0), entropy_weight=1.0)
    assert other["consistency"] > 10  # neighbours in another cluster: large
    collapsed = scan_loss(confident[[0, 0, 0, 0]], confident[[0, 0, 0, 0]], entropy_weight=1.0)
    assert collapsed["entropy"] < 1e-4 and collapsed["loss"] > same["loss"]  # the entropy term punishes collapse


def test_self_label_loss_keeps_confident_images_and_balances_clusters():
    weak = torch.tensor([[9.0, 0, 0], [9.0, 0, 0], [9.0, 0, 0], [0, 9.0, 0], [0.1, 0, 0]])
    strong = torch.zeros(5, 3, requires_grad=True)
    out = self_label_loss(weak, strong, threshold=0.99)
    assert float(out["confident_share"]) == pytest.approx(0.8)
    out["loss"].backward()
    grad = strong.grad
    assert torch.all(grad[4] == 0)  # the unconfident image is left out
    # cluster 1 has one confident image, cluster 0 three: inverse-frequency weights give that one image 3x the pull
    assert float(grad[3, 1].abs()) == pytest.approx(3 * float(grad[0, 0].abs()), rel=1e-5)
    none = self_label_loss(torch.zeros(2, 3), strong[:2], threshold=0.99)
    assert float(none["loss"]) == 0.0 and none["loss"].requires_grad


def test_pair_batches_anchor_then_neighbour():
    rng = np.random.default_rng(0)
    neighbours = rng.integers(0, 50, size=(50, 5))
    ranks = [pair_batches(neighbours, steps=3, batch_size=8, seed=1, epoch=2, rank=r, world_size=2) for r in (0, 1)]
    for batches in ranks:
        assert len(batches) == 3 and all(len(b) == 8 for b in batches)
        for b in batches:
            assert all(b[4 + i] in neighbours[b[i]] for i in range(4))
    anchors = [set(np.concatenate([b[:4] for b in batches]).tolist()) for batches in ranks]
    assert not anchors[0] & anchors[1]  # ranks draw disjoint anchors
    again = pair_batches(neighbours, steps=3, batch_size=8, seed=1, epoch=2, rank=0, world_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(again, ranks[0]))


class MeanColour(nn.Module):
    """A fixed feature extractor (mean colour of each channel, scaled): classes of coloured images separate."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))
        self.num_features = 3

    def forward(self, x):
        return x.mean(dim=(2, 3)) * self.scale


def _toy(n_per_class: int = 40):
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]])
    labels = np.repeat(np.arange(3), n_per_class)
    images = np.clip(colours[labels][:, :, None, None] + rng.normal(0, 25, (len(labels), 3, 16, 16)), 0, 255)
    features = colours[labels] + rng.normal(0, 5, (len(labels), 3))
    dist = ((features[:, None] - features[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    neighbours = np.argsort(dist, axis=1)[:, :5]
    return images.astype(np.uint8), labels, neighbours


@pytest.mark.parametrize("cached", [True, False])
def test_scan_finds_the_classes_then_self_labels_with_a_frozen_backbone(cached):
    """cached: phase 1 on the frozen backbone's features of the images, computed once and looked up by row;
    else on augmented views embedded every step."""
    from clustering import nmi

    torch.manual_seed(0)
    images, labels, neighbours = _toy()
    method = SCAN(MeanColour(), 3, {"clusters": 3, "num_heads": 3, "scan_epochs": 1, "entropy_weight": 2.0,
                                    "confidence_threshold": 0.9, "feature_cache": cached,
                                    "augment": {"cj_prob": 0.0, "random_gray_scale": 0.0}},
                  input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    method.set_neighbours(neighbours)
    backbone_before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    opt = torch.optim.Adam([p for g in method.parameter_groups(0.0) for p in g["params"]], lr=0.05)
    x = torch.from_numpy(images)
    losses = []
    method.train()
    for step in range(30):
        (batch,) = method.epoch_batches(images, epoch=0, rank=0, world_size=1, batch_size=len(images) // 2 * 2,
                                        seed=step)[:1]
        out = method(x[batch].float() / 255, rows=torch.from_numpy(batch))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
    assert losses[-1] < losses[0] - 0.5
    if cached:  # the cache holds what the exported clusterer's backbone computes on each image
        method.eval()
        torch.testing.assert_close(method.cached, method.encode(x.float() / 255))
        method.train()
    else:
        assert method.cached is None
    probs = method.cluster_probabilities(x.float() / 255)
    assert nmi(labels, probs.argmax(1).numpy()) > 0.9

    assert method.epoch_batches(images, epoch=1, rank=0, world_size=1, batch_size=32, seed=0) is None
    assert method.phase == "selflabel" and int(method.kept_head) == int(torch.argmin(method.head_loss))
    out = method(x.float() / 255)
    assert float(out["confident_share"]) > 0.5 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for k, v in method.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k  # frozen: no update, no gradient
    assert method.backbone.scale.grad is None

    module, meta = method.export_module()
    assert meta["export"] == "scan_clusterer" and meta["clusters"] == 3
    p = module(method.normalize(x[:5].float() / 255))
    assert p.shape == (5, 3) and torch.allclose(p.sum(1), torch.ones(5))


def test_feature_cache_maps_grayscale_images_to_an_rgb_backbone():
    """Grayscale training images, an RGB conv backbone with per-channel (ImageNet) statistics: the cache embeds
    each image as the loop's batches are (repeated to 3 channels), the same features as from the RGB copies."""
    from pipeline.backbones import build_backbone

    gray = np.random.default_rng(0).integers(0, 256, (12, 1, 16, 16), dtype=np.uint8)
    torch.manual_seed(0)
    backbone, dim = build_backbone("test_resnet")
    method = SCAN(backbone, dim, {"clusters": 3, "num_heads": 2, "scan_epochs": 1},
                  input_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    method.cache_features(gray)
    method.eval()
    rgb = torch.from_numpy(np.repeat(gray, 3, axis=1)).float() / 255
    torch.testing.assert_close(method.cached, method.encode(rgb))


def test_cluster_stage_config():
    """A cluster stage runs both phases in one fit; C and phase 1's length come from the stage's keys only."""
    from pipeline.config import ConfigError, validate_config

    base = {"name": "c", "data": {"source": "digits"}, "stages": [
        {"name": "p", "kind": "pretext", "method": "rotation", "epochs": 1},
        {"name": "scan", "kind": "cluster", "input": "p", "epochs": 3, "selflabel_epochs": 2, "clusters": "auto"}]}
    stage = validate_config(base).stages[1]
    job = stage.job(7)
    assert job.epochs == 5 and job.settings["clusters"] == 7 and job.settings["scan_epochs"] == 3
    for bad, message in (({"clusters": 1}, "at least 2"), ({"settings": {"clusters": 4}}, "settings.clusters is set by the stage"),
                         ({"clusters_range": [5, 3]}, "clusters_range"), ({"input": None}, "input")):
        cfg = {**base, "stages": [base["stages"][0], {**base["stages"][1], **bad}]}
        with pytest.raises(ConfigError, match=message):
            validate_config(cfg)


def test_nearest_neighbours_are_the_brute_force_ones():
    from downstream.knn import nearest_neighbours

    x = np.random.default_rng(3).normal(size=(60, 8)).astype(np.float32)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    expected = np.argsort(-sim, axis=1)[:, :5]
    np.testing.assert_array_equal(nearest_neighbours(x, 5), expected)
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbours(x, 60)


def test_cluster_stage_learns_the_classes_and_self_labelling_keeps_them(tmp_path, ray_session):
    """Three colour classes of photos: SCAN from a barely trained backbone finds them (NMI near 1), the
    self-labelled stage is no worse, and assignments carry one confidence in [0, 1] per image."""
    from PIL import Image

    from clustering import read_assignments
    from pipeline.config import validate_config
    from pipeline.runner import PipelineRun

    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(32):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    scan = {"kind": "cluster", "input": "p", "epochs": 8, "batch_size": 32, "optimizer": {"lr": 0.05, "warmup_epochs": 0},
            "settings": {"num_heads": 2, "num_neighbors": 5, "confidence_threshold": 0.9}}
    cfg = validate_config({
        "name": "scan", "seed": 0, "data": {"source": "folder", "root": str(tmp_path / "imgs"), "load_size": 16},
        "backbone": {"name": "resnet18", "small_image_stem": True, "stem_stride": 2, "image_size": 16},
        "ray": {"num_workers": 2},
        "stages": [{"name": "p", "kind": "pretext", "method": "rotation", "epochs": 1, "batch_size": 32,
                    "evaluate": False},
                   {"name": "scan", **scan}, {"name": "scan_selflabel", **scan, "selflabel_epochs": 2}]})
    summary = PipelineRun(cfg, tmp_path / "out", log=lambda m: None).run()
    plain, labelled = (summary["stages"][s]["metrics"] for s in ("scan", "scan_selflabel"))
    assert plain["clusters"] == 3 and plain["neighbour_label_agreement"] > 0.9
    assert plain["nmi"] > 0.8, plain
    assert labelled["nmi"] >= plain["nmi"] - 0.02, (plain["nmi"], labelled["nmi"])
    rows = read_assignments(summary["stages"]["scan_selflabel"]["artifacts"]["assignments"])
    assert len(rows) == 96
    confidence = np.array([float(r["confidence"]) for r in rows])
    assert ((confidence >= 0) & (confidence <= 1)).all()
    np.testing.assert_allclose(confidence, 1.0 - np.array([float(r["distance"]) for r in rows]), atol=1e-5)
