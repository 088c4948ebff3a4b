"""MLflow model registry: register each run's final backbone; read versions and aliases back.

Every pipeline run logs its final backbone as an MLflow pyfunc model from code (`registry_model.py`
loads the safetensors artifact; nothing is pickled) and registers it as a new version of the model
named by `registry.model_name` (default: the pipeline name). Versions carry the data and config
fingerprints as tags, which `pipeline.retrain` reads to decide whether anything changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, result_settings
from pipeline.store import fingerprint
from pipeline.tracking import TrackingError

MODEL_CODE = Path(__file__).with_name("registry_model.py")
PACKAGE_DIRS = ("pipeline", "pretext", "downstream")  # shipped with the model so it loads without sslpipe installed
PIP_REQUIREMENTS = ("torch", "timm", "safetensors", "numpy", "pydantic", "pyyaml", "lightly")
LOGGED_MODEL_NAME = "backbone_model"

TAG_DATA = "sslpipe.data_fingerprint"
TAG_CONFIG = "sslpipe.config_fingerprint"
TAG_DECISION = "sslpipe.retrain.decision"
NOT_TRAINING_KEYS = ("output_dir", "tracking", "ray", "registry")  # where and how, not what is trained


def config_fingerprint(config: PipelineConfig, weights_digest: str | None = None) -> str:
    """What is trained (data selection, backbone, stages, seed, and the Ray settings that change results:
    `num_workers`, `use_gpu`), not where it runs or is tracked; the same rule as the stage cache.

    `weights_digest`: the sha256 of the file the backbone's weights came from (`RunContext.weights`), which then
    stands for `backbone.weights`: new bytes at the same path are another config, the same bytes under another
    path are not. With `registry.warm_start`, a warm-starting stage's input written as the champion's URI is the
    same as an omitted one (retrain writes it in): warm-started retrains of one config share its fingerprint."""
    data = config.model_dump(mode="json")
    if weights_digest is not None:
        data["backbone"]["weights"] = None
        data["weights_sha256"] = weights_digest
    if config.registry.warm_start:
        for stage, dumped in zip(config.stages, data["stages"]):
            if stage.warm_starts and dumped.get("input") == config.champion_uri():
                dumped["input"] = None
    trained = {k: v for k, v in data.items() if k not in NOT_TRAINING_KEYS}
    return fingerprint({**trained, "ray": result_settings(config.ray)})


def weights_sha256(ctx) -> str | None:
    """The sha256 of the file a run's backbone weights came from, or None for a random init."""
    return ctx.weights.source_sha256 if ctx.weights is not None else None


def registry_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def version_by_alias(uri: str, model_name: str, alias: str):
    """The model version holding `alias`, or None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return registry_client(uri).get_model_version_by_alias(model_name, alias)
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
    client = registry_client(uri)
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    return version


def register_stage_backbone(ctx, stage: str, result, run_id: str) -> dict[str, Any]:
    """The end-of-run hook: register the backbone a stage produced (`result`, logged on MLflow run `run_id`)."""
    cfg: PipelineConfig = ctx.config
    name = cfg.model_name()
    tags = {
        "sslpipe.pipeline": cfg.name,
        "sslpipe.stage": stage,
        "sslpipe.stage_fingerprint": result.fingerprint,
        "sslpipe.parent_run_id": ctx.parent_run_id,
        TAG_DATA: ctx.data_fingerprint,
        TAG_CONFIG: config_fingerprint(cfg, weights_sha256(ctx)),
    }
    version = register_backbone(ctx.tracking_uri, run_id, result.artifacts["backbone"], name, tags)
    ctx.log(f"registered the backbone of stage '{stage}' as model '{name}' version {version}")
    return {"model_name": name, "version": version, "stage": stage, "model_uri": f"models:/{name}/{version}",
            "data_fingerprint": ctx.data_fingerprint, "config_fingerprint": tags[TAG_CONFIG]}


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


def already_judged(uri: str, model_name: str, data_fp: str, config_fp: str):
    """A version that was retrained on these exact data and config and then kept (not promoted)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = registry_client(uri).search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return None
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if v.tags.get(TAG_DECISION) and v.tags.get(TAG_DATA) == data_fp and v.tags.get(TAG_CONFIG) == config_fp:
            return v
    return None


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/<name>@<alias>` -> (name, alias, None); `models:/<name>/<version>` -> (name, None, version).
    Anything else is a BackboneError."""
    from pipeline.backbones import BackboneError

    rest = uri.removeprefix("models:/")
    if rest == uri or not rest:
        raise BackboneError(f"not a model registry URI: {uri!r} (expected models:/<name>@<alias> or "
                            "models:/<name>/<version>)")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in name and "/" not in alias:
            return name, alias, None
    else:
        name, _, version = rest.partition("/")
        if name and version.isdigit():
            return name, None, version
    raise BackboneError(f"malformed model registry URI {uri!r}: expected models:/<name>@<alias> or "
                        "models:/<name>/<version> (a version number)")


def resolve_model_uri(model_uri: str, tracking_uri: str, dst: Path) -> Path:
    """The backbone artifact folder (model.safetensors + backbone.json) of the registered model version that
    `model_uri` (`models:/<name>@<alias>` or `models:/<name>/<version>`) names, downloaded under `dst`.

    The one place that turns a registry URI into an artifact folder; a missing store, model, alias or version
    is a BackboneError (CLI exit 2) that says which."""
    from mlflow.exceptions import MlflowException

    from pipeline.backbones import BackboneError
    from pipeline.tracking import check_reachable

    name, alias, version = parse_model_uri(model_uri)
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise BackboneError(f"{model_uri}: no MLflow store at {tracking_uri} (the database file does not exist)")
    check_reachable(tracking_uri)
    client = registry_client(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise BackboneError(f"{model_uri}: no registered model '{name}' in the registry at {tracking_uri}") from None
    if alias is not None:
        held = version_by_alias(tracking_uri, name, alias)
        if held is None:
            raise BackboneError(f"{model_uri}: model '{name}' has no alias '{alias}' in the registry at "
                                f"{tracking_uri}")
        version = str(held.version)
    else:
        try:
            client.get_model_version(name, version)
        except MlflowException:
            raise BackboneError(f"{model_uri}: model '{name}' has no version {version} in the registry at "
                                f"{tracking_uri}") from None
    try:
        return download_backbone(tracking_uri, name, version, Path(dst))
    except TrackingError as err:
        raise BackboneError(f"{model_uri}: {err}") from None
