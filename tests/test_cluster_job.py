"""A pipeline submitted as a Ray job to a real head node: `ray job submit -- sslpipe run CONFIG`.

The head node runs on loopback with its own ports, temp dir and HOME (so its auth token never touches
the user's ~/.ray), in its own process group: teardown kills that group only, never other Ray
instances on the machine (`ray stop` would stop them all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import dashboard_status, ray_cli, start_ray_head

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    """A token-authenticated head node on 127.0.0.1 with 2 CPUs; yields (dashboard url, env for the CLI)."""
    ray = ray_cli()
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        HOME=str(home),  # `ray get-auth-token --generate` writes $HOME/.ray/auth_token
        RAY_AUTH_MODE="token",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(dict.fromkeys([str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])),
        RAY_TRAIN_ENABLE_PRINT_PATCH="0",
        RAY_USAGE_STATS_ENABLED="0",
    )
    token = subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    assert (home / ".ray" / "auth_token").read_text().strip() == token
    _, url, stop = start_ray_head(env, num_cpus=2, token=token)
    try:
        yield url, env, token
    finally:
        stop()


def job_details(url: str, token: str, submission_id: str) -> dict:
    """The Jobs API's record of a submitted job (status, entrypoint, driver_info ...)."""
    import urllib.request

    request = urllib.request.Request(f"{url}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


JOB_CONFIG = textwrap.dedent(
    """
    name: clusterjob
    seed: 0
    data: {{source: digits, train_subset: 256, eval_subset: 120}}
    backbone: {{name: resnet18, small_image_stem: true, stem_stride: 2, image_size: 16}}
    ray: {{num_workers: 2, max_failures: 0, storage_path: {storage}}}
    stages:
      - {{name: simclr, kind: pretext, method: simclr, epochs: 1, batch_size: 64, evaluate: false,
          settings: {{augment: {{gaussian_blur: 0.0}}}}}}
      - {{name: evaluate, kind: evaluate, input: simclr, knn_k: 10, tsne: false, grid_per_cluster: 2}}
    """
)


@pytest.mark.ray
def test_ray_job_submit_runs_a_pipeline_on_the_cluster(ray_head, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.backbones import load_backbone

    url, env, token = ray_head
    # Token auth is on: the dashboard (and so the job API) rejects requests without the token.
    assert dashboard_status(url) == 401

    storage, out = tmp_path / "shared-storage", tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(JOB_CONFIG.format(storage=storage))
    runtime_env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "SSLPIPE_RAY_TRAIN_LOG_LEVEL": "WARNING"}}
    command = [ray_cli(), "job", "submit", "--address", url, "--submission-id", "sslpipe-test-job",
               "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env),
               "--", "sslpipe", "run", str(config), "--output-dir", str(out)]
    for _ in range(6):  # the node's job agent may still be starting after the dashboard answers
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)
        logs = submit.stdout + submit.stderr
        if "No available agent to submit job" not in logs:
            break
        time.sleep(5)
    (tmp_path / "job.log").write_text(logs)
    assert submit.returncode == 0, logs[-5000:]
    assert "succeeded" in logs, logs[-5000:]
    # The job's driver attached to this cluster (RAY_ADDRESS set by the job), not to a new local Ray: the
    # cluster's job record names the driver, which only a driver that connected to this cluster's GCS gives it
    # (a local Ray started by the driver would register it there). Ray's state, not its log wording.
    driver = job_details(url, token, "sslpipe-test-job")["driver_info"]
    assert driver is not None and int(driver["pid"]) > 0, driver
    # ... and its actors know that address too (several Ray instances may run on this machine).
    assert "Found multiple active Ray instances" not in logs, logs[-5000:]

    status = subprocess.run([ray_cli(), "job", "status", "--address", url, "sslpipe-test-job"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()

    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name: r.info.status for r in children} == {"simclr": "FINISHED", "evaluate": "FINISHED"}
    simclr = next(r for r in children if r.info.run_name == "simclr")
    assert client.get_metric_history(simclr.info.run_id, "loss")  # logged by the rank-0 worker on the cluster
    local = client.download_artifacts(simclr.info.run_id, "backbone", str(tmp_path / "downloaded"))
    meta_data = load_backbone(local, with_meta=True)[1]
    assert meta_data["data_fingerprint"] == summary["data_fingerprint"]
    # Checkpoints went to the shared storage_path, not to the output folder.
    assert any(storage.rglob("checkpoint_*")), list(storage.rglob("*"))[:20]
    assert 0.0 <= summary["stages"]["evaluate"]["metrics"]["knn_accuracy"] <= 1.0
    # The final backbone went to the model registry of the run's tracking store.
    assert summary["registry"]["model_uri"] == "models:/clusterjob/1"


def test_job_actors_get_the_cluster_address(monkeypatch):
    """ray_init passes RAY_ADDRESS to the job's actors, except where Ray would reject or misuse it."""
    from pipeline.trainer import _cluster_runtime_env

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _cluster_runtime_env("10.0.0.5:6379") == {"env_vars": {"RAY_ADDRESS": "10.0.0.5:6379"}}
    assert _cluster_runtime_env("ray://head:10001") is None and _cluster_runtime_env("auto") is None
    job = {"runtime_env": {"env_vars": {"RAY_ADDRESS": "10.0.0.5:6379"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert _cluster_runtime_env("10.0.0.5:6379") is None  # the job set it already: merging would conflict
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    assert _cluster_runtime_env("10.0.0.5:6379") == {"env_vars": {"RAY_ADDRESS": "10.0.0.5:6379"}}
