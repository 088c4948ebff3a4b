"""Finetune stages: a linear probe or full fine-tuning on a labeled share of the training split, then
test accuracy of the classifier on the evaluation split."""

from __future__ import annotations

import numpy as np

from pipeline.config import FinetuneStage
from pipeline.context import RunContext
from pipeline.stages.base import StageResult, StageRun
from pipeline.stages.training import TrainingExecutor, train_stage


class FinetuneExecutor(TrainingExecutor):
    def check(self, ctx: RunContext, stage: FinetuneStage) -> None:
        """Labels on both splits, 2 classes at least: refused before any stage runs."""
        from pipeline.data import DataError

        super().check(ctx, stage)
        for split, data in (("training", ctx.train), ("evaluation", ctx.evalset)):
            if data is None or data.labels is None:
                raise DataError(f"stage '{stage.name}': fine-tuning needs labels, but the {split} split of "
                                f"data source '{ctx.config.data.source}' has none")
        if len(np.unique(ctx.train.labels)) < 2:
            raise DataError(f"stage '{stage.name}': fine-tuning needs at least 2 classes in the training labels")

    def run(self, ctx: RunContext, stage: FinetuneStage, run: StageRun) -> StageResult:
        from downstream.finetune import stratified_fraction
        from pipeline.images import take_rows
        from pipeline.classifier import classifier_accuracy, write_classifier

        class_ids, targets = np.unique(ctx.train.labels, return_inverse=True)
        keep = stratified_fraction(targets, stage.label_fraction, seed=ctx.config.seed)
        ctx.log(f"[{stage.name}] {stage.mode} fine-tuning on {len(keep)} labeled images "
                f"({stage.label_fraction:g} of {len(targets)}, {len(class_ids)} classes)")
        job_stage = stage.model_copy(update={"settings": stage.method_settings(len(class_ids), class_ids.tolist())})
        result = train_stage(ctx, job_stage, run, images=take_rows(ctx.train.images, keep), labels=targets[keep])
        classifier = write_classifier(result.artifacts["backbone"], result.artifacts["classifier"])
        test = classifier_accuracy(classifier, ctx.evalset.images, ctx.evalset.labels)
        ctx.log(f"[{stage.name}] test accuracy {test['accuracy']:.4f}"
                + (f"  top-5 {test['top5_accuracy']:.4f}" if "top5_accuracy" in test else ""))
        result.metrics.update(test, labeled_images=float(len(keep)))
        return result
