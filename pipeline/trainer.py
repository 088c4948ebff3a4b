"""The one Ray Train worker loop shared by every training stage.

`train_worker` runs on each Ray Train worker: it builds the backbone and the stage's method, wraps it
for DDP with `prepare_model`, splits the in-memory images with a distributed sampler, trains with a
warmup + cosine schedule (bf16 autocast and channels_last when asked), reports metrics and a
checkpoint with `ray.train.report`, and resumes from `ray.train.get_checkpoint()` after a failure.

`fit_stage` is the driver side: it builds the `TorchTrainer` from the config and returns the final
checkpoint, from which the stage takes its backbone artifact.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.faults import FaultHooks
from pipeline.store import replace_dir_atomic
from pretext.embeddings import match_channels

STATE_FILE = "state.safetensors"
OPTIM_FILE = "optimizer.pt"
PROGRESS_FILE = "progress.json"
RNG_FILE = "rng.pt"  # one entry per rank: torch CPU/CUDA, numpy and Python RNG states
BACKBONE_DIR = "backbone"


@dataclass
class TrainJob:
    """Everything a worker needs; plain data so it pickles cheaply to every worker."""

    stage: dict[str, Any]  # PretextStage.model_dump()
    backbone: dict[str, Any]  # BackboneConfig.model_dump()
    seed: int
    data: list  # [ray.ObjectRef of a uint8 (N, C, H, W) array, or a pixel_cache.ShardedImages]; a list so a ref
    #             travels as a ref
    mean: list[float]
    std: list[float]
    init_artifact: str | None = None
    # [ray.ObjectRef of an int64 (N,) array] for methods with `needs_labels` (fine-tuning, metric learning)
    labels: list | None = None
    # [ray.ObjectRef of an int64 (N, k) array] for methods with `needs_neighbours` (SCAN): each image's neighbours
    neighbours: list | None = None
    tracking_uri: str | None = None
    run_id: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    # {"path", "sha256"} of the driver's resolved weights (pipeline.weights) loaded into a fresh backbone
    weights: dict[str, str] | None = None


NON_FINITE_MARKER = "non_finite_loss.json"  # written by rank 0 into the Ray Train run folder


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf: the stage stops and the last good checkpoint is kept."""


def _all_finite(loss: torch.Tensor, world: int) -> bool:
    """One flag for every rank, so all stop at the same step and no collective is left waiting."""
    value = loss.detach().float().reshape(1)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)  # NaN/inf on any rank makes the sum non-finite
    return bool(torch.isfinite(value).all())


def _write_marker(info: dict[str, Any]) -> None:
    """Leave the reason for stopping where the driver finds it (the run folder on shared storage)."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    with storage.storage_filesystem.open_output_stream(f"{storage.experiment_fs_path}/{NON_FINITE_MARKER}") as f:
        f.write(json.dumps(info).encode())


def _pop_marker(filesystem, run_path: str) -> dict[str, Any] | None:
    """Read and delete the non-finite marker of a run (None when training did not stop for that)."""
    import pyarrow.fs

    path = f"{run_path}/{NON_FINITE_MARKER}"
    if filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as f:
        info = json.loads(f.read().decode())
    filesystem.delete_file(path)
    return info


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay to `min_ratio` of the base rate."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(groups: list[dict], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """A group may carry `lr_scale` (e.g. a fine-tuned backbone at a tenth of the head's rate)."""
    name, lr = cfg["name"], cfg["lr"]
    scaled = []
    for group in groups:
        group = dict(group)
        if "lr_scale" in group:
            group["lr"] = lr * group.pop("lr_scale")
        scaled.append(group)
    groups = scaled
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg["momentum"], nesterov=True)
    if name == "lars":
        from lightly.utils.lars import LARS

        return LARS(groups, lr=lr, momentum=cfg["momentum"])
    raise ValueError(f"unknown optimizer {name}")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 autocast on a CPU is emulated and much slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on GPUs that support it, fp32 on CPUs. bf16 on a CPU is opt-in (`precision:
    bf16`): with torch 2.14 on an AVX512-BF16 CPU, oneDNN's bf16 convolution backward gave NaN weight
    gradients for kernel taps that see only padding (a 3x3 conv on 1x1 maps), silently poisoning weights."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on GPUs; peak resident memory of this worker process on CPUs."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _log_mlflow(uri: str | None, run_id: str | None, metrics: dict[str, float], step: int) -> None:
    if not run_id:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    MlflowClient(tracking_uri=uri).log_batch(run_id, metrics=items)


