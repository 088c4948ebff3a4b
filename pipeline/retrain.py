"""`sslpipe retrain`: run on the current data, then promote the new backbone only if it beats the champion.

It runs the pipeline, evaluates the new version (the candidate) and the version holding the `champion`
alias on the same evaluation set, and moves the alias only when the candidate is better by at least
`registry.min_improvement`. When the champion (or a candidate already judged) was trained on the same
data with the same config, it does nothing. The promote/keep decision itself is :func:`gate`, a pure function.
With `registry.warm_start`, the stages that would start from a fresh init start from the champion instead
(:func:`warm_start`); the decision records which version they started from.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from pipeline.config import PipelineConfig
from pipeline.registry import (TAG_CONFIG, TAG_DATA, TAG_DECISION, already_judged, config_fingerprint,
                               download_backbone, evaluate_backbone, registry_client, version_by_alias,
                               weights_sha256)
from pipeline.tracking import TrackingError

# How each `registry.metric` is compared: both are higher-is-better.
METRIC_MODES = {"knn_accuracy": "max", "nmi": "max"}
TAG_WARM_START = "sslpipe.retrain.warm_start_version"  # the champion version the candidate started from
TOLERANCE = 1e-12  # a gain equal to min_improvement up to float rounding (0.85 - 0.80 = 0.0499999...) counts


def gate(candidate: float, champion: float | None, min_improvement: float, mode: str = "max") -> dict[str, Any]:
    """Promote or keep: ``{"decision": "promote" | "keep", "reason": str, "gain": float | None}``.

    The candidate is promoted when there is no champion, or when its gain over the champion (``candidate -
    champion`` for ``mode="max"``, ``champion - candidate`` for ``"min"``) is at least `min_improvement`,
    with a tolerance of 1e-12 for float rounding. A gain that is not a number (a NaN metric) keeps the champion.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"gate: mode must be 'max' or 'min', got {mode!r}")
    if champion is None:
        return {"decision": "promote", "reason": "no champion yet", "gain": None}
    gain = candidate - champion if mode == "max" else champion - candidate
    if gain >= min_improvement - TOLERANCE:
        return {"decision": "promote", "reason": f"improved by {gain:+.4f} (needed {min_improvement:+.4f})",
                "gain": gain}
    return {"decision": "keep", "reason": f"changed by {gain:+.4f}, less than {min_improvement:+.4f}", "gain": gain}


def architecture_mismatch(config: PipelineConfig, stages: list[str], meta: dict[str, Any]) -> str | None:
    """Why the artifact with metadata `meta` cannot start `stages` of `config` (another timm model, stem or
    channel count than the configured backbone), or None when it can."""
    from pipeline.methods import method_class

    bb = config.backbone
    want = {"timm_name": bb.name, "small_image_stem": bb.small_image_stem, "timm_kwargs": bb.kwargs}
    have = {"timm_name": meta.get("timm_name"), "small_image_stem": meta.get("small_image_stem"),
            "timm_kwargs": meta.get("timm_kwargs") or {}}
    if bb.small_image_stem:
        want["stem_stride"], have["stem_stride"] = bb.stem_stride, meta.get("stem_stride", 1)
    for key, value in want.items():
        if have[key] != value:
            return f"has {key} {have[key]!r} where the config has {value!r}"
    for name in stages:
        stage = config.stage(name)
        channels = method_class(stage.method).backbone_channels or bb.in_chans
        if meta.get("in_chans") != channels:
            return f"takes {meta.get('in_chans')} channel(s) where stage '{name}' needs {channels}"
    return None


def warm_start(config: PipelineConfig, champion: Any, champion_dir: Path | None
               ) -> tuple[PipelineConfig, dict[str, Any] | None, str | None]:
    """The config a retrain runs, what it warm starts from, and why it does not when `registry.warm_start` is on.

    With a champion whose architecture is the configured backbone's, every stage of
    `config.warm_start_stages()` (pretext and metric stages without input) gets `input:
    models:/<model_name>@<alias>`: an external input, fingerprinted by the artifact's content, so those stages
    are trained again when the champion changes. Returns ``(config, {"from", "version", "stages"} | None,
    reason | None)``; the reason is None when warm start is off or applied.
    """
    from pipeline.backbones import read_backbone_meta

    if not config.registry.warm_start:
        return config, None, None
    names = config.warm_start_stages()
    if not names:
        return config, None, "no pretext or metric stage starts from a fresh init (each has an input)"
    if champion is None:
        return config, None, f"no champion yet (no version holds '{config.registry.alias}'): trained from scratch"
    mismatch = architecture_mismatch(config, names, read_backbone_meta(champion_dir))
    if mismatch:
        return config, None, f"the champion (version {champion.version}) {mismatch}: trained from scratch"
    uri = config.champion_uri()
    stages = [s.model_copy(update={"input": uri}) if s.name in names else s for s in config.stages]
    return (config.model_copy(update={"stages": stages}),
            {"from": uri, "version": str(champion.version), "stages": names}, None)


