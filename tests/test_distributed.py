"""What only shows with more than one process, checked without Ray: torch.distributed with the gloo backend in
2 processes (torch.multiprocessing.spawn on localhost).

  - a NaN or ±inf loss on one rank alone stops every rank at the same step (`_all_finite`);
  - every rank's random state goes into the checkpoint that rank 0 alone writes, and each rank gets its own back;
  - SimCLR's gathered negatives and MoCo's rank-offset labels (shuffled BN on or off) give, with the global
    batch split over 2 processes, the loss and the DDP-averaged gradients of 1 process on the whole batch;
  - distillation's frozen teacher stays out of DDP (no parameters, no gradients) with the same result;
  - MoCo's shuffled BN: a rank's keys get their batch statistics from the images the shared permutation sent to
    that rank (not its own), and come back to the right query.

Each child writes its results with torch.save; the assertions run in the test process.
"""

from __future__ import annotations

import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import free_ports

WORLD = 2


def _spawn(fn, tmp_path: Path, *args) -> list[dict]:
    """Run fn(rank, out_dir, *args) in WORLD gloo processes; returns each rank's saved result."""
    port = free_ports(1)[0]
    mp.spawn(_child, args=(port, fn, str(tmp_path), args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _child(rank: int, port: int, fn, out_dir: str, args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = fn(rank, Path(out_dir), *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every rank's result is on disk and all have passed the barrier: leave without the interpreter's teardown,
    # where gloo's threads once aborted a finished child ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- a non-finite loss on one rank ------------------------------------------------------------------------------

def _all_finite_child(rank: int, out_dir: Path, bad: float) -> dict:
    from pipeline.trainer import _all_finite

    # rank 1 alone sees the bad value; rank 0's loss is finite
    loss = torch.tensor(bad if rank == 1 else 0.25, requires_grad=True) * 2
    return {"flag": _all_finite(loss, WORLD), "finite_everywhere": _all_finite(torch.tensor(0.5 + rank), WORLD)}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path, bad):
    results = _spawn(_all_finite_child, tmp_path, bad)
    assert [r["flag"] for r in results] == [False, False]  # rank 0 stops too, at the same step
    assert [r["finite_everywhere"] for r in results] == [True, True]


# -- every rank's random state in rank 0's checkpoint -----------------------------------------------------------

def _draws() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), random.random()


def _rng_child(rank: int, out_dir: Path) -> dict:
    import torch.distributed as dist

    from pipeline.trainer import gather_rng_states, load_checkpoint, save_checkpoint

    job, method, optimizer, scheduler, feature_dim = _tiny_training_state(seed=0)
    torch.manual_seed(100 + rank)
    np.random.seed(100 + rank)
    random.seed(100 + rank)
    _draws()  # move every stream away from its seed
    states = gather_rng_states(WORLD)  # collective, as in report_epoch
    ckpt = out_dir / "ckpt"
    if rank == 0:  # under Ray Train only rank 0 writes the checkpoint
        ckpt.mkdir()
        save_checkpoint(ckpt, method, optimizer, scheduler, {"epoch": 0}, job, feature_dim, states)
    dist.barrier()
    expected = _draws()
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    load_checkpoint(ckpt, method, optimizer, scheduler, rank=rank)
    return {"expected": expected, "restored": _draws(), "saved_ranks": len(states)}


def _tiny_training_state(seed: int):
    from pipeline.trainer import TrainJob, build_optimizer, build_stage_method, lr_factor

    torch.manual_seed(seed)
    job = TrainJob(stage={"name": "s", "method": "simclr", "channels_last": False,
                          "settings": {"hidden_dim": 16, "output_dim": 8}},
                   backbone={"name": "test_resnet", "small_image_stem": False, "stem_stride": 1, "in_chans": 3,
                             "kwargs": {}, "image_size": 16},
                   seed=seed, data=[], mean=[0.5] * 3, std=[0.2] * 3)
    method, feature_dim = build_stage_method(job, torch.device("cpu"))
    optimizer = build_optimizer(method.parameter_groups(1e-4), {"name": "adamw", "lr": 1e-3})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 10, 2, 0.1))
    return job, method, optimizer, scheduler, feature_dim


def test_each_rank_gets_its_own_random_state_back_from_rank_0s_checkpoint(tmp_path):
    results = _spawn(_rng_child, tmp_path)
    assert [r["saved_ranks"] for r in results] == [2, 2]
    for r in results:
        assert r["restored"] == r["expected"]
    assert results[0]["expected"] != results[1]["expected"]  # the ranks' streams differ, so each needs its own


# -- SimCLR and MoCo: 2 processes equal 1 process on the same global batch --------------------------------------

class ConvNoBN(nn.Module):
    """A BN-free backbone (B, 8): its features of an image do not depend on the rest of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.num_features = 8

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


class ConvBN(ConvNoBN):
    """The same with a BatchNorm in training mode: a feature depends on the batch it is computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


class FixedViews(nn.Module):
    """Deterministic stand-in for the augmentation: view 0 is the image, view 1 its mirror."""

    def forward(self, x):
        half = x.shape[0] // 2
        return torch.cat([x[:half], x[half:].flip(-1)], dim=0)


