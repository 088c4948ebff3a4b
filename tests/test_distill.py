"""Distillation: the student learns the frozen teacher's embeddings, the teacher never changes and stays out of the
optimizer, the checkpoint and DDP, teachers are built from artifacts or timm names + safetensors weights, a bad
teacher spec is a config error naming the key, and the method trains and resumes in the Ray Train loop.
(DDP equivalence with one process: test_distributed.py; exact resume: test_trainer.py.)"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.backbones import BackboneError, build_backbone, load_backbone, save_backbone
from pipeline.teachers import build_teacher
from pretext import build_method
from pretext.distill import Distill, Teacher

# One fixed view per image: no crop, flip, colour change or mixup, so the loss of a fixed batch is a function of
# the weights alone.
FIXED = {"mixup": False, "augment": {"min_scale": 1.0, "cj_prob": 0.0, "random_gray_scale": 0.0, "hf_prob": 0.0}}
RANDOM_TEACHER = {"name": "test_resnet", "random_init": True, "input_size": 24}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def backbone_artifact(folder: Path, name: str = "test_resnet") -> Path:
    """A randomly initialised tiny backbone saved as an artifact (16 px input, its own normalization)."""
    torch.manual_seed(1)
    model, dim = build_backbone(name)
    return save_backbone(folder / f"artifact-{name}", model, name=name, small_image_stem=False, in_chans=3,
                         kwargs={}, feature_dim=dim, input_size=16, mean=[0.5] * 3, std=[0.2] * 3)


def _method(teacher_spec=RANDOM_TEACHER, **settings) -> Distill:
    teacher, dim = build_teacher(teacher_spec)
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("test_resnet")
    return build_method("distill", backbone, feature_dim, {"teacher": teacher_spec, **settings}, input_size=16,
                        mean=[0.5] * 3, std=[0.25] * 3, teacher=teacher, teacher_dim=dim)


def _images(n=16, size=20) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    tint = torch.rand(n, 3, 1, 1, generator=g)
    return (0.4 * torch.rand(n, 3, size, size, generator=g) + 0.6 * tint).clamp(0, 1)


@pytest.mark.parametrize("loss", ["cosine", "mse", "queue"])
def test_the_loss_falls_on_a_fixed_batch_and_the_teacher_stays_frozen(loss):
    method = _method(loss=loss, queue_size=64, **FIXED)
    teacher = method.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher_params = {id(p) for p in teacher.parameters()}
    groups = method.parameter_groups(1e-4)
    assert not teacher_params & {id(p) for g in groups for p in g["params"]}
    assert not any(k.startswith(("teacher.", "_teacher")) for k in method.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())

    optimizer = torch.optim.AdamW(groups, lr=3e-3)
    x = _images()
    losses = []
    method.train()
    for _ in range(12):
        out = method(x)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    print(f"{loss}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, cosine {float(out['cosine']):.3f}")
    assert losses[-1] < 0.7 * losses[0], losses
    assert not teacher.training and method.training  # the loop's train() never reaches the teacher
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_cached_targets_are_the_teachers_embeddings_of_the_images_and_the_loss_falls_on_them():
    """targets: cached -- the teacher embeds the unaugmented images once (epoch_batches); steps look targets up by
    row (a changed cache changes the loss), and the student learns them on a fixed batch."""
    import numpy as np

    method = _method(targets="cached", **FIXED)
    images = (_images(12) * 255).round().to(torch.uint8).numpy()
    assert method.wants_rows and method.cached is None
    assert method.epoch_batches(images, epoch=0, rank=0, world_size=1, batch_size=4, seed=0) is None
    with torch.no_grad():
        expected = method.teacher(torch.from_numpy(images).float() / 255)
    torch.testing.assert_close(method.cached, expected)

    rows = torch.arange(3, 11)
    batch = torch.from_numpy(images[rows.numpy()])
    cache = method.cached.clone()
    method.cached = -cache  # the targets come from the cache, by row
    flipped = float(method(batch, rows=rows)["loss"])
    method.cached = cache
    optimizer = torch.optim.AdamW(method.parameter_groups(1e-4), lr=3e-3)
    method.train()
    losses = []
    for _ in range(12):
        out = method(batch, rows=rows)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    print(f"cached: loss {losses[0]:.4f} -> {losses[-1]:.4f}; with negated targets {flipped:.4f}")
    with pytest.raises(ValueError, match="needs the batch's rows"):  # never silently the teacher on the batch
        method(batch)
    assert abs(flipped - (2.0 - losses[0])) < 1e-4  # cosine loss: 1 - cos against -t is 2 - (1 - cos against t)
    assert losses[-1] < 0.7 * losses[0], losses
    assert np.isfinite(losses).all()


def test_held_out_cosine_and_the_exported_backbone():
    method = _method(**FIXED)
    metrics, artifacts = method.heldout_report(_images(8), out_dir=None)
    assert artifacts == {} and -1.0 <= metrics["distill_cosine"] <= 1.0
    module, extra = method.export_module()
    assert module is method.backbone and extra == {}


def test_checkpoint_round_trip_is_strict_and_refuses_another_teacher():
    method = _method(loss="queue", queue_size=32)
    method(_images(8))  # fills part of the queue
    state = method.state_dict()
    again = _method(loss="queue", queue_size=32)
    again.load_state_dict(state, strict=True)
    assert torch.equal(again.queue.bank, method.queue.bank)
    other = _method({**RANDOM_TEACHER, "seed": 1}, loss="queue", queue_size=32)
    with pytest.raises(RuntimeError, match="teacher with other weights"):
        other.load_state_dict(state, strict=True)


def test_to_moves_the_teacher_with_the_method():
    method = _method()
    method.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in method.teacher.parameters())
    method.to(torch.float32)


def test_teacher_from_an_artifact_uses_its_size_normalization_and_embedding(tmp_path):
    artifact = backbone_artifact(tmp_path, "test_resnet")
    teacher, dim = build_teacher({"artifact": str(artifact)})
    model, meta = load_backbone(artifact, with_meta=True)
    assert isinstance(teacher, Teacher) and dim == meta["feature_dim"] and teacher.input_size == 16
    assert teacher.normalize.std.flatten().tolist() == pytest.approx([0.2] * 3)
    x = torch.rand(3, 1, 28, 28)  # grayscale at another size: the teacher maps channels and resizes itself
    expected = model(((torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear",
                                                       antialias=True)) - 0.5) / 0.2)
    torch.testing.assert_close(teacher(x), expected)


def test_teacher_from_a_timm_name_and_a_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file

    donor, _ = build_backbone("test_resnet")
    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(weights))
    teacher, dim = build_teacher({"name": "test_resnet", "weights": str(weights)})
    assert dim == donor.num_features
    assert all(torch.equal(donor.state_dict()[k], v) for k, v in teacher.module.state_dict().items())
    assert teacher.normalize.mean.flatten().tolist() == pytest.approx(list(donor.pretrained_cfg["mean"]))

    other = tmp_path / "other.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(other))
    with pytest.raises(BackboneError, match=r"settings\.teacher\.weights: .* does not match timm model"):
        build_teacher({"name": "test_resnet", "weights": str(other)})



def test_a_teacher_file_with_its_classifier_loads_without_it(tmp_path, monkeypatch):
    """An ImageNet state dict with its classifier (what `make weights` writes) is a teacher: the classifier keys
    are dropped, every other key loads strictly; `~` in the path is the home folder."""
    import timm
    from safetensors.torch import save_file

    donor = timm.create_model("test_resnet", num_classes=10)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "with_head.safetensors"))
    monkeypatch.setenv("HOME", str(tmp_path))
    teacher, dim = build_teacher({"name": "test_resnet", "weights": "~/with_head.safetensors"})
    assert dim == donor.num_features
    assert all(torch.equal(donor.state_dict()[k], v) for k, v in teacher.module.state_dict().items())


CONFIG = {
    "name": "distill",
    "seed": 0,
    "data": {"source": "digits", "train_subset": 128, "eval_subset": 64},
    "backbone": {"name": "test_resnet", "small_image_stem": False, "image_size": 16},
    "ray": {"num_workers": 2, "max_failures": 0},
    "tracking": {},
    "registry": {"enabled": False},
    "stages": [{"name": "distill", "kind": "pretext", "method": "distill", "epochs": 2, "batch_size": 32,
                "evaluate": False, "checkpoint_every": 1, "log_every_steps": 2, "settings": {}}],
}


def _config(teacher: dict) -> dict:
    data = copy.deepcopy(CONFIG)
    data["stages"][0]["settings"] = {"teacher": teacher}
    return data


@pytest.mark.parametrize("teacher, message", [
    ({"artifact": "/nowhere/teacher"}, "settings.teacher.artifact: '/nowhere/teacher' is not a backbone artifact"),
    ({"artifact": "ART", "name": "resnet18"}, "settings.teacher: give either artifact: (a backbone artifact folder) "
                                              "or name:"),
    ({"name": "resnet18"}, "settings.teacher: weights: a teacher given by name needs weights"),
    ({"name": "resnet18", "pretrained": True}, "settings.teacher: pretrained: hub weights are not supported"),
    ({"name": "resnet18", "weights": "/nowhere/w.safetensors"}, "settings.teacher.weights: file not found"),
    ({"name": "resnet18", "weights": "w.pt"}, "settings.teacher.weights: expected a .safetensors state dict"),
    ({"artifact": "ART", "mean": [0.5]}, "settings.teacher: mean: applies to a teacher given by name:"),
    ({}, "settings.teacher: give artifact:"),
])
def test_a_bad_teacher_spec_is_a_config_error_naming_the_key(tmp_path, teacher, message):
    from pipeline.config import ConfigError, validate_config

    artifact = str(backbone_artifact(tmp_path, "test_resnet"))
    teacher = {k: (artifact if v == "ART" else v) for k, v in teacher.items()}
    with pytest.raises(ConfigError) as err:
        validate_config(_config(teacher))
    assert f"stages[distill].{message}" in str(err.value)


def test_cached_targets_with_mixup_is_a_config_error(tmp_path):
    from pipeline.config import ConfigError, validate_config

    data = _config({"artifact": str(backbone_artifact(tmp_path))})
    data["stages"][0]["settings"].update(targets="cached")  # mixup defaults to true
    with pytest.raises(ConfigError, match=r"stages\[distill\]\.settings.*targets: cached.*set mixup: false"):
        validate_config(data)


def test_a_missing_teacher_is_a_config_error(tmp_path):
    from pipeline.config import ConfigError, validate_config

    data = copy.deepcopy(CONFIG)
    with pytest.raises(ConfigError, match=r"stages\[distill\]\.settings\.teacher: Field required"):
        validate_config(data)


def test_trains_in_the_ray_loop_and_resumes_after_a_stop(ray_session, tmp_path, monkeypatch):
    """2 workers x 16 images, 2 epochs of 4 steps. The first run's loss turns NaN in epoch 2 (fault hook): the
    stage stops with the checkpoint after epoch 1; the same config again resumes from it (the teacher rebuilt from
    its artifact, the strict state-dict load accepting its fingerprint, the cached targets embedded again) and
    finishes. Cached targets: each worker embeds half the images and the halves are gathered; each batch's rows
    pass through DDP's forward."""
    from pipeline.config import validate_config
    from pipeline.runner import PipelineRun
    from pipeline.trainer import NonFiniteLossError

    artifact = backbone_artifact(tmp_path, "test_resnet")
    config = _config({"artifact": str(artifact)})
    config["stages"][0]["settings"].update(head_hidden_dim=32, targets="cached", mixup=False)
    out = tmp_path / "out"
    progress = tmp_path / "progress"
    monkeypatch.setenv("SSLPIPE_TEST_PROGRESS_FILE", str(progress))
    monkeypatch.setenv("SSLPIPE_TEST_NAN_AT_EPOCH", "2")
    with pytest.raises(NonFiniteLossError):
        PipelineRun(validate_config(copy.deepcopy(config)), out).run()
    monkeypatch.delenv("SSLPIPE_TEST_NAN_AT_EPOCH")

    summary = PipelineRun(validate_config(copy.deepcopy(config)), out).run()
    state = json.loads(Path(f"{progress}.rank0").read_text())
    assert state["start_epoch"] == 1 and state["epoch"] == 2  # resumed after epoch 1, not from scratch
    stage = summary["stages"]["distill"]
    metrics = stage["metrics"]
    print({k: metrics[k] for k in ("loss", "cosine", "heldout_distill_cosine")})
    assert math.isfinite(metrics["loss"]) and -1.0 <= metrics["heldout_distill_cosine"] <= 1.0
    backbone = Path(stage["artifacts"]["backbone"])
    meta = json.loads((backbone / "backbone.json").read_text())
    assert meta["epochs_trained"] == 2 and meta["timm_name"] == "test_resnet"
    student = load_backbone(backbone)  # the student alone: a plain pretext backbone artifact
    with torch.no_grad():
        assert student(torch.rand(2, 3, 16, 16)).shape == (2, meta["feature_dim"])
