"""Ray's own lines stay off the console and land in the run folder; the workers' progress lines still show.

The Train run happens in a driver subprocess attached to the session's Ray head: Ray reads
RAY_DEDUP_LOGS_SKIP_REGEX when it is first imported, and a fresh process captures exactly what a user sees."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.console import DRIVER_LOG, SESSION_DIR, SKIP_REGEX, logs_line, ray_console_env

ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent(
    """
    import sys, tempfile, time
    from pathlib import Path

    from pipeline.console import logs_line, quiet_ray_console, save_ray_logs

    log_dir, address = Path(sys.argv[1]), sys.argv[2]
    quiet_ray_console(log_dir)  # before anything imports ray

    import ray
    import ray.train
    from ray.train import Checkpoint, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer


    def train_fn(config):
        rank = ray.train.get_context().get_world_rank()
        for epoch in range(2):
            if rank == 0:
                print(f"[tiny] epoch {epoch + 1}/2 step 1/1 loss {0.5 - epoch / 10:.4f}", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    Path(tmp, "state.json").write_text("{}")
                    checkpoint = Checkpoint.from_directory(tmp)
                ray.train.report({"loss": 0.5 - epoch / 10, "epoch": epoch + 1}, checkpoint=checkpoint)


    ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": {"RAY_ADDRESS": address}})
    run_config = RunConfig(name="tiny", storage_path=str(log_dir.parent / "storage"),
                           logging_config=LoggingConfig(log_level="WARNING"))  # as pipeline.trainer.fit_stage
    result = TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=2), run_config=run_config).fit()
    time.sleep(3)  # the log monitor forwards the workers' last lines on its next poll
    print("final epoch", result.metrics["epoch"], flush=True)
    print("saved", save_ray_logs(log_dir), flush=True)
    print(logs_line(log_dir), flush=True)
    ray.shutdown()
    """
)


def test_env_keeps_what_the_user_set(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)
    env = ray_console_env()
    assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0" and env["RAY_DEDUP_LOGS_SKIP_REGEX"] == SKIP_REGEX
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in ray_console_env(preemption_watcher=True)

    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "my noise")
    env = ray_console_env()
    assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
    assert env["RAY_DEDUP_LOGS_SKIP_REGEX"] == f"(?:my noise)|{SKIP_REGEX}"


def test_driver_ray_logger_goes_to_the_run_folder(tmp_path, monkeypatch):
    """In a process that imported ray already (like this one): INFO to the file, warnings still on the console."""
    from pipeline.console import quiet_ray_console, restore_ray_console

    for key in ("RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_ENABLE_PRINT_PATCH"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # restored afterwards
        monkeypatch.delenv(key)
    import ray._private.ray_logging as ray_logging

    skip_before = (ray_logging.stdout_deduplicator.skip_re, ray_logging.stderr_deduplicator.skip_re)
    try:
        first = quiet_ray_console(tmp_path / "a")
        second = quiet_ray_console(tmp_path / "b")  # the next run in the same process
        logger = logging.getLogger("ray.test_console")
        logger.info("an info line")
        logger.warning("a warning line")
        consoles = [h for h in logging.getLogger("ray").handlers if not isinstance(h, logging.FileHandler)]
        assert consoles and all(h.level >= logging.WARNING for h in consoles)
        assert ray_logging.stderr_deduplicator.skip_re.search("Reporting training result 1: TrainingReport(x)")
    finally:
        restore_ray_console()
        ray_logging.stdout_deduplicator.skip_re, ray_logging.stderr_deduplicator.skip_re = skip_before
    assert first == tmp_path / "a" and second == tmp_path / "b"
    assert (first / DRIVER_LOG).read_text() == ""
    text = (second / DRIVER_LOG).read_text()
    assert "an info line" in text and "a warning line" in text
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("ray").handlers)


@pytest.mark.ray
def test_train_run_shows_progress_lines_and_keeps_rays_lines_in_the_run_folder(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    log_dir = tmp_path / "run" / "logs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in ("RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_ADDRESS"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), str(log_dir), address], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    assert "[tiny] epoch 1/2 step 1/1 loss 0.5000" in proc.stdout, output[-4000:]
    assert "[tiny] epoch 2/2 step 1/1 loss 0.4000" in proc.stdout, output[-4000:]
    assert "final epoch 2" in proc.stdout
    assert "TrainingReport(" not in output, output[-4000:]
    assert "PreemptionWatcher" not in output, output[-4000:]
    assert "Connecting to existing Ray cluster" not in output  # the driver's INFO line ...
    assert logs_line(log_dir) in proc.stdout

    assert "Connecting to existing Ray cluster" in (log_dir / DRIVER_LOG).read_text()  # ... is in the file
    session = log_dir / SESSION_DIR
    assert f"saved {session}" in proc.stdout
    kept = "\n".join(p.read_text(errors="replace") for p in session.rglob("*") if p.is_file())
    assert "TrainingReport(" in kept  # the lines the console skipped are kept in the run folder
    assert list(session.rglob("ray-train-*-controller-*.log"))  # Train's own controller log