GLOBAL_BATCH = 8


def _global_images() -> torch.Tensor:
    """Noise at a different brightness and colour per image: pooled features of plain i.i.d. noise are nearly
    the same for every image, and a key paired with the wrong query would hardly change the loss."""
    g = torch.Generator().manual_seed(7)
    noise = torch.rand(GLOBAL_BATCH, 3, 12, 12, generator=g)
    tint = torch.rand(GLOBAL_BATCH, 3, 1, 1, generator=g)
    return (0.3 * noise + 0.7 * tint * torch.linspace(0.2, 1.0, GLOBAL_BATCH).view(-1, 1, 1, 1)).clamp(0, 1)


def _method(name: str, settings: dict, backbone=ConvNoBN):
    from pretext import build_method

    torch.manual_seed(0)  # the same initial weights in every process
    if name == "distill":
        from pretext.distill import Teacher

        # the spec in the settings is only validated; the teacher handed in is a small conv net of its own
        teacher = Teacher(ConvBN(), input_size=16, mean=[0.4] * 3, std=[0.3] * 3)
        method = build_method(name, backbone(), 8, settings, input_size=12, teacher=teacher, teacher_dim=8)
        method.augment = nn.Identity()  # one view, the image itself
        return method
    method = build_method(name, backbone(), 8, settings, input_size=12)
    method.augment = FixedViews()
    if name == "simclr":
        # lightly's projection head has a BatchNorm1d: in eval mode it uses its running statistics, so
        # an embedding does not depend on the batch split; the loss and its gradients do not change with it
        method.eval()
    return method


def _loss_and_grads(method, images: torch.Tensor) -> dict:
    out = method(images)
    out["loss"].backward()
    return {"loss": float(out["loss"]),
            "grads": {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}}


def _ddp_child(rank: int, out_dir: Path, name: str, settings: dict) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    method = _method(name, settings)
    model = DistributedDataParallel(method)
    local = GLOBAL_BATCH // WORLD
    images = _global_images()[rank * local:(rank + 1) * local]
    out = model(images)  # through DDP's forward, as in training: gradients are averaged over the ranks
    out["loss"].backward()
    if name == "distill":  # the teacher: no gradients, not among DDP's parameters, its weights as built
        teacher_params = {id(p) for p in method.teacher.parameters()}
        assert not teacher_params & {id(p) for p in model.parameters()}
        assert all(p.grad is None for p in method.teacher.parameters()) and not method.teacher.training
    return {"loss": float(out["loss"]),
            "grads": {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}}


