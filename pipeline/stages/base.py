"""The executor protocol: what the conductor asks of every stage kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pipeline.cache import StagePlan
from pipeline.config import StageBase
from pipeline.context import RunContext


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path; "backbone" for backbone stages
    fingerprint: str = ""
    reused: bool = False


@dataclass
class StageRun:
    """One execution of a stage: its resolved input, plan and MLflow run."""

    input: str | None  # the input stage (resolved: `best` names the chosen stage), 'pixels', or None
    input_backbone: str | None  # the input stage's backbone artifact folder, None for pixels / a fresh init
    plan: StagePlan
    run_id: str
    fresh: bool  # forced, or its input was retrained: old checkpoints of this fingerprint must not be resumed

    @property
    def fingerprint(self) -> str:
        return self.plan.fingerprint or ""


class StageExecutor(Protocol):
    def check(self, ctx: RunContext, stage: StageBase) -> None:
        """Refuse a stage that cannot run on this data, before anything starts (raise DataError)."""

    def run(self, ctx: RunContext, stage: StageBase, run: StageRun) -> StageResult:
        """Do the stage's work; return its metrics and artifact paths."""

    def final_metrics(self, result: StageResult) -> dict[str, float]:
        """What the conductor logs to the stage's MLflow run when it ends."""


class Executor:
    """Defaults for the protocol: no pre-flight check; every metric logged at the end."""

    def check(self, ctx: RunContext, stage: StageBase) -> None:
        return None

    def final_metrics(self, result: StageResult) -> dict[str, float]:
        return result.metrics
