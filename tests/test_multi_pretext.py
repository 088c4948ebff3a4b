"""Several pretext stages in one pipeline: each is evaluated, the best is recorded, `input: best` uses it,
and independent stages run concurrently when the cluster has room."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from pipeline.config import ConfigError, validate_config

CONFIG = textwrap.dedent(
    """
    name: multi
    data: {source: digits, train_subset: 256, eval_subset: 200}
    backbone: {name: test_resnet, small_image_stem: false, image_size: 16}
    ray: {num_workers: 1}
    selection: {metric: knn_accuracy, mode: max}
    stages:
      - {name: a, kind: pretext, method: simclr, epochs: 1, batch_size: 64, settings: {temperature: 0.5}}
      - {name: b, kind: pretext, method: simclr, epochs: 1, batch_size: 64, settings: {temperature: 0.2}}
      - {name: final, kind: evaluate, input: best, tsne: false, knn_k: 20}
    """
)


def test_waves_group_independent_pretext_stages():
    from pipeline.graph import waves as stage_waves

    cfg = validate_config(yaml.safe_load(CONFIG))
    waves = stage_waves(cfg.stages)
    assert [[s.name for s in w] for w in waves] == [["a", "b"], ["final"]]
    chained = yaml.safe_load(CONFIG)
    chained["stages"][1]["input"] = "a"
    waves = stage_waves(validate_config(chained).stages)
    assert [[s.name for s in w] for w in waves] == [["a"], ["b"], ["final"]]


def test_best_needs_an_earlier_pretext_stage():
    data = yaml.safe_load(CONFIG)
    data["stages"] = [data["stages"][2]]
    with pytest.raises(ConfigError, match="input 'best' needs an earlier pretext stage"):
        validate_config(data)


def test_two_pretext_stages_run_concurrently_and_best_is_used(ray_session, tmp_path):
    from pipeline.runner import PipelineRun

    logs: list[str] = []
    cfg = validate_config(yaml.safe_load(CONFIG))
    summary = PipelineRun(cfg, tmp_path, log=lambda m: (logs.append(m), print(m))).run()
    assert any("concurrently" in line for line in logs), logs
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    a, b = stages["a"]["metrics"], stages["b"]["metrics"]
    assert {"knn_accuracy", "nmi"} <= a.keys() and {"knn_accuracy", "nmi"} <= b.keys()
    best = summary["best"]["stage"]  # on a tie (200 eval images: it happens) either stage is the best
    assert best in ("a", "b") and stages[best]["metrics"]["knn_accuracy"] == max(a["knn_accuracy"], b["knn_accuracy"])
    assert stages["final"]["input"] == best
    assert stages["a"]["artifacts"]["backbone"] != stages["b"]["artifacts"]["backbone"]

    # Concurrently: the two stages' training intervals overlap. Each interval runs from the start of the
    # stage's MLflow run to the timestamp of its last epoch's loss (logged by rank 0 when the epoch ends); run
    # one after the other, b's run would start only after a's training (and evaluation) ended.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    intervals = {}
    for name in ("a", "b"):
        run_id = stages[name]["run_id"]
        losses = client.get_metric_history(run_id, "loss")
        assert len(losses) == 1  # one epoch each
        intervals[name] = (client.get_run(run_id).info.start_time, max(m.timestamp for m in losses))
        assert intervals[name][0] < intervals[name][1], intervals
    assert max(s for s, _ in intervals.values()) < min(e for _, e in intervals.values()), intervals