CASES = {
    "simclr gathered negatives": ("simclr", {"hidden_dim": 16, "output_dim": 8, "temperature": 0.3}),
    "moco rank-offset labels": ("moco", {"memory_bank_size": 0, "hidden_dim": 16, "output_dim": 8,
                                         "shuffle_bn": "none"}),
    "moco rank-offset labels, shuffled keys": ("moco", {"memory_bank_size": 0, "hidden_dim": 16, "output_dim": 8,
                                                        "shuffle_bn": "shuffle"}),
    "moco queue, shuffled keys": ("moco", {"memory_bank_size": 32, "hidden_dim": 16, "output_dim": 8,
                                           "shuffle_bn": "shuffle"}),
    # a frozen teacher (with BatchNorm, kept in eval mode) outside DDP's parameters and buffers
    "distill cosine": ("distill", {"teacher": {"name": "test_resnet", "random_init": True}, "mixup": False}),
    "distill mse": ("distill", {"teacher": {"name": "test_resnet", "random_init": True}, "mixup": False,
                                "loss": "mse"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path, case):
    name, settings = CASES[case]
    results = _spawn(_ddp_child, tmp_path, name, settings)
    torch.set_num_threads(1)
    # the reference never shuffles: in one process shuffling changes nothing, and a reference that drew the same
    # permutation as rank 0 would repeat a mistake in the unshuffling instead of catching it
    plain = {**settings, "shuffle_bn": "none"} if name == "moco" else settings
    reference = _loss_and_grads(_method(name, plain), _global_images())

    # each rank's loss is the mean over its queries: their mean is the loss over the global batch
    assert np.mean([r["loss"] for r in results]) == pytest.approx(reference["loss"], rel=1e-5, abs=1e-6)
    assert results[0]["loss"] != pytest.approx(results[1]["loss"])  # the ranks did see different queries
    assert reference["grads"].keys() == results[0]["grads"].keys() == results[1]["grads"].keys()
    for n, grad in reference["grads"].items():
        assert grad.abs().max() > 0, n
        for r in results:  # DDP left the same averaged gradient on both ranks: the one of the global batch
            torch.testing.assert_close(r["grads"][n], grad, rtol=1e-4, atol=1e-6, msg=f"{case}: {n}")


def _shuffled_keys_child(rank: int, out_dir: Path, shuffle_bn: str) -> dict:
    method = _method("moco", {"memory_bank_size": 0, "hidden_dim": 16, "output_dim": 8, "shuffle_bn": shuffle_bn},
                     backbone=ConvBN)
    local = GLOBAL_BATCH // WORLD
    images = _global_images()[rank * local:(rank + 1) * local]
    torch.manual_seed(1234)  # the permutation is drawn on rank 0 and broadcast
    return {"keys": method.key_embed(images)}


@pytest.mark.parametrize("shuffle_bn", ["shuffle", "none"])
def test_moco_shuffled_bn_takes_key_statistics_from_the_shuffled_batch(tmp_path, shuffle_bn):
    """With shuffle, rank r's key encoder (BatchNorm in training mode) sees the images that rank 0's permutation
    assigned to r, gathered from both ranks; each key then goes back to the rank and row of its query. Without,
    a rank's keys get the statistics of its own images."""
    results = _spawn(_shuffled_keys_child, tmp_path, shuffle_bn)
    keys = torch.cat([r["keys"] for r in results])

    torch.set_num_threads(1)
    method = _method("moco", {"memory_bank_size": 0, "hidden_dim": 16, "output_dim": 8, "shuffle_bn": "none"},
                     backbone=ConvBN)
    x = method.normalize(_global_images())
    torch.manual_seed(1234)
    perm = torch.randperm(GLOBAL_BATCH) if shuffle_bn == "shuffle" else torch.arange(GLOBAL_BATCH)
    expected = torch.empty(GLOBAL_BATCH, 8)
    with torch.no_grad():
        for part in perm.view(WORLD, -1):  # one key-encoder batch per rank, BN statistics over that batch
            k = method.projection_head_momentum(method.backbone_momentum(x[part]))
            expected[part] = torch.nn.functional.normalize(k, dim=1)
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-6)

    local_bn = torch.empty(GLOBAL_BATCH, 8)  # each rank's own images as the BN batch
    with torch.no_grad():
        for part in torch.arange(GLOBAL_BATCH).view(WORLD, -1):
            local_bn[part] = torch.nn.functional.normalize(
                method.projection_head_momentum(method.backbone_momentum(x[part])), dim=1)
    if shuffle_bn == "shuffle":
        assert not set(perm[:GLOBAL_BATCH // WORLD].tolist()) == set(range(GLOBAL_BATCH // WORLD))
        assert not torch.allclose(keys, local_bn, atol=1e-4)  # the statistics did come from other images
    else:
        torch.testing.assert_close(keys, local_bn)


# -- shared embeddings (STML's, distillation's cached targets, SCAN's feature cache): each rank embeds a share,
#    every rank holds all rows -----------------------------------------------------------------------------------

def _stml_embed_child(rank: int, out_dir: Path) -> dict:
    from pretext.stml import embed_shared

    method = _method("stml", {"embedding_dim": 8})
    images = (_global_images() * 255).to(torch.uint8).numpy()[:7]  # 7 rows: shares of 4 and 3
    return {"shared": torch.from_numpy(embed_shared(method, images, rank=rank, world_size=WORLD)),
            "alone": torch.from_numpy(embed_shared(method, images, rank=0, world_size=1))}


def _distill_cache_child(rank: int, out_dir: Path) -> dict:
    settings = {"teacher": {"name": "test_resnet", "random_init": True}, "mixup": False, "targets": "cached"}
    images = (_global_images() * 255).to(torch.uint8).numpy()[:7]  # 7 rows: shares of 4 and 3
    shared, alone = _method("distill", settings), _method("distill", settings)
    shared.epoch_batches(images, epoch=0, rank=rank, world_size=WORLD, batch_size=2, seed=0)
    alone.epoch_batches(images, epoch=0, rank=0, world_size=1, batch_size=2, seed=0)
    return {"shared": shared.cached, "alone": alone.cached}


def _scan_cache_child(rank: int, out_dir: Path) -> dict:
    from downstream.scan import SCAN

    images = (_global_images() * 255).to(torch.uint8).numpy()[:7]  # 7 rows: shares of 4 and 3
    torch.manual_seed(0)
    method = SCAN(ConvBN(), 8, {"clusters": 3, "num_heads": 2, "scan_epochs": 1}, input_size=12)
    method.cache_features(images, rank=rank, world_size=WORLD, batch_size=3)  # chunks that cross the shares
    shared = method.cached
    method.cache_features(images)
    return {"shared": shared, "alone": method.cached}


SHARED_EMBEDDINGS = {  # name: (child, width of each row, None where it follows the backbone)
    "stml": (_stml_embed_child, None),
    "distill_targets": (_distill_cache_child, 8),
    "scan_features": (_scan_cache_child, 8),
}


@pytest.mark.parametrize("cache", list(SHARED_EMBEDDINGS))
def test_ranks_embed_a_share_each_and_every_rank_holds_all_rows_of_one_process(tmp_path, cache):
    """Every rank ends with the rows of all 7 images, in image order, equal to one process embedding all."""
    child, width = SHARED_EMBEDDINGS[cache]
    results = _spawn(child, tmp_path)
    for r in results:
        assert r["shared"].shape == r["alone"].shape and len(r["alone"]) == 7
        assert width is None or r["alone"].shape == (7, width)
        torch.testing.assert_close(r["shared"], r["alone"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0]["shared"], results[1]["shared"])
