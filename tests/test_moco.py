"""MoCo: the key queue is a true FIFO, the key encoder follows the EMA rule and gets no gradients, v2 and v3
train, two Ray Train workers (shuffled BN) share one queue of gathered keys, and the backbone artifact round-trips."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from torch import nn

from pretext import build_method
from pretext.moco import KeyQueue, MoCo, momentum_at


def tiny_backbone() -> nn.Module:
    """A conv + BN net with 8 pooled features: enough structure (BN buffers) at a fraction of a ResNet."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_moco(**settings) -> MoCo:
    settings = {"hidden_dim": 16, "output_dim": 8, "memory_bank_size": 32, **settings}
    return build_method("moco", tiny_backbone(), 8, settings, input_size=12)


class FixedViews(nn.Module):
    """Deterministic stand-in for the augmentation: view 0 is the image, view 1 its mirror."""

    def forward(self, x):
        half = x.shape[0] // 2
        return torch.cat([x[:half], x[half:].flip(-1)], dim=0)


# -- the queue -----------------------------------------------------------------------------------

def test_queue_is_fifo_and_wraps_around():
    torch.manual_seed(0)
    size, dim, batch = 10, 3, 4  # 10 is not a multiple of 4: pushes straddle the end of the ring
    queue = KeyQueue(size, dim, gather_distributed=False)
    initial = queue.bank.clone()
    pushed = []
    for step in range(6):
        keys = torch.arange(step * batch, (step + 1) * batch, dtype=torch.float32).unsqueeze(1).expand(batch, dim)
        queue(keys, update=True)
        pushed.append(keys)
        everything = torch.cat(pushed)
        n = everything.shape[0]
        assert int(queue.bank_ptr) == n % size
        if n >= size:
            assert torch.equal(queue.ordered(), everything[-size:])
        else:  # not yet full: the first n slots hold the keys, the rest still the random initial entries
            assert torch.equal(queue.bank[:n], everything)
            assert torch.equal(queue.bank[n:], initial[n:])
    # A batch longer than the ring keeps only its newest keys, in order.
    big = torch.randn(13, dim)
    queue(big, update=True)
    assert torch.equal(queue.ordered(), big[-size:])


def test_queue_snapshot_is_taken_before_the_update():
    queue = KeyQueue(4, 2, gather_distributed=False)
    before = queue.bank.clone()
    _, snapshot = queue(torch.ones(2, 2), update=True)
    assert torch.equal(snapshot, before)
    assert not torch.equal(queue.bank, before)


def test_moco_enqueues_the_keys_of_its_key_encoder():
    torch.manual_seed(0)
    method = tiny_moco(memory_bank_size=12)  # 2 views x batch 4 = 8 keys per step: the ring wraps at step 2
    method.augment = FixedViews()
    batches = [torch.rand(4, 3, 12, 12) for _ in range(3)]
    for images in batches:
        out = method(images)
        assert torch.isfinite(out["loss"])
    # No optimizer step was taken, so the key encoder is unchanged and its keys can be recomputed.
    expected = torch.cat([torch.cat([method.key_embed(x), method.key_embed(x.flip(-1))]) for x in batches])
    assert int(method.queue.bank_ptr) == expected.shape[0] % 12
    torch.testing.assert_close(method.queue.ordered(), expected[-12:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.queue.bank.norm(dim=1), torch.ones(12))


# -- the momentum encoder ------------------------------------------------------------------------

def test_momentum_schedule_is_a_cosine_ramp_to_one():
    assert momentum_at(0.0, 0.99) == pytest.approx(0.99)
    assert momentum_at(1.0, 0.99) == 1.0
    for p in (0.1, 0.5, 0.8):
        assert momentum_at(p, 0.9) == pytest.approx(1 - 0.1 * (math.cos(math.pi * p) + 1) / 2, abs=1e-6)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_key_encoder_follows_ema_and_gets_no_gradients(version):
    torch.manual_seed(0)
    method = tiny_moco(version=version, momentum=0.9)
    pairs = [(method.backbone, method.backbone_momentum), (method.projection_head, method.projection_head_momentum)]
    for query, key in pairs:  # the key encoder starts as an exact copy
        for q, k in zip(query.parameters(), key.parameters(), strict=True):
            assert torch.equal(q, k) and q is not k and not k.requires_grad
    optimizer = torch.optim.SGD(method.parameter_groups(0.0), lr=0.5)
    out = method(torch.rand(6, 3, 12, 12))
    optimizer.zero_grad()
    out["loss"].backward()
    for query, key in pairs:
        assert all(k.grad is None for k in key.parameters())
        assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in query.parameters())
    old_keys = [[k.detach().clone() for k in key.parameters()] for _, key in pairs]
    optimizer.step()
    method.after_optimizer_step(0.3)
    m = 1 - (1 - 0.9) * (math.cos(math.pi * 0.3) + 1) / 2
    assert method.current_momentum == pytest.approx(m, abs=1e-6)
    moved = False
    for (query, key), old in zip(pairs, old_keys):
        for q, k, k_old in zip(query.parameters(), key.parameters(), old, strict=True):
            torch.testing.assert_close(k, m * k_old + (1 - m) * q, rtol=1e-6, atol=1e-7)
            moved |= not torch.equal(k, k_old)
    assert moved
    assert method(torch.rand(6, 3, 12, 12))["momentum"] == pytest.approx(m, abs=1e-6)


