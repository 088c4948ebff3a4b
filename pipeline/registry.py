"""MLflow model registry: register each run's final backbone, and retrain with a champion/candidate decision.

Every pipeline run logs its final backbone as an MLflow pyfunc model from code (`registry_model.py`
loads the safetensors artifact; nothing is pickled) and registers it as a new version of the model
named by `registry.model_name` (default: the pipeline name). Versions carry the data and config
fingerprints as tags.

`retrain` runs the pipeline on the current data, evaluates the new version (the candidate) and the
version holding the `champion` alias on the same evaluation set, and moves the alias only when the
candidate is better by at least `registry.min_improvement`. When the champion (or a candidate already
judged) was trained on the same data with the same config, it does nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from pipeline.config import PipelineConfig
from pipeline.tracking import TrackingError

MODEL_CODE = Path(__file__).with_name("registry_model.py")
PACKAGE_DIRS = ("pipeline", "pretext", "downstream")  # shipped with the model so it loads without sslpipe installed
PIP_REQUIREMENTS = ("torch", "timm", "safetensors", "numpy", "pydantic", "pyyaml", "lightly")
LOGGED_MODEL_NAME = "backbone_model"

TAG_DATA = "sslpipe.data_fingerprint"
TAG_CONFIG = "sslpipe.config_fingerprint"
TAG_DECISION = "sslpipe.retrain.decision"
NOT_TRAINING_KEYS = ("output_dir", "tracking", "ray", "registry")  # where and how, not what is trained


def config_fingerprint(config: PipelineConfig) -> str:
    """What is trained (data selection, backbone, stages, seed), not where it runs or is tracked."""
    from pipeline.runner import fingerprint

    data = config.model_dump(mode="json")
    return fingerprint({k: v for k, v in data.items() if k not in NOT_TRAINING_KEYS})


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def version_by_alias(uri: str, model_name: str, alias: str):
    """The model version holding `alias`, or None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(uri).get_model_version_by_alias(model_name, alias)
    except MlflowException as err:
        if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or \
                "not found" in str(err).lower() or "does not exist" in str(err).lower():
            return None
        raise TrackingError(f"model registry at {uri}: cannot read alias '{alias}' of '{model_name}': {err}") from None


def register_backbone(uri: str, run_id: str, backbone_dir: str | Path, model_name: str,
                      tags: dict[str, str]) -> str:
    """Log the backbone folder as a pyfunc model (from code) on `run_id` and register it; returns the version."""
    import mlflow

    root = Path(__file__).resolve().parents[1]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=LOGGED_MODEL_NAME,
                python_model=str(MODEL_CODE),
                artifacts={"backbone": str(backbone_dir)},
                code_paths=[str(root / d) for d in PACKAGE_DIRS if (root / d).is_dir()],
                pip_requirements=list(PIP_REQUIREMENTS),  # explicit: skips MLflow's slow requirement inference
                registered_model_name=model_name,
                tags=tags,
            )
    except Exception as err:  # noqa: BLE001 - any registry failure is reported with the model name
        raise TrackingError(f"could not register '{model_name}' in the model registry at {uri}: "
                            f"{type(err).__name__}: {err}") from None
    version = str(info.registered_model_version)
    client = _client(uri)
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    return version


def register_run_backbone(run) -> dict[str, Any] | None:
    """The end-of-run hook: register the final backbone of a finished `PipelineRun`."""
    cfg: PipelineConfig = run.config
    stage = cfg.registered_stage()
    if stage is None or stage not in run.results:
        return None
    name = cfg.model_name()
    tags = {
        "sslpipe.pipeline": cfg.name,
        "sslpipe.stage": stage,
        "sslpipe.stage_fingerprint": run.results[stage].fingerprint,
        "sslpipe.parent_run_id": run.parent_id,
        TAG_DATA: run.data_fingerprint,
        TAG_CONFIG: config_fingerprint(cfg),
    }
    version = register_backbone(run.tracking_uri, run.summary["stages"][stage]["run_id"],
                                run.results[stage].artifacts["backbone"], name, tags)
    run.log(f"registered the backbone of stage '{stage}' as model '{name}' version {version}")
    return {"model_name": name, "version": version, "stage": stage, "model_uri": f"models:/{name}/{version}",
            "data_fingerprint": run.data_fingerprint, "config_fingerprint": tags[TAG_CONFIG]}


def download_backbone(uri: str, model_name: str, version: str, dst: Path) -> Path:
    """The backbone folder inside a registered model version (downloaded to `dst`)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=str(dst))
    found = sorted(p.parent for p in (Path(local) / "artifacts").rglob("backbone.json"))
    if not found:
        raise TrackingError(f"model '{model_name}' version {version} holds no backbone artifact")
    return found[0]


def evaluate_backbone(artifact: Path, train, evalset, metric: str, seed: int = 0) -> float:
    """kNN accuracy or k-means NMI of one backbone on the evaluation set (same code for both contenders)."""
    from pipeline.evaluate import quick_evaluate

    return float(quick_evaluate(Path(artifact), train, evalset, seed=seed)[metric])


def _already_judged(uri: str, model_name: str, data_fp: str, config_fp: str):
    """A version that was retrained on these exact data and config and then kept (not promoted)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = _client(uri).search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return None
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if v.tags.get(TAG_DECISION) and v.tags.get(TAG_DATA) == data_fp and v.tags.get(TAG_CONFIG) == config_fp:
            return v
    return None


