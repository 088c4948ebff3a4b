"""The shared Ray Train worker loop: schedule, precision choice, compiling, and how a local Ray starts.
Resuming from a checkpoint is checked end to end in test_interrupt (a stopped run) and test_faults (a killed worker)."""

from __future__ import annotations

import pytest
import torch

from pipeline.trainer import TrainJob, lr_factor, resolve_precision


def test_warmup_then_cosine():
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, total, warmup, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, total, warmup, 0.0) == pytest.approx(1.0)
    # halfway through the cosine part: 0.5 * (1 + cos(pi/2)) = 0.5
    assert lr_factor(55, total, warmup, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, total, warmup, 0.1) == pytest.approx(0.1)
    values = [lr_factor(s, total, warmup, 0.0) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_precision_auto_is_fp32_on_cpus_and_bf16_stays_opt_in(monkeypatch):
    """CPU bf16 autocast poisoned weights here (see resolve_precision): `auto` never picks it on a CPU."""
    import pipeline.trainer as trainer

    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"


def test_a_non_finite_weight_stops_training_even_when_the_loss_is_finite():
    import types

    from pipeline.trainer import weights_finite

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    worker = types.SimpleNamespace(method=model, world=1, rank=1, steps_per_epoch=3)  # rank 1 writes no marker
    assert weights_finite(worker, epoch=0)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    assert not weights_finite(worker, epoch=0)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("inf")
    assert not weights_finite(worker, epoch=0)


def test_compile_option_compiles_the_backbone_in_place():
    """`compile: true` compiles the backbone in place without changing what is saved."""
    from pipeline.trainer import build_stage_method

    def build(compile_: bool):
        torch.manual_seed(0)
        job = TrainJob(stage={"name": "s", "method": "simclr", "settings": {}, "channels_last": False,
                              "compile": compile_},
                       backbone={"name": "test_resnet", "small_image_stem": False, "stem_stride": 1, "in_chans": 3,
                                 "kwargs": {}, "image_size": 16},
                       seed=0, data=[], mean=[0.5] * 3, std=[0.2] * 3)
        return build_stage_method(job, torch.device("cpu"))[0]

    plain, compiled = build(False), build(True)
    assert compiled.backbone._compiled_call_impl is not None and plain.backbone._compiled_call_impl is None
    # checkpoints and artifacts keep their keys (no `_orig_mod.` prefix), so a compiled run resumes and
    # exports like a plain one; compiling itself is lazy (first forward) and left to the pipeline tests' cost
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("local_metrics", [False, True])
def test_a_local_ray_leaves_out_its_metrics_collectors_unless_asked(monkeypatch, local_metrics):
    """On a small machine Ray's metrics agents take cycles from training; a cluster keeps its own setting."""
    import ray

    from pipeline.trainer import LEAN_LOCAL_RAY, ray_init

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_init(None, num_cpus=2, local_metrics=local_metrics)
    assert calls[-1].get("_system_config") == (None if local_metrics else LEAN_LOCAL_RAY)
    assert LEAN_LOCAL_RAY["enable_metrics_collection"] is False
    ray_init("10.0.0.5:6379", local_metrics=False)
    assert calls[-1]["address"] == "10.0.0.5:6379" and "_system_config" not in calls[-1]
