"""Run, reuse or resume: the decision for each stage, from its fingerprint and its record on disk.

A stage's fingerprint covers what changes its results: its own result fields (the schema marks the
execution-only ones, such as `compile` or `log_every_steps`), the backbone config, the seed, the data
fingerprints (the evaluation split's only when the stage reads it), its input's fingerprint and, for
training stages, the Ray settings that change what is computed (`num_workers`: the per-rank batch;
`use_gpu`: the precision `auto` picks). A rerun reuses a stage whose record matches, whose artifacts are
on disk and whose MLflow run is FINISHED; an unfinished training stage resumes from its Ray checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import PipelineConfig, StageBase, TrainingStage, result_settings
from pipeline.context import RunContext
from pipeline.inputs import teacher_digest
from pipeline.store import fingerprint, read_record


@dataclass
class StagePlan:
    """What a run would do with one stage; `--dry-run` prints these."""

    name: str
    kind: str
    input: str | None
    fingerprint: str | None
    action: str  # run | reuse | resume
    detail: str = ""

    def describe(self) -> str:
        return self.action + (f" ({self.detail})" if self.detail else "")


def stage_fingerprint(config: PipelineConfig, stage: StageBase, *, data: str, upstream: str | None,
                      evaluation: str | None = None, weights: str | None = None, teacher: str | None = None) -> str:
    """The cache key of one stage. `evaluation` is the evaluation split's fingerprint when the stage reads it;
    `weights` the sha256 of the file `backbone.pretrained` / `backbone.weights` resolved to (the path of
    `backbone.weights` is not in the key: the same bytes under another name reuse, new bytes at the same path do not)."""
    parts: list[Any] = [result_settings(stage), result_settings(config.backbone), config.seed, data, upstream]
    if isinstance(stage, TrainingStage):
        parts.append({"ray": result_settings(config.ray)})
    if evaluation is not None:
        parts.append(evaluation)
    if weights is not None:
        parts.append({"weights": weights})
    if teacher is not None:  # a distillation teacher's content (pipeline.inputs.teacher_digest)
        parts.append({"teacher": teacher})
    return fingerprint(*parts)


def ray_run_name(config: PipelineConfig, stage: StageBase, fp: str) -> str:
    """Ray Train's run folder of a stage: a changed fingerprint never resumes another's checkpoint."""
    return f"{config.name}-{stage.name}-{fp[:8]}"


def latest_checkpoint_epoch(storage_path: str, run_name: str) -> int | None:
    """Epochs done in the newest checkpoint Ray Train recorded for `run_name` (local storage only)."""
    if "://" in storage_path:
        return None
    snapshot = Path(storage_path) / run_name / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        return int(latest["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Cache:
    """The run's view of what is cached. `force` ignores every record, `rerun` the named stages'."""

    def __init__(self, ctx: RunContext, *, force: bool = False, rerun: set[str] | None = None) -> None:
        self.ctx, self.config, self.output_dir = ctx, ctx.config, ctx.output_dir
        self.force, self.rerun = force, set(rerun or ())
        self.fingerprints: dict[str, str | None] = {}  # stage -> fingerprint (None: known after training)
        self.reused: set[str] = set()
        self.run_status: Callable[[str], str | None] = lambda run_id: None  # MLflow run status reader

    def fingerprint(self, stage: StageBase, inp: str | None) -> str | None:
        """None when the input is a stage whose fingerprint is not known yet."""
        upstream = self.fingerprints.get(inp, inp) if inp else None
        if inp in self.fingerprints and upstream is None:
            return None
        reads_eval = self.ctx.evalset is not None and stage.uses_eval_split()
        weights = self.ctx.weights.source_sha256 if self.ctx.weights is not None else None
        return stage_fingerprint(self.config, stage, data=self.ctx.data_fingerprint, upstream=upstream,
                                 evaluation=self.ctx.eval_fingerprint if reads_eval else None, weights=weights,
                                 teacher=teacher_digest(stage))

    def forced(self, stage: StageBase) -> bool:
        return self.force or stage.name in self.rerun

    def input_reran(self, inp: str | None) -> bool:
        """True when the input stage was (or will be) trained again in this run rather than reused."""
        return inp is not None and inp in self.fingerprints and inp not in self.reused

    def decide(self, stage: StageBase, inp: str | None) -> tuple[StagePlan, dict | None]:
        """reuse (record matches, artifacts on disk, MLflow run FINISHED), resume (Ray checkpoint) or run."""
        fp = self.fingerprint(stage, inp)
        plan = StagePlan(stage.name, stage.kind, inp, fp, "run")
        if fp is None:
            plan.detail = f"input {inp} is decided after training"
            return plan, None
        if self.forced(stage):
            plan.detail = "forced"
            return plan, None
        record = read_record(self.output_dir, stage.name)
        if record is not None and self.input_reran(inp):
            plan.detail = f"input {inp} runs again"
            return plan, None
        if record is not None and record.get("fingerprint") != fp:
            plan.detail = "config or upstream changed"
        elif record is not None:
            missing = [p for k, p in record.get("artifacts", {}).items() if k != "checkpoints" and not Path(p).exists()]
            status = None if missing else (self.run_status(record["run_id"]) if record.get("run_id") else None)
            if missing:
                plan.detail = f"artifact missing: {missing[0]}"
            elif status != "FINISHED":
                plan.detail = f"MLflow run {record.get('run_id')} is {status or 'not found'}"
            else:
                plan.action, plan.detail = "reuse", f"run {record['run_id']}"
                return plan, record
        if isinstance(stage, TrainingStage):
            epoch = latest_checkpoint_epoch(self.ctx.storage_path, ray_run_name(self.config, stage, fp))
            if epoch:
                plan.action, plan.detail = "resume", f"checkpoint after epoch {epoch}"
        return plan, None

    def note(self, name: str, fp: str | None, *, reused: bool) -> None:
        self.fingerprints[name] = fp
        if reused:
            self.reused.add(name)
        else:
            self.reused.discard(name)
