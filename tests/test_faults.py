"""Failures during a run: a killed Ray Train worker, a non-finite loss, an unreachable tracking server,
and writes that must never be left half-done."""

from __future__ import annotations

import copy
import glob
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import validate_config

TINY = {
    "name": "faults",
    "seed": 0,
    "data": {"source": "digits", "train_subset": 256, "eval_subset": 128},
    "backbone": {"name": "test_resnet", "small_image_stem": False, "image_size": 16},
    "ray": {"num_workers": 2, "max_failures": 1},
    "stages": [{
        "name": "simclr", "kind": "pretext", "method": "simclr", "epochs": 4, "batch_size": 64,
        "evaluate": False, "checkpoint_every": 1, "log_every_steps": 4,
        "settings": {"augment": {"gaussian_blur": 0.0}},
    }],
}


def tiny_config(**changes):
    data = copy.deepcopy(TINY)
    data["stages"][0].update(changes)
    return data


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_progress(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def checkpoint_epoch(out: Path) -> int:
    from pipeline.cache import latest_checkpoint_epoch

    snapshots = glob.glob(str(out / "ray" / "*" / "checkpoint_manager_snapshot.json"))
    return max((latest_checkpoint_epoch(str(Path(s).parent.parent), Path(s).parent.name) or 0 for s in snapshots), default=0)


def test_killed_worker_is_restarted_and_resumes_from_the_last_checkpoint(ray_session, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.runner import PipelineRun

    progress = tmp_path / "progress"
    rank0 = Path(f"{progress}.rank0")
    monkeypatch.setenv("SSLPIPE_TEST_PROGRESS_FILE", str(progress))
    monkeypatch.setenv("SSLPIPE_TEST_STEP_SLEEP", "0.5")
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_after_the_first_checkpoint():
        # once epoch 1's checkpoint is registered, in the middle of a later epoch
        state = wait_for(lambda: checkpoint_epoch(out) >= 1 and (p := read_progress(rank0)) and p["epoch"] >= 2 and p,
                         timeout=300, what="a checkpoint and a later epoch of the first attempt")
        os.kill(state["pid"], signal.SIGKILL)
        killed.append(state["pid"])

    killer = threading.Thread(target=kill_after_the_first_checkpoint, daemon=True)
    killer.start()
    summary = PipelineRun(validate_config(copy.deepcopy(TINY)), out).run()
    killer.join(timeout=1)
    assert killed, "the worker was never killed"

    final = read_progress(rank0)
    assert final["pid"] != killed[0]  # a new worker process finished the stage
    assert final["start_epoch"] >= 1 and final["epoch"] == 4  # it started from a checkpoint, not from scratch
    run_id = summary["stages"]["simclr"]["run_id"]
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4]  # each epoch reported once: no epoch lost or repeated
    meta = json.loads((Path(summary["stages"]["simclr"]["artifacts"]["backbone"]) / "backbone.json").read_text())
    assert meta["epochs_trained"] == 4
    assert client.get_run(run_id).info.status == "FINISHED"


def _cli(argv):
    """`sslpipe` in-process (the session's Ray is reused); keeps pytest's SIGTERM handler."""
    from pipeline.cli import main

    previous = signal.getsignal(signal.SIGTERM)
    try:
        return main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_non_finite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(ray_session, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("SSLPIPE_TEST_NAN_AT_EPOCH", "2")
    monkeypatch.setenv("SSLPIPE_TEST_PROGRESS_FILE", str(tmp_path / "progress"))
    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump(tiny_config(epochs=2)))
    out = tmp_path / "out"
    code = _cli(["run", str(config), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "stage 'simclr': loss is nan at epoch 2, step 1" in err
    assert "last good checkpoint (after epoch 1) is kept" in err
    assert checkpoint_epoch(out) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "FAILED" and summary["stages"] == {}
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    stage_runs = client.search_runs([client.get_run(summary["parent_run_id"]).info.experiment_id],
                                    filter_string="tags.sslpipe.stage = 'simclr'")
    assert [r.info.status for r in stage_runs] == ["FAILED"]
    assert len(client.get_metric_history(stage_runs[0].info.run_id, "loss")) == 1
    # max_failures is 1, but a NaN is not retried (a retry would resume after epoch 1 and hit it again)
    assert read_progress(Path(f"{tmp_path / 'progress'}.rank0"))["start_epoch"] == 0


def test_unreachable_tracking_server_fails_fast_before_training(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    started = time.time()
    code = _cli(["run", str(config), "--output-dir", str(out), "--set", f"tracking.uri=http://127.0.0.1:{port}"])
    assert code == 2
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in capsys.readouterr().err
    assert time.time() - started < 30
    assert not (out / "stages").exists() and not (out / "ray").exists()


def test_summary_and_artifact_copies_are_replaced_atomically(tmp_path, monkeypatch):
    import shutil

    from pipeline.store import replace_dir_atomic, write_json_atomic

    summary = tmp_path / "summary.json"
    write_json_atomic(summary, {"stages": {"a": 1}})
    write_json_atomic(summary, {"stages": {"a": 2}})
    assert json.loads(summary.read_text()) == {"stages": {"a": 2}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp files left

    source, target = tmp_path / "new", tmp_path / "backbone"
    source.mkdir()
    (source / "model.safetensors").write_text("new weights")
    target.mkdir()
    (target / "model.safetensors").write_text("old weights")

    def copy_then_crash(src, dst, **kwargs):
        Path(dst, "model.safetensors").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", copy_then_crash)
    with pytest.raises(OSError, match="disk full"):
        replace_dir_atomic(source, target)
    assert (target / "model.safetensors").read_text() == "old weights"  # the old artifact is intact
    monkeypatch.undo()
    replace_dir_atomic(source, target)
    assert (target / "model.safetensors").read_text() == "new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone", "new", "summary.json"]
