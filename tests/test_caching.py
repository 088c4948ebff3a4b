"""Reruns into the same output directory: finished stages are reused by fingerprint, changed stages and
everything fed by them run again, `--dry-run` prints the plan without Ray or MLflow writes.

One tiny pipeline (digits, timm's test ResNet, one epoch) is trained once for the module; the later tests
change the output directory on purpose, and a test that needs a changed output directory makes it itself
(`changed_run`), so each test also passes alone."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from pipeline.config import ConfigError, validate_config

CONFIG = yaml.safe_load(textwrap.dedent(
    """
    name: cache
    seed: 0
    data: {source: digits, train_subset: 256, eval_subset: 128}
    backbone: {name: test_resnet, small_image_stem: false, image_size: 16}
    ray: {num_workers: 2, max_failures: 0}
    stages:
      - {name: pixels, kind: evaluate, input: pixels, tsne: false, knn_k: 10, grid_per_cluster: 2}
      - name: simclr
        kind: pretext
        method: simclr
        epochs: 1
        batch_size: 64
        log_every_steps: 4
        settings: {augment: {gaussian_blur: 0.0}}
      - {name: evaluate, kind: evaluate, input: best, tsne: false, knn_k: 10, grid_per_cluster: 2}
    """
))


def _config(**stage_changes):
    data = copy.deepcopy(CONFIG)
    for stage in data["stages"]:
        stage.update(stage_changes.get(stage["name"], {}))
    return validate_config(data)


def _client(summary):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=summary["tracking_uri"])


def _child_runs(summary):
    client = _client(summary)
    experiment = client.get_run(summary["parent_run_id"]).info.experiment_id
    return client.search_runs([experiment], filter_string="tags.sslpipe.stage != ''")


class TrainingCounter:
    """Wraps fit_stage to count how many stages really trained."""

    def __init__(self, monkeypatch):
        import pipeline.trainer as trainer

        self.calls: list[str] = []
        real = trainer.fit_stage

        def counting(job, **kwargs):
            self.calls.append(job.stage["name"])
            return real(job, **kwargs)

        monkeypatch.setattr(trainer, "fit_stage", counting)


@pytest.fixture(scope="module")
def first_run(ray_session, tmp_path_factory):
    from pipeline.runner import PipelineRun

    out = tmp_path_factory.mktemp("cache")
    return out, PipelineRun(_config(), out).run()


# simclr retrained with another learning rate and evaluate with another k: the state the later tests start from
CHANGED = {"simclr": {"optimizer": {"lr": 0.002}}, "evaluate": {"knn_k": 5}}


@pytest.fixture
def changed_run(first_run):
    """The output directory after a run of the CHANGED config: every stage of it reusable. Costs nothing after
    test_changed_stage_runs_again_and_its_dependents_follow (all reused); alone, it trains simclr once."""
    from pipeline.runner import PipelineRun

    out, first = first_run
    return out, PipelineRun(_config(**CHANGED), out).run()


# `sslpipe` in a subprocess that reports whether Ray was ever initialised in it: ray.init counted by a wrapper,
# ray.is_initialized() at the end. Our own marker, so it does not depend on Ray's wording of its log lines.
RAY_PROBE = """
import sys, ray
calls = []
real_init = ray.init
def counting_init(*args, **kwargs):
    calls.append(1)
    return real_init(*args, **kwargs)
ray.init = counting_init
from pipeline.cli import main
try:
    code = main(sys.argv[1:])
finally:
    print(f"SSLPIPE-TEST ray.init calls={len(calls)} initialized={ray.is_initialized()}", flush=True)