def retrain(config: PipelineConfig, output_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run, evaluate candidate and champion on the same data, move the alias if the candidate is better.

    Returns the decision (also in summary.json under `retrain` and as tags of the run in MLflow).
    """
    from pipeline.data import DataError
    from pipeline.runner import PipelineRun
    from pipeline.store import write_json_atomic
    from pipeline.tracking import Tracker, default_uri

    if config.registered_stage() is None:
        from pipeline.config import ConfigError

        raise ConfigError("retrain: no stage of the pipeline produces a backbone, so there is nothing to register")
    config = config.model_copy(update={"registry": config.registry.model_copy(update={"enabled": True})})
    reg = config.registry
    name, metric = config.model_name(), reg.metric
    output_dir = Path(output_dir).resolve()
    uri = config.tracking.uri or default_uri(output_dir)

    run = PipelineRun(config, output_dir, log=log)
    run.ctx.load_data()
    evalset = run.ctx.evalset or run.ctx.load_split("eval")
    if run.ctx.train.labels is None or evalset.labels is None:
        raise DataError(f"retrain compares models by {metric}, which needs labels; "
                        f"data source '{config.data.source}' has none here")
    run.ctx.resolve_weights()  # the weights' bytes are part of the config's fingerprint
    data_fp, config_fp = run.ctx.data_fingerprint, config_fingerprint(config, weights_sha256(run.ctx))

    Tracker(uri, config.tracking.experiment, artifact_root=output_dir / "mlartifacts")  # fails early if unusable
    champion = version_by_alias(uri, name, reg.alias)
    same = champion if champion is not None and champion.tags.get(TAG_DATA) == data_fp \
        and champion.tags.get(TAG_CONFIG) == config_fp else already_judged(uri, name, data_fp, config_fp)
    if same is not None:
        role = "the champion" if champion is not None and str(same.version) == str(champion.version) else "a kept candidate"
        log(f"retrain: nothing to do: '{name}' version {same.version} ({role}) was trained on the same data "
            f"({data_fp}) with the same config ({config_fp})")
        return {"decision": "noop", "model_name": name, "version": str(same.version),
                "champion_version": str(champion.version) if champion is not None else None,
                "data_fingerprint": data_fp, "config_fingerprint": config_fp}

    # The champion, downloaded once: what warm start checks and what the candidate is compared with.
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="champion-", dir=output_dir))
    try:
        champion_dir = download_backbone(uri, name, str(champion.version), tmp) if champion is not None else None
        config, warm, not_warm = warm_start(config, champion, champion_dir)
        if warm is not None:
            # Only stage inputs change: the data already loaded stays valid, and the config fingerprint is
            # the same (see config_fingerprint).
            run.config = run.ctx.config = run.cache.config = config
            log(f"retrain: warm start: stage(s) {', '.join(warm['stages'])} start from {warm['from']} "
                f"(version {warm['version']})")
        elif not_warm is not None:
            log(f"retrain: no warm start: {not_warm}")
        summary = run.run()
        registered = summary.get("registry") or {}
        if "version" not in registered:
            raise TrackingError(f"retrain: the run did not register a model version ({registered.get('error', 'unknown reason')})")
        candidate_version = registered["version"]
        candidate_dir = Path(run.results[registered["stage"]].artifacts["backbone"])
        candidate_value = evaluate_backbone(candidate_dir, run.ctx.train, evalset, metric, seed=config.seed)
        log(f"retrain: candidate '{name}' version {candidate_version}: {metric} {candidate_value:.4f}")
        champion_value = None
        if champion is not None:
            champion_value = evaluate_backbone(champion_dir, run.ctx.train, evalset, metric, seed=config.seed)
            log(f"retrain: champion '{name}' version {champion.version}: {metric} {champion_value:.4f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    decision: dict[str, Any] = {
        "model_name": name, "alias": reg.alias, "metric": metric, "min_improvement": reg.min_improvement,
        "candidate": {"version": candidate_version, metric: candidate_value, "data_fingerprint": data_fp,
                      "config_fingerprint": config_fp},
        "champion": None, "warm_start": warm,
    }
    if not_warm is not None:
        decision["warm_start_skipped"] = not_warm
    if champion is not None:
        decision["champion"] = {"version": str(champion.version), metric: champion_value,
                                "data_fingerprint": champion.tags.get(TAG_DATA),
                                "config_fingerprint": champion.tags.get(TAG_CONFIG)}
    verdict = gate(candidate_value, champion_value, reg.min_improvement, METRIC_MODES[metric])
    decision.update(decision=verdict["decision"], gain=verdict["gain"],
                    reason=verdict["reason"] if champion is None else f"{metric} {verdict['reason']}")

    client = registry_client(uri)
    if decision["decision"] == "promote":
        client.set_registered_model_alias(name, reg.alias, candidate_version)
    client.set_model_version_tag(name, candidate_version, TAG_DECISION, decision["decision"])
    client.set_model_version_tag(name, candidate_version, f"sslpipe.eval.{metric}", f"{candidate_value:.6f}")
    if warm is not None:
        client.set_model_version_tag(name, candidate_version, TAG_WARM_START, warm["version"])
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
        "sslpipe.retrain.warm_start_from": warm["from"] if warm else "",
        TAG_WARM_START: warm["version"] if warm else "",
    }
    if not_warm is not None:
        tags["sslpipe.retrain.warm_start_skipped"] = not_warm
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
