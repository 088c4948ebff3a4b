"""Backbone artifacts: safetensors + JSON, identical outputs after a round trip, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.backbones import BackboneError, build_backbone, load_backbone, read_backbone_meta, save_backbone


def _save(tmp_path, name="resnet18", stem=True, **extra):
    torch.manual_seed(0)
    model, dim = build_backbone(name, small_image_stem=stem)
    path = save_backbone(tmp_path / "bb", model, name=name, small_image_stem=stem, in_chans=3, kwargs={},
                         feature_dim=dim, input_size=32, mean=[0.3] * 3, std=[0.2] * 3,
                         provenance={"data_fingerprint": "abc", **extra})
    return model, dim, path


def test_round_trip_gives_identical_outputs(tmp_path):
    model, dim, path = _save(tmp_path)
    model.eval()
    loaded = load_backbone(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert sorted(p.name for p in path.iterdir()) == ["backbone.json", "model.safetensors"]
    meta = read_backbone_meta(path)
    assert meta["feature_dim"] == dim == 512
    assert meta["timm_name"] == "resnet18" and meta["data_fingerprint"] == "abc"
    assert meta["mean"] == [0.3] * 3


def test_small_image_stem_keeps_resolution():
    model, _ = build_backbone("resnet18", small_image_stem=True)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 28, 28)).shape == (2, 512)


def test_other_timm_models_by_name():
    model, dim = build_backbone("resnet10t", small_image_stem=False)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_unknown_model_and_unsupported_stem():
    with pytest.raises(BackboneError, match="unknown timm model 'resnet_nope'"):
        build_backbone("resnet_nope")
    with pytest.raises(BackboneError, match="small_image_stem"):
        build_backbone("vit_tiny_patch16_224", small_image_stem=True, kwargs={"img_size": 32})


def test_corrupted_weights_give_a_clear_error(tmp_path):
    _, _, path = _save(tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BackboneError, match="corrupted or unreadable"):
        load_backbone(path)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    _, _, path = _save(tmp_path)
    meta = json.loads((path / "backbone.json").read_text())
    meta["timm_name"] = "resnet34"
    (path / "backbone.json").write_text(json.dumps(meta))
    with pytest.raises(BackboneError, match="does not match architecture 'resnet34'"):
        load_backbone(path)


def test_not_an_artifact(tmp_path):
    with pytest.raises(BackboneError, match="not a backbone artifact"):
        load_backbone(tmp_path)
