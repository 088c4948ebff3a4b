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
    worker = types.SimpleNamespace(method=model, world=1, rank=1, steps_per_epoch=3,  # rank 1 writes no marker
                                   device=torch.device("cpu"))
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


def test_compile_warm_up_leaves_training_untouched_and_keeps_the_faster_backbone():
    """The warm-up compiles outside the timed epochs and has no effect on what the stage computes: weights,
    BatchNorm statistics, gradients and the random streams are as before it; it keeps the compiled backbone
    only when its step was faster than the eager one."""
    import random
    import types

    import numpy as np

    from pipeline.trainer import build_optimizer, build_stage_method, warm_up_compile

    torch.manual_seed(0)
    job = TrainJob(stage={"name": "s", "method": "simclr", "settings": {}, "channels_last": False, "compile": True},
                   backbone={"name": "test_resnet", "small_image_stem": False, "stem_stride": 1, "in_chans": 3,
                             "kwargs": {}, "image_size": 16},
                   seed=0, data=[], mean=[0.5] * 3, std=[0.2] * 3)
    method, _ = build_stage_method(job, torch.device("cpu"))
    optimizer = build_optimizer(method.parameter_groups(1e-4), {"name": "adamw", "lr": 1e-3, "momentum": 0.9})
    images = np.random.default_rng(0).integers(0, 255, size=(16, 1, 16, 16), dtype=np.uint8)
    worker = types.SimpleNamespace(job=job, stage=job.stage, rank=0, world=1, device=torch.device("cpu"),
                                   images=images, labels=None, model=method, method=method, image_augment=None,
                                   batch_mix=None, local_batch=8, optimizer=optimizer, use_amp=False, hooks=None)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    streams = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    report = warm_up_compile(worker)

    assert all(torch.equal(state[k], v) for k, v in method.state_dict().items())
    assert all(p.grad is None for p in method.parameters())
    assert torch.equal(torch.get_rng_state(), streams[0]) and np.array_equal(np.random.get_state()[1], streams[1])
    assert random.getstate() == streams[2]
    assert report["compile_time_s"] > report["compiled_step_s"] > 0 and report["eager_step_s"] > 0
    kept = report["compiled_step_s"] < report["eager_step_s"]
    assert report["compiled"] == float(kept)
    assert (method.backbone._compiled_call_impl is not None) == kept


RESUME_METHODS = {
    "simclr": {"hidden_dim": 16, "output_dim": 8},
    # a frozen teacher rebuilt from its spec on resume (not in the checkpoint), queue loss: a buffer to restore too
    "distill": {"teacher": {"name": "test_resnet", "random_init": True, "input_size": 16}, "loss": "queue",
                "queue_size": 32},
    # SCAN's phase 1 on anchor/neighbour halves, the backbone at a tenth of the heads' rate; its running per-head
    # losses are buffers that must come back too
    "scan": {"clusters": 3, "num_heads": 2, "backbone_lr_scale": 0.1},
}


def _training(seed: int, tmp_path=None, method: str = "simclr"):
    """A Worker around a tiny SimCLR (random augmentation: the torch RNG matters), AdamW and the warmup +
    cosine schedule, as setup_worker builds them, on one CPU process."""
    import numpy as np

    from pipeline.trainer import Worker, build_optimizer, build_stage_method

    torch.manual_seed(seed)
    job = TrainJob(stage={"name": "s", "method": method, "channels_last": False, "epochs": 1,
                          "settings": RESUME_METHODS[method]},
                   backbone={"name": "test_resnet", "small_image_stem": False, "stem_stride": 1, "in_chans": 3,
                             "kwargs": {}, "image_size": 16},
                   seed=seed, data=[], mean=[0.5] * 3, std=[0.2] * 3)
    method, feature_dim = build_stage_method(job, torch.device("cpu"))
    optimizer = build_optimizer(method.parameter_groups(1e-4), {"name": "adamw", "lr": 1e-2})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 8, 3, 0.1))
    images = np.random.default_rng(0).integers(0, 256, (32, 3, 16, 16), dtype=np.uint8)
    return Worker(job, 0, 1, torch.device("cpu"), images, None, method, method, feature_dim, None, None, None,
                  8, 8, optimizer, scheduler, 0, False, None)


def _steps(w, first: int, count: int) -> None:
    """train_step on batches drawn with numpy's global RNG (so its state matters as well as torch's)."""
    import numpy as np

    from pipeline.trainer import train_step

    for step in range(first, first + count):
        idx = np.sort(np.random.choice(len(w.images), w.local_batch, replace=False))
        assert train_step(w, idx, 0, step) is not None


@pytest.mark.parametrize("method", list(RESUME_METHODS))
def test_resume_restores_weights_optimizer_schedule_and_random_state(tmp_path, method):
    """Train 3 steps, checkpoint, train 3 more; a fresh method/optimizer/scheduler loaded from the checkpoint
    (after other random numbers were drawn) takes the same 3 steps to the same place."""
    import random

    import numpy as np

    from pipeline.trainer import load_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    np.random.seed(5)
    random.seed(5)
    a = _training(seed=0, method=method)
    _steps(a, 0, 3)
    save_checkpoint(tmp_path, a.method, a.optimizer, a.scheduler, {"epoch": 0}, a.job, a.feature_dim)
    _steps(a, 3, 3)
    expected_draws = (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random())

    # another process: other seeds, other initial weights; everything comes from the checkpoint
    np.random.seed(77)
    random.seed(77)
    b = _training(seed=1, method=method)
    torch.rand(10)
    load_checkpoint(tmp_path, b.method, b.optimizer, b.scheduler, rank=0)
    assert b.scheduler.last_epoch == 3
    _steps(b, 3, 3)

    assert b.scheduler.get_last_lr() == a.scheduler.get_last_lr()
    assert b.scheduler.last_epoch == a.scheduler.last_epoch == 6
    for (name, x), y in zip(a.method.state_dict().items(), b.method.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=0, atol=0, msg=name)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for key, state in sa["state"].items():
        for field, value in state.items():
            torch.testing.assert_close(sb["state"][key][field], value, rtol=0, atol=0, msg=f"{key} {field}")
    assert (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()) == expected_draws