# -- training ------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    {"version": "v2"},
    {"version": "v2", "memory_bank_size": 0},  # no queue: in-batch negatives
    {"version": "v3"},
])
def test_short_training_loop_runs(settings):
    torch.manual_seed(0)
    method = tiny_moco(**settings, augment={"min_scale": 0.3, "gaussian_blur": 0.0})
    assert (method.queue is None) == (settings["version"] == "v3" or settings.get("memory_bank_size") == 0)
    assert (method.prediction_head is not None) == (settings["version"] == "v3")
    optimizer = torch.optim.AdamW(method.parameter_groups(1e-4), lr=1e-3)
    images = torch.rand(16, 3, 14, 14)
    losses = []
    steps = 4
    for step in range(steps):
        out = method(images[step % 2 * 8:(step % 2 + 1) * 8])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.after_optimizer_step((step + 1) / steps)
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses), losses
    assert method.current_momentum == 1.0


def test_sync_bn_falls_back_to_shuffling_on_cpu():
    method = tiny_moco(shuffle_bn="sync")
    assert not method.shuffle_keys
    with pytest.warns(RuntimeWarning, match="SyncBatchNorm"):
        assert method.wants_sync_batchnorm() is False
    assert method.shuffle_keys
    assert tiny_moco(shuffle_bn="shuffle").wants_sync_batchnorm() is False