def build_stage_method(job: TrainJob, device: torch.device):
    """Backbone (fresh or from the input artifact) wrapped in the stage's method."""
    from pipeline.backbones import BackboneError, build_backbone, load_backbone, read_backbone_meta
    from pipeline.methods import build_method, method_class

    bb, stage = job.backbone, job.stage
    backbone_chans = method_class(stage["method"]).backbone_channels or bb["in_chans"]
    if job.init_artifact:
        meta = read_backbone_meta(job.init_artifact)
        if meta["in_chans"] != backbone_chans:
            raise BackboneError(
                f"stage '{stage['name']}': input backbone {job.init_artifact} takes {meta['in_chans']} channel(s), "
                f"method '{stage['method']}' needs {backbone_chans}"
            )
        backbone = load_backbone(job.init_artifact, bare=True)
        feature_dim = meta["feature_dim"]
        backbone.train()
    else:
        backbone, feature_dim = build_backbone(
            bb["name"], small_image_stem=bb["small_image_stem"], stem_stride=bb["stem_stride"],
            in_chans=backbone_chans, kwargs=bb["kwargs"],
        )
        if job.weights:
            from pipeline.weights import load_resolved

            load_resolved(backbone, job.weights, name=bb["name"])
    extra: dict[str, Any] = {}
    if getattr(method_class(stage["method"]), "needs_teacher", False):  # distillation: a frozen teacher, handed in
        from pipeline.teachers import build_teacher

        extra["teacher"], extra["teacher_dim"] = build_teacher(stage["settings"]["teacher"])
    method = build_method(
        stage["method"],
        backbone,
        feature_dim,
        stage["settings"],
        input_size=bb["image_size"],
        mean=job.mean if backbone_chans == len(job.mean) else job.mean[:1] * backbone_chans,
        std=job.std if backbone_chans == len(job.std) else job.std[:1] * backbone_chans,
        channels_last=stage["channels_last"],
        **extra,
    )
    method.to(device)
    if stage["channels_last"]:
        method.to(memory_format=torch.channels_last)
    if stage.get("compile"):
        # In place, so the state dict keeps its keys (checkpoints and artifacts are unchanged); only the
        # student backbone, which runs forward and backward every step, is worth the compile time.
        method.backbone.compile()
    return method, feature_dim


def batch_channels(method, backbone_cfg: dict[str, Any]) -> int:
    """Channels of the batches a method receives: 3 for colour methods, else what its backbone takes."""
    if method.requires_color:
        return 3
    return type(method).backbone_channels or backbone_cfg["in_chans"]


def rng_state() -> dict[str, Any]:
    """This process's random state: torch (CPU and this worker's CUDA device, if it uses one), numpy's global
    RNG and Python's `random`. Only the current device: touching every visible GPU would open a CUDA context
    on each of them in every worker of a node.

    Plain tensors, lists and numbers only, so `torch.load(weights_only=True)` reads it back."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"name": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (the CUDA state into this worker's current device)."""
    torch.set_rng_state(state["torch"])
    if len(state["cuda"]) == 1 and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's `rng_state()`, in rank order, on every rank (a collective: all ranks must call it).

    Under Ray Train only rank 0 writes the checkpoint, so the other ranks' states travel to it this way."""
    state = rng_state()
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        states: list[Any] = [None] * world
        torch.distributed.all_gather_object(states, state)
        return states
    return [state]


