"""The driver is stopped mid-stage (SIGTERM, as a scheduler does; Ctrl-C takes the same path): MLflow runs
are marked KILLED, the summary keeps the finished stages, and the same command resumes the stage from its
checkpoint while reusing the finished ones. The `sslpipe` subprocesses attach to the session's Ray."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
from pathlib import Path

import yaml

from test_faults import TINY, checkpoint_epoch, read_progress, wait_for


def test_sigterm_marks_runs_killed_and_the_rerun_resumes_from_the_checkpoint(ray_session, sslpipe_cmd, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.config import validate_config
    from pipeline.runner import PipelineRun

    data = copy.deepcopy(TINY)
    data["ray"]["address"] = ray_session.get_runtime_context().gcs_address
    data["stages"].insert(0, {"name": "pixels", "kind": "evaluate", "input": "pixels", "tsne": False,
                              "knn_k": 10, "grid_per_cluster": 2})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    out, progress = tmp_path / "out", tmp_path / "progress"
    command = [*sslpipe_cmd, "run", str(config), "--output-dir", str(out)]
    env = {**os.environ, "SSLPIPE_TEST_PROGRESS_FILE": str(progress), "SSLPIPE_TEST_STEP_SLEEP": "0.5"}

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: checkpoint_epoch(out) >= 1 and (read_progress(Path(f"{progress}.rank0")) or {}).get("epoch", 0) >= 2,
                     timeout=300, what="a checkpoint and a later epoch of the training stage")
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
    first_log = (tmp_path / "first.log").read_text()
    assert code == 130, first_log[-3000:]
    assert "rerun the same command to continue" in first_log

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "KILLED" and list(summary["stages"]) == ["pixels"]
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    assert client.get_run(summary["parent_run_id"]).info.status == "KILLED"
    experiment = client.get_run(summary["parent_run_id"]).info.experiment_id
    killed = client.search_runs([experiment], filter_string="tags.sslpipe.stage = 'simclr'")
    assert [r.info.status for r in killed] == ["KILLED"]

    plans = PipelineRun(validate_config(data), out).plan()
    assert [p.describe() for p in plans] == [
        f"reuse (run {summary['stages']['pixels']['run_id']})",
        f"resume (checkpoint after epoch {checkpoint_epoch(out)})",
    ]

    env.pop("SSLPIPE_TEST_STEP_SLEEP")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed_after = read_progress(Path(f"{progress}.rank0"))["start_epoch"]
    assert resumed_after >= 1  # not from epoch 1
    assert f"resumed from checkpoint after epoch {resumed_after}/4" in proc.stdout
    console = proc.stdout + proc.stderr  # our progress lines reach the terminal; Ray's report dumps do not
    assert "[simclr] epoch 4/4" in console and "Ray's logs: " in console
    assert "TrainingReport(" not in console and "PreemptionWatcher" not in console

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["reused_stages"] == ["pixels"]
    run_id = summary["stages"]["simclr"]["run_id"]
    assert run_id != killed[0].info.run_id
    # the resumed run logs only the epochs it trained; together with the killed run, every epoch once
    resumed_steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    killed_steps = [m.step for m in client.get_metric_history(killed[0].info.run_id, "loss")]
    assert sorted(resumed_steps) == list(range(resumed_after + 1, 5))
    assert sorted(set(killed_steps) | set(resumed_steps)) == [1, 2, 3, 4]
    # the artifact counts every epoch, those before the stop included
    from pipeline.backbones import read_backbone_meta

    assert read_backbone_meta(summary["stages"]["simclr"]["artifacts"]["backbone"])["epochs_trained"] == 4


def test_sigterm_during_concurrent_stages_exits_promptly_with_both_runs_killed(ray_session, sslpipe_cmd, tmp_path):
    from mlflow.tracking import MlflowClient

    data = copy.deepcopy(TINY)
    data["ray"].update(address=ray_session.get_runtime_context().gcs_address, num_workers=1)
    second = {**data["stages"][0], "name": "other", "settings": {"temperature": 0.2}}
    data["stages"].append(second)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    out, log_path = tmp_path / "out", tmp_path / "run.log"
    env = {**os.environ, "SSLPIPE_TEST_STEP_SLEEP": "0.5"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*sslpipe_cmd, "run", str(config), "--output-dir", str(out)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: log_path.read_text().count("epoch 1/4 step") >= 2, timeout=300,
                     what="both stages training")
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)  # the stage threads block in Ray calls: the CLI must not wait for them
        finally:
            proc.kill()
    assert code == 130, log_path.read_text()[-3000:]
    assert "running 2 independent pretext stages concurrently" in log_path.read_text()
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    experiment = client.get_run(summary["parent_run_id"]).info.experiment_id
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([experiment])}
    assert statuses == {"simclr": "KILLED", "other": "KILLED", "faults": "KILLED"}
