"""The shape the code keeps: a short conductor, one executor per stage kind, and kinds compared only where
a stage is dispatched to its executor."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_kind_has_one_executor():
    from pipeline.config import STAGE_KINDS, STAGE_TYPES
    from pipeline.stages import EXECUTORS, executor_for
    from pipeline.stages.base import Executor

    assert sorted(EXECUTORS) == sorted(STAGE_KINDS)
    for model in STAGE_TYPES:
        kind = model.model_fields["kind"].annotation.__args__[0]
        executor = executor_for(model.model_construct(kind=kind, name="x"))
        assert isinstance(executor, Executor) and callable(executor.run), kind


def test_stage_kinds_are_compared_only_in_the_dispatch():
    """Traits of a kind live on its schema class (produces_backbone, best_candidate, ...), not in string tests."""
    pattern = re.compile(r"""\bkind\s*(==|!=|\bin\b|\bnot in\b)|(==|!=)\s*\w*\.?kind\b|["'](pretext|refine|finetune|metric|evaluate)["']\s*(==|!=|in\b)""")
    offenders = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path == ROOT / "pipeline" / "stages" / "__init__.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#", 1)[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "stage kinds compared outside the dispatch:\n" + "\n".join(offenders)


def test_the_conductor_stays_short():
    lines = len((ROOT / "pipeline" / "runner.py").read_text().splitlines())
    assert lines <= 250, f"pipeline/runner.py has {lines} lines; move stage work into an executor"
