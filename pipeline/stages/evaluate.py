"""Evaluate stages: embed both splits with a backbone (or take raw pixels) and measure it: kNN accuracy,
retrieval, k-means and its metrics, plots, per-cluster pages, assignments and an HTML report.

Which rule kept each query's own image out of the kNN bank and the retrieval gallery (same id or same pixels,
metrics.json's "exclusion") is also set as tags `sslpipe.exclusion.*` of the stage's MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import EvaluateStage
from pipeline.context import RunContext
from pipeline.stages.base import Executor, StageResult, StageRun


class EvaluateExecutor(Executor):
    def check(self, ctx: RunContext, stage: EvaluateStage) -> None:
        """A raw-pixel baseline too large for memory, or a learned distance without labels to learn it from or
        learned from the very images it is scored on, is refused before any stage runs."""
        from pipeline.data import DataError
        from pipeline.evaluate import check_pixel_budget, same_images

        if stage.input == "pixels":
            check_pixel_budget(stage, ctx.train, ctx.evalset)
        if stage.retrieval and stage.retrieval_distance == "lmnn" and ctx.train.labels is None:
            raise DataError(f"stage '{stage.name}': retrieval_distance lmnn learns its distance from the training "
                            f"split's labels; data source '{ctx.config.data.source}' has none here (use cosine, "
                            "euclidean or mahalanobis)")
        if stage.cluster_space == "lmnn" and ctx.train.labels is None:
            raise DataError(f"stage '{stage.name}': cluster_space lmnn learns its map from the training split's "
                            f"labels; data source '{ctx.config.data.source}' has none here (use embedding or umap)")
        learned = [key for key, on in (("retrieval_distance", stage.retrieval and stage.retrieval_distance == "lmnn"),
                                       ("cluster_space", stage.cluster_space == "lmnn")) if on]
        if learned and same_images(ctx.train, ctx.evalset):
            raise DataError(f"stage '{stage.name}': {learned[0]} lmnn learns from the training split's labels, and "
                            "the evaluation split is the same images: its metrics would be scored against the "
                            "labels it learned from. Evaluate on held-out images (data.eval_split) or use "
                            f"{'mahalanobis' if learned[0] == 'retrieval_distance' else 'embedding or umap'}")

    def run(self, ctx: RunContext, stage: EvaluateStage, run: StageRun) -> StageResult:
        from pipeline.evaluate import evaluate

        artifact = Path(run.input_backbone) if run.input_backbone else None
        metrics, artifacts = evaluate(stage, artifact=artifact, train=ctx.train, evalset=ctx.evalset,
                                      out_dir=ctx.stage_dir(stage.name), seed=ctx.config.seed, log=ctx.log)
        exclusion = json.loads(Path(artifacts["metrics"]).read_text()).get("exclusion") or {}
        if exclusion and ctx.tracker is not None:
            ctx.tracker.set_tags(run.run_id, {f"sslpipe.exclusion.{k}": v for k, v in exclusion.items()})
        return StageResult(metrics=metrics, artifacts=artifacts)
