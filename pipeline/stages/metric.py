"""Metric stages: supervised metric learning on the training split's labels, then retrieval of the
evaluation split (meant for classes never seen in training) with the exported embedder."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import MetricStage
from pipeline.context import RunContext
from pipeline.stages.base import StageResult, StageRun
from pipeline.stages.training import TrainingExecutor, train_stage


class MetricExecutor(TrainingExecutor):
    def check(self, ctx: RunContext, stage: MetricStage) -> None:
        """Training labels: refused before any stage runs."""
        from pipeline.data import DataError

        super().check(ctx, stage)
        if ctx.train.labels is None:
            raise DataError(f"stage '{stage.name}': metric learning needs labels; data source "
                            f"'{ctx.config.data.source}' has none")
        if stage.settings["loss"] == "smoothap":  # one group of m images per class in every global batch
            import numpy as np

            m, workers = stage.settings["images_per_class"], ctx.config.ray.num_workers
            batch = (stage.batch_size // workers) * workers
            classes = len(np.unique(ctx.train.labels))
            if batch % m or batch // m > classes:
                raise DataError(f"stage '{stage.name}': loss smoothap needs every class of a global batch to hold "
                                f"settings.images_per_class={m} images: batch_size {batch} must be a multiple of {m} "
                                f"and at most {m} x {classes} classes = {m * classes}")

    def run(self, ctx: RunContext, stage: MetricStage, run: StageRun) -> StageResult:
        result = train_stage(ctx, stage, run, labels=ctx.train.labels)
        if stage.retrieval and ctx.evalset is not None and ctx.evalset.labels is not None:
            from downstream.retrieval import retrieval_metrics
            from pipeline.evaluate import backbone_features, self_matches

            features = backbone_features(Path(result.artifacts["backbone"]), ctx.evalset.images, batch_size=512)
            # leave-one-out by identity: each query's own image (and its copies, by id or pixels) left out
            exclude, _ = self_matches(ctx.evalset, ctx.evalset)
            metrics = retrieval_metrics(features, ctx.evalset.labels, exclude=exclude)
            ctx.log(f"[{stage.name}] retrieval on {ctx.config.data.eval_split}: "
                    + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            result.metrics.update(metrics)
        return result
