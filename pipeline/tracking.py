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

# MLflow 3's UI opens an experiment by its kind: on the runs table for classic model training, on the GenAI
# overview (traces, evaluations) otherwise. Values from the UI's ExperimentKind enum (mlflow/server/js).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

DATASET_CONTEXT_TAG = "mlflow.data.context"  # what mlflow.log_input(..., context=) writes
DATASET_SPLIT_TAG = "sslpipe.data.split"
MAX_DATASET_DIGEST = 36  # MLflow's limit (a String(36) column)
GIT_TIMEOUT_S = 10.0


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
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            else:
                self.experiment_id = exp.experiment_id
                if EXPERIMENT_KIND_TAG not in (exp.tags or {}):  # made by an older sslpipe or by hand
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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

    def log_input_dataset(self, run_id: str, *, name: str, source: str, split: str, size: int, digest: str,
                          context: str, source_type: str | None = None) -> None:
        """Log a stage's data as an MLflow input dataset (the run page's "Datasets used" and the runs table).

        `source`: where the images come from ("fashion-mnist", a folder, a URL); `split`: train / test / ...;
        `size`: the number of images; `digest`: the data's fingerprint; `context`: the role of the data in the
        run ("training", "evaluation"), written as MLflow's `mlflow.data.context` input tag. The source type
        is "http" for http(s) URLs and "local" otherwise unless `source_type` says.
        """
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        source = str(source)
        if source_type is None:
            source_type = "http" if source.startswith(("http://", "https://")) else "local"
        source_json = json.dumps({"url": source} if source_type == "http" else {"uri": source})
        digest = str(digest)
        profile = {"num_images": int(size), "split": split}
        if len(digest) > MAX_DATASET_DIGEST:  # a prefix of a hash still identifies it; the profile keeps it all
            profile["fingerprint"] = digest
            digest = digest[:MAX_DATASET_DIGEST]
        dataset = Dataset(name=name, digest=digest, source_type=source_type, source=source_json,
                          profile=json.dumps(profile))
        tags = [InputTag(key=DATASET_CONTEXT_TAG, value=context), InputTag(key=DATASET_SPLIT_TAG, value=split)]
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])


def _git(repo_dir: Path, *args: str) -> str | None:
    """Output of one git command in `repo_dir`, or None when it fails (no git binary, not a checkout, ...)."""
    import subprocess

    try:
        proc = subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _without_credentials(url: str) -> str:
    """https://user:token@host/repo -> https://host/repo (the tag is shown to everyone); scp-style stays."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, parts.fragment))


def source_tags(repo_dir: str | os.PathLike) -> dict[str, str]:
    """MLflow's source tags for code run from a git checkout; {} outside one or without git (never raises).

    `mlflow.source.type` is "LOCAL", as MLflow itself sets for a script (PROJECT is for `mlflow run`);
    `mlflow.source.name` is the remote's URL, else the checkout's folder; `mlflow.source.git.dirty`
    ("true"/"false", tracked files only) is MLflow's own tag for uncommitted changes.
    """
    try:
        repo_dir = Path(repo_dir)
        commit = _git(repo_dir, "rev-parse", "--verify", "HEAD")
        if not commit:
            return {}
        top = _git(repo_dir, "rev-parse", "--show-toplevel") or str(repo_dir.resolve())
        tags = {"mlflow.source.git.commit": commit, "mlflow.source.type": "LOCAL"}
        remotes = (_git(repo_dir, "remote") or "").split()
        remote = "origin" if "origin" in remotes else (remotes[0] if remotes else None)
        url = _git(repo_dir, "remote", "get-url", remote) if remote else None
        if url:
            tags["mlflow.source.git.repoURL"] = _without_credentials(url)
        tags["mlflow.source.name"] = tags.get("mlflow.source.git.repoURL", top)
        branch = _git(repo_dir, "rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":  # "HEAD" when detached
            tags["mlflow.source.git.branch"] = branch
        status = _git(repo_dir, "status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags["mlflow.source.git.dirty"] = "true" if status else "false"
        return tags
    except Exception:  # noqa: BLE001 - provenance is a nice-to-have; a run never fails for it
        return {}


Tracker.source_tags = staticmethod(source_tags)  # also reachable as tracker.source_tags(repo_dir)