def retrain(config: PipelineConfig, output_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run, evaluate candidate and champion on the same data, move the alias if the candidate is better.

    Returns the decision (also in summary.json under `retrain` and as tags of the run in MLflow).
    """
    from pipeline.data import DataError, load_images
    from pipeline.runner import PipelineRun, write_json_atomic
    from pipeline.tracking import Tracker, default_uri

    if config.registered_stage() is None:
        from pipeline.config import ConfigError

        raise ConfigError("retrain: the pipeline has no pretext or refine stage, so there is no backbone to register")
    config = config.model_copy(update={"registry": config.registry.model_copy(update={"enabled": True})})
    reg = config.registry
    name, metric = config.model_name(), reg.metric
    output_dir = Path(output_dir).resolve()
    uri = config.tracking.uri or default_uri(output_dir)

    run = PipelineRun(config, output_dir, log=log)
    run.load_data()
    d = config.data
    evalset = run.evalset or load_images(d.source, d.eval_split, root=d.root, download=d.download,
                                         image_size=d.load_size, seed=config.seed, subset=d.eval_subset,
                                         classes=d.eval_classes, max_image_pixels=d.max_image_pixels, log=log)
    if run.train.labels is None or evalset.labels is None:
        raise DataError(f"retrain compares models by {metric}, which needs labels; "
                        f"data source '{d.source}' has none here")
    data_fp, config_fp = run.data_fingerprint, config_fingerprint(config)

    Tracker(uri, config.tracking.experiment, artifact_root=output_dir / "mlartifacts")  # fails early if unusable
    champion = version_by_alias(uri, name, reg.alias)
    same = champion if champion is not None and champion.tags.get(TAG_DATA) == data_fp \
        and champion.tags.get(TAG_CONFIG) == config_fp else _already_judged(uri, name, data_fp, config_fp)
    if same is not None:
        role = "the champion" if champion is not None and str(same.version) == str(champion.version) else "a kept candidate"
        log(f"retrain: nothing to do: '{name}' version {same.version} ({role}) was trained on the same data "
            f"({data_fp}) with the same config ({config_fp})")
        return {"decision": "noop", "model_name": name, "version": str(same.version),
                "champion_version": str(champion.version) if champion is not None else None,
                "data_fingerprint": data_fp, "config_fingerprint": config_fp}

    summary = run.run()
    registered = summary.get("registry") or {}
    if "version" not in registered:
        raise TrackingError(f"retrain: the run did not register a model version ({registered.get('error', 'unknown reason')})")
    candidate_version = registered["version"]
    candidate_dir = Path(run.results[registered["stage"]].artifacts["backbone"])
    candidate_value = evaluate_backbone(candidate_dir, run.train, evalset, metric, seed=config.seed)
    log(f"retrain: candidate '{name}' version {candidate_version}: {metric} {candidate_value:.4f}")

    decision: dict[str, Any] = {
        "model_name": name, "alias": reg.alias, "metric": metric, "min_improvement": reg.min_improvement,
        "candidate": {"version": candidate_version, metric: candidate_value, "data_fingerprint": data_fp,
                      "config_fingerprint": config_fp},
        "champion": None,
    }
    if champion is None:
        decision.update(decision="promote", reason="no champion yet")
    else:
        tmp = Path(tempfile.mkdtemp(prefix="champion-", dir=output_dir))
        try:
            champion_dir = download_backbone(uri, name, str(champion.version), tmp)
            champion_value = evaluate_backbone(champion_dir, run.train, evalset, metric, seed=config.seed)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"retrain: champion '{name}' version {champion.version}: {metric} {champion_value:.4f}")
        decision["champion"] = {"version": str(champion.version), metric: champion_value,
                                "data_fingerprint": champion.tags.get(TAG_DATA),
                                "config_fingerprint": champion.tags.get(TAG_CONFIG)}
        gain = candidate_value - champion_value
        if gain >= reg.min_improvement - 1e-12:
            decision.update(decision="promote", reason=f"{metric} improved by {gain:+.4f} (needed {reg.min_improvement:+.4f})")
        else:
            decision.update(decision="keep", reason=f"{metric} changed by {gain:+.4f}, less than {reg.min_improvement:+.4f}")

    client = _client(uri)
    if decision["decision"] == "promote":
        client.set_registered_model_alias(name, reg.alias, candidate_version)
    client.set_model_version_tag(name, candidate_version, TAG_DECISION, decision["decision"])
    client.set_model_version_tag(name, candidate_version, f"sslpipe.eval.{metric}", f"{candidate_value:.6f}")
    decision["champion_after"] = candidate_version if decision["decision"] == "promote" else str(champion.version)
    log(f"retrain: {decision['decision']} ({decision['reason']}); '{reg.alias}' is version {decision['champion_after']}")

    parent = summary["parent_run_id"]
    champion_info = decision["champion"] or {}
    tags = {
        TAG_DECISION: decision["decision"],
        "sslpipe.retrain.reason": decision["reason"],
        "sslpipe.retrain.metric": metric,
        "sslpipe.retrain.candidate_version": candidate_version,
        "sslpipe.retrain.champion_version": champion_info.get("version", ""),
        "sslpipe.retrain.champion_after": decision["champion_after"],
        "sslpipe.retrain.candidate_data_fingerprint": data_fp,
        "sslpipe.retrain.champion_data_fingerprint": champion_info.get("data_fingerprint", ""),
    }
    for key, value in tags.items():
        client.set_tag(parent, key, str(value))
    metrics = {f"retrain_candidate_{metric}": candidate_value}
    if champion_info:
        metrics[f"retrain_champion_{metric}"] = champion_info[metric]
    for key, value in metrics.items():
        client.log_metric(parent, key, value)

    summary["retrain"] = decision
    write_json_atomic(output_dir / "summary.json", summary)
    client.log_artifact(parent, str(output_dir / "summary.json"))
    return decision