def test_torch_sync_batchnorm_does_not_run_on_cpu(tmp_path):
    """Why the fallback exists: under an initialized (gloo) process group, SyncBatchNorm rejects CPU input."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        bn = nn.SyncBatchNorm(4)
        with pytest.raises(ValueError, match="expected input tensor to be on GPU"):
            bn(torch.randn(2, 4, 3, 3))
    finally:
        dist.destroy_process_group()


# -- registry and artifacts ----------------------------------------------------------------------

def test_registry_checkpoint_state_and_backbone_round_trip(tmp_path):
    from pipeline.backbones import build_backbone, load_backbone, save_backbone

    torch.manual_seed(0)
    backbone, dim = build_backbone("test_resnet", small_image_stem=False)  # timm's tiny ResNet: a fast check
    settings = {"memory_bank_size": 64, "hidden_dim": 32, "output_dim": 16}
    method = build_method("moco", backbone, dim, settings, input_size=16)
    assert isinstance(method, MoCo) and method.settings.memory_bank_size == 64
    with pytest.raises(Exception, match="shuffle_bn"):
        build_method("moco", tiny_backbone(), 8, {"shuffle_bn": "bogus"})

    optimizer = torch.optim.SGD(method.parameter_groups(1e-4), lr=0.05)
    out = method(torch.rand(4, 3, 16, 16))
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    method.after_optimizer_step(0.5)

    # The queue is part of the training state, so a resumed stage keeps its negatives.
    state = method.state_dict()
    assert "queue.bank" in state and "queue.bank_ptr" in state and int(state["queue.bank_ptr"]) == 8
    resumed = build_method("moco", build_backbone("test_resnet", small_image_stem=False)[0], dim, settings, input_size=16)
    resumed.load_state_dict(state, strict=True)
    assert torch.equal(resumed.queue.bank, method.queue.bank)

    path = save_backbone(tmp_path / "bb", method.backbone, name="test_resnet", small_image_stem=False, in_chans=3,
                         kwargs={}, feature_dim=dim, input_size=16, mean=[0.5] * 3, std=[0.5] * 3)
    loaded = load_backbone(path)
    method.backbone.eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(method.backbone(x), loaded(x))


# -- two Ray Train workers -----------------------------------------------------------------------

RAY_CONFIG = textwrap.dedent(
    """
    name: moco-ray
    seed: 0
    data: {{source: {source}, train_subset: 256}}
    backbone: {{name: test_resnet, small_image_stem: false, image_size: 16}}
    ray: {{num_workers: 2, max_failures: 0}}
    stages:
      - name: moco
        kind: pretext
        method: moco
        epochs: 2
        batch_size: 64
        log_every_steps: 2
        evaluate: false
        optimizer: {{name: sgd, lr: 0.03, weight_decay: 0.0001}}
        settings:
          memory_bank_size: 384
          shuffle_bn: shuffle
          hidden_dim: 64
          output_dim: 32
          augment: {{min_scale: 0.3, cj_strength: 0.5, gaussian_blur: 0.0}}
    """
)


@pytest.mark.ray
def test_two_ray_workers_share_one_queue_of_gathered_keys(ray_session, tmp_path):
    """256 images, 2 workers x 32, 2 epochs: 8 steps of 2 views x 64 keys (gathered from both workers).

    The 384-key queue is full after three steps and then rolls over; its pointer in the final checkpoint tells
    that every worker enqueued the keys of both workers (1024 % 384 = 256; local keys only would give 128).
    The run uses shuffled BN; what shuffling does across processes is checked in
    test_distributed.py::test_moco_shuffled_bn_takes_key_statistics_from_the_shuffled_batch.
    """
    import glob

    import yaml
    from safetensors.torch import load_file

    from conftest import FASHION_MNIST_DIR
    from pipeline.backbones import load_backbone, read_backbone_meta
    from pipeline.config import validate_config
    from pipeline.runner import PipelineRun

    source = "fashion-mnist" if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists() else "digits"
    config = validate_config(yaml.safe_load(RAY_CONFIG.format(source=source)))
    summary = PipelineRun(config, tmp_path / "run").run()
    stage = summary["stages"]["moco"]
    assert math.isfinite(stage["metrics"]["loss"])
    assert 0.99 < stage["metrics"]["momentum"] <= 1.0

    checkpoints = sorted(glob.glob(f"{stage['artifacts']['checkpoints']}/checkpoint_*/state.safetensors"))
    state = load_file(checkpoints[-1])
    assert int(state["queue.bank_ptr"]) == (2 * 4 * 2 * 64) % 384
    torch.testing.assert_close(state["queue.bank"].norm(dim=1), torch.ones(384))
    query, key = state["backbone.conv1.0.weight"], state["backbone_momentum.conv1.0.weight"]
    assert not torch.equal(query, key) and torch.isfinite(key).all()  # the key encoder lags the query encoder

    artifact = stage["artifacts"]["backbone"]
    meta = read_backbone_meta(artifact)
    assert meta["method"] == "moco" and meta["epochs_trained"] == 2
    model = load_backbone(artifact)
    with torch.no_grad():
        features = model(torch.rand(2, 3, 16, 16))
    assert features.shape == (2, meta["feature_dim"]) and torch.isfinite(features).all()


def test_one_sided_loss_runs_and_enqueues_one_view():
    """`symmetric: false` is the original MoCo: one query pass, one key pass, B keys per step."""
    import torch as _torch

    from pipeline.backbones import build_backbone
    from pretext import build_method

    backbone, dim = build_backbone("test_resnet", small_image_stem=False)
    method = build_method("moco", backbone, dim, {"symmetric": False, "memory_bank_size": 16, "output_dim": 8,
                                                  "hidden_dim": 16}, input_size=16)
    out = method(_torch.rand(6, 3, 16, 16))
    assert _torch.isfinite(out["loss"])
    assert int(method.queue.bank_ptr) == 6  # one view of 6 images enqueued