def save_checkpoint(directory: Path, method, optimizer, scheduler, progress: dict, job: TrainJob, feature_dim: int,
                    rng_states: list[dict[str, Any]] | None = None) -> None:
    """Full training state plus a ready-to-use backbone artifact (the driver copies it out).

    `rng_states`: every rank's random state (`gather_rng_states`); this process's alone when not given."""
    from safetensors.torch import save_file

    from pipeline.backbones import save_backbone

    state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    save_file(state, str(directory / STATE_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / OPTIM_FILE)
    torch.save(rng_states if rng_states is not None else [rng_state()], directory / RNG_FILE)
    (directory / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
    bb = job.backbone
    mean, std = method.input_normalization()
    module, export_meta = method.export_module()
    save_backbone(
        directory / BACKBONE_DIR,
        module,
        name=bb["name"],
        small_image_stem=bb["small_image_stem"],
        stem_stride=bb["stem_stride"],
        in_chans=type(method).backbone_channels or bb["in_chans"],
        kwargs=bb["kwargs"],
        feature_dim=feature_dim,
        input_size=bb["image_size"],
        mean=mean,
        std=std,
        provenance={
            **job.provenance,
            "input_transform": method.input_transform,
            "epochs_trained": progress["epoch"] + 1,
            "extras": method.artifact_extras(),
            **export_meta,
        },
    )


def load_checkpoint(directory: Path, method, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore weights, optimizer, schedule and `rank`'s random state; returns the progress record.

    Call it after everything else that draws random numbers (model init), so training continues with the
    random stream it had when the checkpoint was taken. A checkpoint from before RNG states were saved, or
    from a run with fewer ranks, leaves this rank's seeded state as it is."""
    from safetensors.torch import load_file

    method.load_state_dict(load_file(str(directory / STATE_FILE)), strict=True)
    opt = torch.load(directory / OPTIM_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if (directory / RNG_FILE).exists():
        states = torch.load(directory / RNG_FILE, map_location="cpu", weights_only=True)
        if rank < len(states):
            set_rng_state(states[rank])
    return json.loads((directory / PROGRESS_FILE).read_text())


@dataclass
class Worker:
    """One Ray Train worker's training state, built by `setup_worker`."""

    job: TrainJob
    rank: int
    world: int
    device: torch.device
    images: Any  # read-only uint8 (N, C, H, W): from the object store, or read on demand from the pixel cache
    labels: np.ndarray | None
    model: torch.nn.Module  # DDP-wrapped when world > 1
    method: Any  # the unwrapped method
    feature_dim: int
    image_augment: Any
    batch_mix: Any
    sampler: Any
    local_batch: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    start_epoch: int
    use_amp: bool
    hooks: FaultHooks | None

    @property
    def stage(self) -> dict[str, Any]:
        return self.job.stage

    @property
    def total_steps(self) -> int:
        return self.stage["epochs"] * self.steps_per_epoch


def setup_worker(job: TrainJob, hooks: FaultHooks | None) -> Worker:
    """Seeds, data, method (DDP-wrapped), batch sizes, optimizer and schedule; resumed from Ray's checkpoint."""
    import ray
    import ray.train
    import ray.train.torch
    from torch.utils.data import DistributedSampler

    from downstream.augment import build_augment

    stage = job.stage
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(job.seed * 1000 + rank)
    np.random.seed(job.seed * 1000 + rank)

    images = job.data[0]  # an object-store reference to in-memory pixels, or the stream backend's pixel cache
    if isinstance(images, ray.ObjectRef):
        images = ray.get(images)
    method, feature_dim = build_stage_method(job, device)
    labels = None
    if getattr(method, "needs_labels", False):
        if not job.labels:
            raise ValueError(f"stage '{stage['name']}': method '{stage['method']}' needs labels")
        labels = np.asarray(ray.get(job.labels[0]), dtype=np.int64)
    # Stage-level `augment:` policies: per-image ones on the uint8 batch, mixup/cutmix with the labels.
    image_augment, batch_mix = build_augment(stage.get("augment"), num_classes=getattr(method, "num_classes", None),
                                             allow_batch=labels is not None)
    if world > 1 and method.wants_sync_batchnorm():
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    model = ray.train.torch.prepare_model(method)
    raw = _unwrap(model)
    if labels is not None:
        raw.set_train_labels(labels)
    if getattr(raw, "needs_neighbours", False):
        if not job.neighbours:
            raise ValueError(f"stage '{stage['name']}': method '{stage['method']}' needs mined neighbours")
        raw.set_neighbours(np.asarray(ray.get(job.neighbours[0]), dtype=np.int64))

    sampler = DistributedSampler(range(len(images)), num_replicas=world, rank=rank, shuffle=True, seed=job.seed,
                                 drop_last=True)
    local_batch = min(max(2, stage["batch_size"] // world), len(sampler))
    steps_per_epoch = len(sampler) // local_batch if local_batch else 0
    if steps_per_epoch < 1 or local_batch < 2:
        raise ValueError(f"stage '{stage['name']}': {len(images)} images are too few for {world} workers "
                         f"(need at least 2 per worker and batch)")
    total_steps = stage["epochs"] * steps_per_epoch
    opt_cfg = stage["optimizer"]
    optimizer = build_optimizer(raw.parameter_groups(opt_cfg["weight_decay"]), opt_cfg)
    warmup = int(round(opt_cfg["warmup_epochs"] * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, opt_cfg["min_lr_ratio"]))

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            progress = load_checkpoint(Path(ckpt_dir), raw, optimizer, scheduler, rank=rank)
        start_epoch = progress["epoch"] + 1
        if rank == 0:
            print(f"[{stage['name']}] resumed from checkpoint after epoch {start_epoch}/{stage['epochs']}", flush=True)
    use_amp = resolve_precision(stage["precision"], device) == "bf16"
    return Worker(job, rank, world, device, images, labels, model, raw, feature_dim, image_augment, batch_mix,
                  sampler, local_batch, steps_per_epoch, optimizer, scheduler, start_epoch, use_amp, hooks)


def epoch_batches(w: Worker, epoch: int) -> list[np.ndarray]:
    """This rank's index batches: the method's own (e.g. STML's neighbourhoods) or a reshuffled split."""
    batches = w.method.epoch_batches(w.images, epoch=epoch, rank=w.rank, world_size=w.world,
                                     batch_size=w.local_batch, seed=w.job.seed)
    if batches is None:
        w.sampler.set_epoch(epoch)
        order = np.fromiter(iter(w.sampler), dtype=np.int64, count=len(w.sampler))
        batches = [np.sort(order[s * w.local_batch:(s + 1) * w.local_batch]) for s in range(w.steps_per_epoch)]
    return batches


def _forward(w: Worker, idx: np.ndarray) -> dict[str, Any]:
    """The method's forward on the images `idx` (augmented, on the device, in the stage's layout)."""
    batch = torch.from_numpy(w.images[idx])
    if w.image_augment:
        batch = w.image_augment(batch)
    if w.device.type == "cuda":
        batch = batch.pin_memory()
    x = batch.to(w.device, non_blocking=True).float().div_(255.0)
    x = match_channels(x, batch_channels(w.method, w.job.backbone))
    y = None
    if w.labels is not None:
        y = torch.from_numpy(w.labels[idx]).to(w.device, non_blocking=True)
        x, y = w.batch_mix(x, y)  # identity without mixup/cutmix; else soft targets
    x = x.contiguous(memory_format=torch.channels_last if w.stage["channels_last"] else torch.contiguous_format)
    extra = {"rows": torch.from_numpy(np.asarray(idx, dtype=np.int64))} if w.method.wants_rows else {}
    with torch.autocast(device_type=w.device.type, dtype=torch.bfloat16, enabled=w.use_amp):
        return w.model(x, **extra) if y is None else w.model(x, y, **extra)


def train_step(w: Worker, idx: np.ndarray, epoch: int, step: int) -> dict[str, Any] | None:
    """One optimizer step on the images `idx`; None when the loss is not finite on some rank (stop)."""
    out = _forward(w, idx)
    loss = w.hooks.poison(out["loss"], epoch) if w.hooks else out["loss"]
    if not _all_finite(loss, w.world):
        # Stop cleanly instead of raising: Ray Train would retry a worker error up to max_failures
        # times and hit the same loss again. The driver turns the marker into NonFiniteLossError.
        if w.rank == 0:
            _write_marker({"epoch": epoch + 1, "step": step + 1, "loss": float(loss.detach().float())})
        return None
    w.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    w.optimizer.step()
    w.scheduler.step()
    global_step = epoch * w.steps_per_epoch + step
    w.method.after_optimizer_step(min(1.0, (global_step + 1) / w.total_steps))
    if w.hooks:
        w.hooks.after_step(w.rank, epoch + 1, step + 1, w.start_epoch)
    return out


def _untimed_step(w: Worker, idx: np.ndarray) -> float:
    """Forward and backward on `idx` with no effect on training: no gradient sync, gradients dropped,
    buffers (BatchNorm statistics, MoCo's queue) and random streams restored. Returns its seconds."""
    import contextlib

    buffers = {name: b.detach().clone() for name, b in w.method.named_buffers()}
    streams = rng_state()
    _synchronize(w.device)
    started = time.perf_counter()
    with (w.model.no_sync() if hasattr(w.model, "no_sync") else contextlib.nullcontext()):
        _forward(w, idx)["loss"].backward()
    _synchronize(w.device)
    seconds = time.perf_counter() - started
    w.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in w.method.named_buffers():
            b.copy_(buffers[name])
    set_rng_state(streams)
    return seconds


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU kernels, so a wall-clock time covers the work and not only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up_compile(w: Worker, trials: int = 2) -> dict[str, float]:
    """Compile before the first timed step, then keep the compiled backbone only where it is faster.

    The first untimed step compiles (its time is the compile time, reported apart from the epochs); the
    next `trials` compiled and eager steps are compared (medians, the slower rank's view on every rank,
    so all ranks decide alike). When compiling does not pay here, the stage falls back to eager.
    """
    idx = np.arange(min(w.local_batch, len(w.images)))
    compile_s = _untimed_step(w, idx)
    compiled = float(np.median([_untimed_step(w, idx) for _ in range(trials)]))
    backbone = w.method.backbone
    compiled_impl, backbone._compiled_call_impl = backbone._compiled_call_impl, None
    eager = float(np.median([_untimed_step(w, idx) for _ in range(trials)]))
    times = torch.tensor([compiled, eager], dtype=torch.float64, device=w.device)  # NCCL takes device tensors
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)
    compiled, eager = float(times[0]), float(times[1])
    keep = compiled < eager
    if keep:
        backbone._compiled_call_impl = compiled_impl
    if w.rank == 0:
        print(f"[{w.stage['name']}] compiled in {compile_s:.1f}s; step {compiled:.3f}s compiled vs {eager:.3f}s eager: "
              + ("keeping the compiled backbone" if keep else "compiling does not pay here, training eagerly"),
              flush=True)
    return {"compile_time_s": compile_s, "compiled_step_s": compiled, "eager_step_s": eager, "compiled": float(keep)}


def weights_finite(w: Worker, epoch: int) -> bool:
    """False (on every rank alike) when a parameter became NaN/inf: a loss can stay finite while weights that
    do not reach it (e.g. kernel taps that see only padding) are poisoned by non-finite gradients."""
    params = [p.detach() for p in w.method.parameters()]
    flag = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
    if _all_finite(torch.where(flag, 0.0, float("nan")).to(w.device, torch.float32), w.world):  # one sync, device tensor
        return True
    bad = next((name for name, p in w.method.named_parameters() if not torch.isfinite(p).all()), None)
    if w.rank == 0:
        _write_marker({"epoch": epoch + 1, "step": w.steps_per_epoch, "loss": None, "parameter": bad or "on another rank"})
    return False


def epoch_metrics(w: Worker, sums: dict[str, torch.Tensor], steps: int, images: int, seconds: float,
                  epoch: int) -> dict[str, float]:
    """Step means averaged over ranks, plus throughput, memory and the learning rate."""
    means = {k: (v / max(1, steps)) for k, v in sums.items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        keys = sorted(means)
        stacked = torch.stack([means[k].to(w.device) for k in keys])
        torch.distributed.all_reduce(stacked)
        means = {k: stacked[i] / w.world for i, k in enumerate(keys)}
    metrics = {k: float(v) for k, v in means.items()}
    metrics.update(peak_memory_mb=peak_memory_mb(w.device), epoch=epoch + 1, steps_per_epoch=float(w.steps_per_epoch),
                   lr=float(w.scheduler.get_last_lr()[0]), images_per_sec=images * w.world / max(seconds, 1e-9),
                   epoch_time_s=seconds)
    return metrics


def report_epoch(w: Worker, metrics: dict[str, float], epoch: int) -> None:
    """Log the epoch to MLflow (rank 0) and report it to Ray Train, with a checkpoint when one is due."""
    import ray.train

    if w.rank == 0:
        _log_mlflow(w.job.tracking_uri, w.job.run_id, metrics, step=epoch + 1)
    if (epoch + 1) % w.stage["checkpoint_every"] and epoch + 1 != w.stage["epochs"]:
        ray.train.report(metrics)
        return
    rng_states = gather_rng_states(w.world)  # every rank's, before rank 0 alone writes the checkpoint
    tmp = Path(tempfile.mkdtemp(prefix="sslpipe-ckpt-"))
    try:
        ckpt = None
        if w.rank == 0:
            progress = {"epoch": epoch, "metrics": metrics, "resumed_at_epoch": w.start_epoch}
            save_checkpoint(tmp, w.method, w.optimizer, w.scheduler, progress, w.job, w.feature_dim, rng_states)
            ckpt = ray.train.Checkpoint.from_directory(str(tmp))
        ray.train.report(metrics, checkpoint=ckpt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _print_start(w: Worker) -> None:
    s = w.stage
    print(f"[{s['name']}] {w.world} worker(s) on {w.device.type}, precision {'bf16' if w.use_amp else 'fp32'}"
          f"{', channels_last' if s['channels_last'] else ''}{', compile (warm-up first)' if s.get('compile') else ''}, "
          f"{len(w.images)} images, batch {w.local_batch}x{w.world}, {w.steps_per_epoch} steps/epoch", flush=True)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (one per worker): set up, then train epoch by epoch, reporting each."""
    import logging

    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every fallback at INFO
    hooks = FaultHooks(**config["hooks"]) if config.get("hooks") else None
    w = setup_worker(TrainJob(**config["job"]), hooks)
    epochs, tag = w.stage["epochs"], f"[{w.stage['name']}]"
    if w.rank == 0:
        _print_start(w)
    # The first epoch's batches come before the compile warm-up, so that the warm-up times the step training
    # runs (a method's per-run state -- SCAN's feature cache, distillation's cached targets -- already built).
    first = epoch_batches(w, w.start_epoch) if w.start_epoch < epochs else []
    if w.stage.get("compile") and w.start_epoch < epochs:
        w.model.train()  # the mode the steps run in (a method's train() may keep parts in eval): no recompile
        compile_report = warm_up_compile(w)
        if w.rank == 0:
            _log_mlflow(w.job.tracking_uri, w.job.run_id, compile_report, step=0)
    stage_start, steps_done = time.time(), 0
    for epoch in range(w.start_epoch, epochs):
        batches = first if epoch == w.start_epoch else epoch_batches(w, epoch)
        w.model.train()
        sums: dict[str, torch.Tensor] = {}
        epoch_start, epoch_images = time.time(), 0
        for step, idx in enumerate(batches):
            out = train_step(w, idx, epoch, step)
            if out is None:
                return
            epoch_images += len(idx)
            steps_done += 1
            for key, value in out.items():
                value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
                sums[key] = sums.get(key, 0.0) + value
            if w.rank == 0 and ((step + 1) % w.stage["log_every_steps"] == 0 or step + 1 == len(batches)):
                remaining = (epochs - epoch) * len(batches) - (step + 1)
                rate = epoch_images * w.world / max(1e-9, time.time() - epoch_start)
                eta = (time.time() - stage_start) / steps_done * remaining
                print(f"{tag} epoch {epoch + 1}/{epochs} step {step + 1}/{len(batches)} loss {out['loss'].item():.4f} "
                      f"lr {w.scheduler.get_last_lr()[0]:.2e} img/s {rate:.0f} ETA {_format_eta(eta)}", flush=True)
        if not weights_finite(w, epoch):
            return
        metrics = epoch_metrics(w, sums, len(batches), epoch_images, time.time() - epoch_start, epoch)
        report_epoch(w, metrics, epoch)


@dataclass
class StageFit:
    metrics: dict[str, Any]
    checkpoint_dir: Path  # a local copy of the final checkpoint
    storage: str


def fit_stage(job: TrainJob, *, ray_cfg: dict[str, Any], storage_path: str, run_name: str, workdir: Path) -> StageFit:
    """Run `train_worker` under a TorchTrainer and bring the final checkpoint to `workdir`."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = ScalingConfig(
        num_workers=ray_cfg["num_workers"],
        use_gpu=ray_cfg["use_gpu"],
        resources_per_worker=ray_cfg.get("resources_per_worker") or None,
    )
    run_config = RunConfig(
        name=run_name,
        storage_path=storage_path,
        failure_config=FailureConfig(max_failures=ray_cfg["max_failures"]),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        # Train's INFO lines (every report, every checkpoint) drown our progress lines; warnings still show.
        logging_config=LoggingConfig(log_level=os.environ.get("SSLPIPE_RAY_TRAIN_LOG_LEVEL", "WARNING")),
    )
    hooks = FaultHooks.from_env()
    if "://" not in storage_path:  # a marker left by a run that crashed afterwards is stale
        (Path(storage_path) / run_name / NON_FINITE_MARKER).unlink(missing_ok=True)
    trainer = TorchTrainer(train_worker, train_loop_config={"job": asdict(job), "hooks": hooks and hooks.to_dict()},
                           scaling_config=scaling, run_config=run_config)
    result = trainer.fit()
    stopped = _pop_marker(result.filesystem, result.path)
    if stopped is not None:
        last = int(result.metrics.get("epoch", 0)) if result.checkpoint is not None and result.metrics else None
        kept = (f"the last good checkpoint (after epoch {last}) is kept in {result.path}" if last
                else "no checkpoint was written before it")
        what = (f"parameter {stopped['parameter']} is not finite after epoch {stopped['epoch']}"
                if stopped.get("parameter") else
                f"loss is {stopped['loss']} at epoch {stopped['epoch']}, step {stopped['step']}")
        raise NonFiniteLossError(f"stage '{job.stage['name']}': {what}; lower optimizer.lr or use precision: fp32; {kept}")
    if result.checkpoint is None:
        raise RuntimeError(f"stage '{job.stage['name']}' finished without a checkpoint")
    target = workdir / "final_checkpoint"
    workdir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as ckpt_dir:
        replace_dir_atomic(Path(ckpt_dir), target)
    progress = json.loads((target / PROGRESS_FILE).read_text())
    return StageFit(metrics=progress.get("metrics", {}), checkpoint_dir=target, storage=result.path)


def _cluster_runtime_env(address: str) -> dict[str, Any] | None:
    """Tell every actor of this job which cluster it is on.

    Ray Train's placement-group cleaner queries the state API from inside an actor; without RAY_ADDRESS
    it looks for 'auto' and fails when one machine runs several Ray instances. Left out for Ray Client
    addresses and when the submitted job already sets RAY_ADDRESS in its runtime_env (a conflict there
    is an error in ray.init).
    """
    if address in ("auto", "local") or address.startswith("ray://"):
        return None
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    if "RAY_ADDRESS" in ((job_env.get("runtime_env") or {}).get("env_vars") or {}):
        return None
    return {"env_vars": {"RAY_ADDRESS": address}}


# Ray's own metrics pipeline (per-process collectors, event-loop stats); measured on the 2-core AMD EPYC
# machine, an idle local Ray slowed a training step by 3.6-5.0% with it, 1.9-2.7% without (bench/RESULTS.md).
LEAN_LOCAL_RAY = {"enable_metrics_collection": False, "event_stats": False, "metrics_report_interval_ms": 600_000}


def ray_init(address: str | None, *, num_cpus: int | None = None, local_metrics: bool = False) -> None:
    """Attach to a cluster (config or RAY_ADDRESS) or start a local Ray; idempotent.

    A local Ray leaves out its metrics collectors unless ``local_metrics``: on a small machine they take
    cycles from training, and nothing reads them without a Prometheus server.
    """
    import ray

    # Worker prints go straight to stdout (Ray forwards them once); Train's print patch would double them.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address:
        ray.init(address=address, runtime_env=_cluster_runtime_env(address), **kwargs)
    else:
        # The dashboard serves the state API that Ray Train's controller polls; without it Train logs warnings.
        if not local_metrics:
            kwargs["_system_config"] = LEAN_LOCAL_RAY
        ray.init(num_cpus=num_cpus, include_dashboard=True, **kwargs)
