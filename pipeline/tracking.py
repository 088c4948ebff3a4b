"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Everything goes through `MlflowClient` with explicit run ids (no global active run), so the driver, the
rank-0 worker and concurrent stages can log to the right run without stepping on each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_VALUE = 6000


class TrackingError(Exception):
    """MLflow cannot be reached or used; raised before any training starts."""


REACHABLE_TIMEOUT_S = 5.0


def check_reachable(uri: str, timeout: float = REACHABLE_TIMEOUT_S) -> None:
    """Fail in seconds when an HTTP tracking server is down, not after MLflow's minutes of retries.

    Any HTTP answer counts as reachable (not every server has /health); only a refused or timed-out
    connection raises TrackingError, which the CLI reports with exit code 2 before any training.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server ...) "
            f"or point tracking.uri elsewhere"
        ) from None


def read_run_status(uri: str, run_id: str) -> str | None:
    """Status of an existing run without creating anything: None when the store or the run is missing."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    from mlflow.tracking import MlflowClient

    try:
        return _status(MlflowClient(tracking_uri=uri).get_run(run_id))
    except Exception:  # noqa: BLE001 - a run we cannot read cannot be reused
        return None


def _status(run) -> str:
    return "DELETED" if run.info.lifecycle_stage == "deleted" else run.info.status


def default_uri(output_dir: Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://", "databricks")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = None
                if artifact_root is not None and not uri.startswith(("http://", "https://")):
                    location = Path(artifact_root).resolve().as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = exp.experiment_id
        except Exception as err:  # noqa: BLE001 - any backend failure means we must not start
            raise TrackingError(f"MLflow tracking at {uri} is not usable: {type(err).__name__}: {err}") from None

    def run_status(self, run_id: str) -> str | None:
        """FINISHED / FAILED / KILLED / RUNNING, or None when the run does not exist here."""
        try:
            return _status(self.client.get_run(run_id))
        except Exception:  # noqa: BLE001 - deleted, or from another tracking store
            return None

    def start_run(self, name: str, *, parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        all_tags = dict(tags or {})
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k)[:250], str(v)[:MAX_PARAM_VALUE]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(str(k), float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path=artifact_path or path.name)
        elif path.exists():
            self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