sys.exit(code)
"""


def test_rerun_reuses_every_stage_without_starting_ray(first_run, monkeypatch):
    from pipeline.context import RunContext
    from pipeline.runner import PipelineRun

    out, first = first_run
    runs_before = len(_child_runs(first))
    monkeypatch.setattr(RunContext, "ensure_ray", lambda self: pytest.fail("Ray started for a cached rerun"))
    # `compile` changes how a stage runs, not what it computes: turning it on still reuses the stage
    second = PipelineRun(_config(simclr={"compile": True}), out).run()

    assert second["reused_stages"] == ["pixels", "simclr", "evaluate"]
    assert second["parent_run_id"] != first["parent_run_id"]
    for name, stage in first["stages"].items():
        assert second["stages"][name]["run_id"] == stage["run_id"]
        assert second["stages"][name]["metrics"] == stage["metrics"]
        assert second["stages"][name]["reused"] is True
    assert second["best"] == first["best"] and second["best"]["stage"] == "simclr"
    # no new stage runs (so no duplicated artifacts); the new parent says which runs it reused
    assert len(_child_runs(first)) == runs_before
    parent = _client(first).get_run(second["parent_run_id"])
    assert parent.info.status == "FINISHED"
    for name, stage in first["stages"].items():
        assert parent.data.tags[f"sslpipe.reused.{name}"] == stage["run_id"]


def test_dry_run_prints_the_plan_without_ray_or_mlflow_writes(first_run, tmp_path):
    out, first = first_run
    runs_before = len(_client(first).search_runs([_client(first).get_run(first["parent_run_id"]).info.experiment_id]))
    config = tmp_path / "config.yaml"
    changed = copy.deepcopy(CONFIG)
    changed["stages"][2]["knn_k"] = 5
    config.write_text(yaml.safe_dump(changed))
    proc = subprocess.run([sys.executable, "-c", RAY_PROBE, "run", str(config), "--output-dir", str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.split()}
    assert f"reuse (run {first['stages']['pixels']['run_id']})" in lines["pixels"]
    assert f"reuse (run {first['stages']['simclr']['run_id']})" in lines["simclr"]
    assert lines["simclr"].split()[3] == first["stages"]["simclr"]["fingerprint"]
    assert "run (config or upstream changed)" in lines["evaluate"]
    assert "SSLPIPE-TEST ray.init calls=0 initialized=False" in proc.stdout.splitlines()
    assert len(_client(first).search_runs([_client(first).get_run(first["parent_run_id"]).info.experiment_id])) == runs_before


def test_changed_stage_runs_again_and_its_dependents_follow(first_run, monkeypatch):
    from pipeline.runner import PipelineRun

    out, first = first_run
    counter = TrainingCounter(monkeypatch)
    summary = PipelineRun(_config(evaluate={"knn_k": 5}), out).run()
    assert counter.calls == []  # only the evaluate stage changed
    assert summary["reused_stages"] == ["pixels", "simclr"]
    assert summary["stages"]["evaluate"]["run_id"] != first["stages"]["evaluate"]["run_id"]

    summary = PipelineRun(_config(**CHANGED), out).run()
    assert counter.calls == ["simclr"]
    assert summary["reused_stages"] == ["pixels"]
    assert summary["stages"]["simclr"]["fingerprint"] != first["stages"]["simclr"]["fingerprint"]
    assert summary["best"]["stage"] == "simclr"
    # the evaluate stage's config is the same, but its input was retrained: it must not be reused
    assert summary["stages"]["evaluate"]["reused"] is False
    assert _client(first).get_run(summary["stages"]["evaluate"]["run_id"]).data.tags["sslpipe.input"] == "simclr"


def test_rerun_flag_forces_one_stage_and_rejects_unknown_names(changed_run, monkeypatch):
    from pipeline.runner import PipelineRun

    out, _ = changed_run
    config = _config(**CHANGED)
    before = PipelineRun(config, out).plan()
    assert [p.action for p in before] == ["reuse", "reuse", "reuse"]
    counter = TrainingCounter(monkeypatch)
    summary = PipelineRun(config, out, rerun=["evaluate"]).run()
    assert counter.calls == [] and summary["reused_stages"] == ["pixels", "simclr"]
    assert summary["stages"]["evaluate"]["run_id"] not in before[2].detail
    with pytest.raises(ConfigError, match="--rerun nope: no such stage"):
        PipelineRun(config, out, rerun=["nope"])

    # a forced training stage starts from scratch (its finished checkpoints are dropped) and what it feeds follows
    plans = PipelineRun(config, out, rerun=["simclr"]).plan()
    assert [p.describe() for p in plans] == [f"reuse (run {summary['stages']['pixels']['run_id']})", "run (forced)",
                                             "run (input best is decided after training)"]
    forced = PipelineRun(config, out, rerun=["simclr"]).run()
    assert counter.calls == ["simclr"] and forced["reused_stages"] == ["pixels"]
    assert forced["stages"]["simclr"]["fingerprint"] == summary["stages"]["simclr"]["fingerprint"]
    assert forced["stages"]["evaluate"]["reused"] is False
    history = _client(forced).get_metric_history(forced["stages"]["simclr"]["run_id"], "loss")
    assert [m.step for m in history] == [1]  # trained epoch 1 again rather than resuming after it


def test_missing_artifact_or_unfinished_mlflow_run_is_not_reused(changed_run):
    from pathlib import Path

    from pipeline.runner import PipelineRun

    out, first = changed_run
    config = _config(**CHANGED)
    summary = json.loads((out / "summary.json").read_text())
    Path(summary["stages"]["evaluate"]["artifacts"]["assignments"]).unlink()
    _client(first).set_terminated(summary["stages"]["pixels"]["run_id"], status="FAILED")
    plans = {p.name: p for p in PipelineRun(config, out).plan()}
    assert plans["pixels"].action == "run" and plans["pixels"].detail.endswith("is FAILED")
    assert plans["simclr"].action == "reuse"
    assert plans["evaluate"].action == "run" and plans["evaluate"].detail.startswith("artifact missing")


def test_latest_checkpoint_epoch_reads_ray_trains_snapshot(tmp_path):
    from pipeline.cache import latest_checkpoint_epoch

    assert latest_checkpoint_epoch(str(tmp_path), "run") is None
    (tmp_path / "run").mkdir()
    snapshot = tmp_path / "run" / "checkpoint_manager_snapshot.json"
    snapshot.write_text("{not json")
    assert latest_checkpoint_epoch(str(tmp_path), "run") is None
    snapshot.write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "c", "metrics": {"epoch": 2}}}))
    assert latest_checkpoint_epoch(str(tmp_path), "run") == 2
