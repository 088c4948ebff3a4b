"""Stage executors: one module per stage kind, one line each in the registry below.

A new stage kind is a schema class in `pipeline.config` (added to STAGE_TYPES), an executor module here,
and its line in EXECUTORS.
"""

from __future__ import annotations

from pipeline.config import StageBase
from pipeline.stages.base import Executor, StageExecutor, StageResult, StageRun

EXECUTORS: dict[str, str] = {
    "pretext": "pipeline.stages.training:TrainingExecutor",
    "refine": "pipeline.stages.training:TrainingExecutor",
    "finetune": "pipeline.stages.finetune:FinetuneExecutor",
    "metric": "pipeline.stages.metric:MetricExecutor",
    "cluster": "pipeline.stages.cluster:ClusterExecutor",
    "evaluate": "pipeline.stages.evaluate:EvaluateExecutor",
}


def executor_for(stage: StageBase) -> StageExecutor:
    """The executor of a stage's kind (imported on first use: the evaluate kind never imports Ray Train)."""
    from pretext.base import import_object

    return import_object(EXECUTORS[stage.kind])()


__all__ = ["EXECUTORS", "Executor", "StageExecutor", "StageResult", "StageRun", "executor_for"]
