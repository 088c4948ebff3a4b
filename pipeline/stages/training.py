"""Pretext and refine stages: train a method under Ray Train, keep its backbone, report on held-out images.

`train_stage` is the part every training kind shares (finetune and metric call it with their labels):
the TorchTrainer fit, the backbone artifact, the method's held-out report and, with `evaluate: true`
and a labelled evaluation split, kNN accuracy and k-means NMI of the new backbone.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.cache import ray_run_name
from pipeline.config import StageBase, TrainingStage
from pipeline.context import RunContext
from pipeline.stages.base import Executor, StageResult, StageRun
from pipeline.store import replace_dir_atomic

# Metrics a training stage logs when it ends (its per-epoch metrics were logged by the rank-0 worker).
FINAL_METRICS = ("stage_time_s", "knn_accuracy", "nmi", "ari", "cluster_accuracy", "accuracy", "top5_accuracy",
                 "labeled_images", "map_at_r", "knn_excluded_matches", "retrieval_excluded_matches")


def check_colour(ctx: RunContext, stage: TrainingStage) -> None:
    """A colour method (colorization) cannot learn from a grayscale source."""
    from pipeline.data import DataError
    from pipeline.methods import method_class

    if ctx.train.channels == 1 and getattr(method_class(stage.method), "requires_color", False):
        raise DataError(f"stages[{stage.name}]: method '{stage.method}' needs colour images; "
                        f"data source '{ctx.config.data.source}' is grayscale")


def train_stage(ctx: RunContext, stage: TrainingStage, run: StageRun, *, images: np.ndarray | None = None,
                labels: np.ndarray | None = None, neighbours: np.ndarray | None = None) -> StageResult:
    """Train on the training split, or on `images` (+ `labels` for labeled methods, `neighbours` for methods
    that learn from each image's mined neighbours); returns the backbone."""
    ctx.ensure_ray()  # first: it sets Ray's console filter, read when ray is first imported
    import ray

    from pipeline.trainer import TrainJob, fit_stage

    from pipeline.weights import normalization

    cfg = ctx.config
    stats = normalization(cfg.backbone, ctx.weights, cfg.backbone.in_chans)  # the weights' (or ImageNet's) mean/std
    # else the data's: exact, over the whole training split
    mean, std = stats if stats is not None else ctx.train.pixel_moments().stats(cfg.backbone.in_chans)
    weights, weights_provenance = None, None
    if run.input_backbone:  # the input's own record of where its start came from
        from pipeline.backbones import read_backbone_meta

        weights_provenance = read_backbone_meta(run.input_backbone).get("weights")
    elif ctx.weights is not None and getattr(stage, "input", None) != "random":
        weights, weights_provenance = ctx.weights.job(), ctx.weights.provenance
    data_ref = ctx.put_images(images)
    job = TrainJob(
        stage=stage.model_dump(mode="json"),
        backbone=cfg.backbone.model_dump(mode="json"),
        seed=cfg.seed,
        data=[data_ref],
        labels=None if labels is None else [ray.put(np.asarray(labels, dtype=np.int64))],
        neighbours=None if neighbours is None else [ray.put(np.asarray(neighbours, dtype=np.int64))],
        mean=mean,
        std=std,
        init_artifact=run.input_backbone,
        tracking_uri=ctx.tracking_uri,
        run_id=run.run_id,
        weights=weights,
        provenance={
            "weights": weights_provenance,
            "pipeline": cfg.name,
            "source_stage": stage.name,
            "method": stage.method,
            "stage_fingerprint": run.fingerprint,
            "data_fingerprint": ctx.data_fingerprint,
            "data_source": cfg.data.source,
            "stage_config": stage.model_dump(mode="json"),
        },
    )
    stage_dir = ctx.stage_dir(stage.name)
    storage, run_name = ctx.storage_path, ray_run_name(cfg, stage, run.fingerprint)
    if run.fresh:  # forced, or its input was retrained: old checkpoints of this fingerprint must not be resumed
        if "://" in storage:
            run_name += f"-{int(time.time())}"
        else:
            shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
    fit = fit_stage(job, ray_cfg=cfg.ray.model_dump(mode="json"), storage_path=storage,
                    run_name=run_name, workdir=stage_dir)
    backbone_dir = stage_dir / "backbone"
    replace_dir_atomic(fit.checkpoint_dir / "backbone", backbone_dir)
    metrics = {k: v for k, v in fit.metrics.items() if isinstance(v, (int, float))}
    report_metrics, report_artifacts = heldout_report(ctx, job, fit.checkpoint_dir, stage_dir)
    shutil.rmtree(fit.checkpoint_dir, ignore_errors=True)
    metrics.update(report_metrics)
    if stage.evaluate and ctx.evalset is not None and ctx.evalset.labels is not None:
        from pipeline.evaluate import quick_evaluate

        quick = quick_evaluate(backbone_dir, ctx.train, ctx.evalset, seed=cfg.seed)
        ctx.log(f"[{stage.name}] kNN accuracy {quick['knn_accuracy']:.4f}  k-means NMI {quick['nmi']:.4f}")
        metrics.update(quick)
    artifacts = {"backbone": str(backbone_dir), **report_artifacts, "checkpoints": fit.storage}
    return StageResult(metrics=metrics, artifacts=artifacts)


def heldout_report(ctx: RunContext, job, checkpoint_dir: Path, stage_dir: Path, max_images: int = 256):
    """Rebuild the trained method on the driver and let it report on held-out images."""
    import torch
    from safetensors.torch import load_file

    from pipeline.trainer import STATE_FILE, batch_channels, build_stage_method
    from pretext.embeddings import match_channels

    images = ctx.evalset if ctx.evalset is not None else ctx.train
    method, _ = build_stage_method(job, torch.device("cpu"))
    method.load_state_dict(load_file(str(checkpoint_dir / STATE_FILE)), strict=True)
    method.eval()
    x = torch.from_numpy(images.images[:max_images]).float().div_(255.0)
    x = match_channels(x, batch_channels(method, job.backbone))
    metrics, artifacts = method.heldout_report(x, stage_dir)
    for key, value in metrics.items():
        ctx.log(f"[{job.stage['name']}] held-out {key}: {value:.4f}")
    return {f"heldout_{k}": float(v) for k, v in metrics.items()}, artifacts


class TrainingExecutor(Executor):
    """pretext and refine (a label-free method on the training split); the base of finetune and metric."""

    def check(self, ctx: RunContext, stage: StageBase) -> None:
        check_colour(ctx, stage)

    def run(self, ctx: RunContext, stage: TrainingStage, run: StageRun) -> StageResult:
        return train_stage(ctx, stage, run)

    def final_metrics(self, result: StageResult) -> dict[str, float]:
        return {k: v for k, v in result.metrics.items() if k in FINAL_METRICS or k.startswith("recall_at_")}
