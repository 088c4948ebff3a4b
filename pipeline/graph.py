"""The stage graph: which stages may run together, and what each stage's `input` names.

Stages run in config order. Consecutive stages of a kind that `runs_in_waves` (pretext) and that do not
feed each other form a wave that may train concurrently. `input: best` is resolved when the stage starts,
from the selection metric of the candidate stages finished so far.
"""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.config import ConfigError, PipelineConfig, StageBase


def waves(stages: list[StageBase]) -> list[list[StageBase]]:
    """Consecutive wave-capable stages that do not feed each other form one wave; every other stage is alone."""
    out: list[list[StageBase]] = []
    for stage in stages:
        current = out[-1] if out else None
        independent = (
            current is not None
            and stage.runs_in_waves
            and all(type(s) is type(stage) for s in current)
            and getattr(stage, "input", None) not in {s.name for s in current} | {"best"}
        )
        if independent:
            current.append(stage)
        else:
            out.append([stage])
    return out


def best_stage(config: PipelineConfig, stage: StageBase, metrics: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The candidate stage with the best selection metric among `metrics` (stage name -> its metrics)."""
    sel = config.selection
    scored = [(m[sel.metric], name) for name, m in metrics.items()
              if config.stage(name).best_candidate and sel.metric in m]
    if not scored:
        raise ConfigError(
            f"stage '{stage.name}': input 'best' needs evaluated pretext stages, but none has "
            f"'{sel.metric}' (it needs labelled evaluation data and evaluate: true)"
        )
    value, name = (max if sel.mode == "max" else min)(scored)
    return {"stage": name, "metric": sel.metric, "value": value}


def best_pending(config: PipelineConfig, stage: StageBase, reused: set[str]) -> bool:
    """True when `input: best` cannot be known before training: an earlier candidate is not cached."""
    earlier = config.stages[: config.stages.index(stage)]
    return getattr(stage, "input", None) == "best" and any(s.best_candidate and s.name not in reused for s in earlier)
