"""Runs a pipeline: stages in order, each in its own nested MLflow run, results in summary.json.

The driver loads the data once and puts it in Ray's object store; training stages run under Ray Train
(`pipeline.trainer`), the evaluate stage embeds and clusters on the driver (or a GPU task). After every
stage the summary is rewritten atomically, so a crash never loses a finished stage's results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import EvaluateStage, FinetuneStage, MetricStage, PipelineConfig, PretextStage, dump_config, flatten


def log(message: str) -> None:
    print(message, flush=True)


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""


def channel_stats(images: np.ndarray, in_chans: int, max_images: int = 20000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the training images as the backbone will see them (saved in the artifact)."""
    sample = images[:max_images].astype(np.float32) / 255.0
    if sample.shape[1] == 1 and in_chans == 3:
        sample = np.repeat(sample, 3, axis=1)
    elif sample.shape[1] == 3 and in_chans == 1:
        sample = (sample * np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)).sum(1, keepdims=True)
    mean = sample.mean(axis=(0, 2, 3))
    std = np.maximum(sample.std(axis=(0, 2, 3)), 1e-3)
    return [float(m) for m in mean], [float(s) for s in std]


class PipelineRun:
    def __init__(self, config: PipelineConfig, output_dir: Path, log: Callable[[str], None] = log) -> None:
        self.config = config
        self.output_dir = output_dir.resolve()
        self.log = log
        self.summary: dict[str, Any] = {"pipeline": config.name, "stages": {}}
        self.evalset = None
        self.results: dict[str, StageResult] = {}

    # -- setup ----------------------------------------------------------------------------------
    def _load_data(self) -> None:
        from pipeline.data import load_images

        d, cfg = self.config.data, self.config
        common = dict(root=d.root, download=d.download, image_size=d.load_size, seed=cfg.seed,
                      max_image_pixels=d.max_image_pixels, log=self.log)
        self.train = load_images(d.source, d.train_split, subset=d.train_subset, classes=d.train_classes, **common)
        self.log(f"data: {d.source}/{d.train_split}: {len(self.train)} images {self.train.images.shape[1:]}")
        self.evalset = None
        if any(s.kind in ("evaluate", "finetune") or getattr(s, "evaluate", False) or getattr(s, "retrieval", False)
               for s in cfg.stages):
            self.evalset = load_images(d.source, d.eval_split, subset=d.eval_subset, classes=d.eval_classes, **common)
            self.log(f"data: {d.source}/{d.eval_split}: {len(self.evalset)} images for evaluation")
        self.data_fingerprint = self.train.fingerprint()

    def load_data(self) -> None:
        """Load the splits once: retrain needs the data fingerprint before it decides to run."""
        if not hasattr(self, "data_fingerprint"):
            self._load_data()

    def _stage_dir(self, name: str) -> Path:
        path = self.output_dir / "stages" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- stages ---------------------------------------------------------------------------------
    def _run_pretext(self, stage: PretextStage, inp: str | None, run_id: str, fp: str, *,
                     images: np.ndarray | None = None, labels: np.ndarray | None = None) -> StageResult:
        """Train a stage under Ray Train: on the training split, or on `images` (+ `labels` for labeled methods)."""
        import ray

        from pipeline.trainer import TrainJob, fit_stage

        cfg = self.config
        if self.train.channels == 1 and self._method_requires_color(stage.method):
            from pipeline.data import DataError

            raise DataError(f"stage '{stage.name}': method '{stage.method}' needs colour images; "
                            f"data source '{cfg.data.source}' is grayscale")
        init_artifact = self.results[inp].artifacts["backbone"] if inp else None
        mean, std = channel_stats(self.train.images, cfg.backbone.in_chans)
        if images is None:
            if not hasattr(self, "_data_ref"):
                self._data_ref = ray.put(self.train.images)
            data_ref = self._data_ref
        else:
            data_ref = ray.put(images)
        job = TrainJob(
            stage=stage.model_dump(mode="json"),
            backbone=cfg.backbone.model_dump(mode="json"),
            seed=cfg.seed,
            data=[data_ref],
            labels=None if labels is None else [ray.put(np.asarray(labels, dtype=np.int64))],
            mean=mean,
            std=std,
            init_artifact=init_artifact,
            tracking_uri=self.tracking_uri,
            run_id=run_id,
            provenance={
                "pipeline": cfg.name,
                "source_stage": stage.name,
                "method": stage.method,
                "stage_fingerprint": fp,
                "data_fingerprint": self.data_fingerprint,
                "data_source": cfg.data.source,
                "stage_config": stage.model_dump(mode="json"),
            },
        )
        stage_dir = self._stage_dir(stage.name)
        storage = cfg.ray.storage_path or str(self.output_dir / "ray")
        fit = fit_stage(job, ray_cfg=cfg.ray.model_dump(mode="json"), storage_path=storage,
                        run_name=f"{cfg.name}-{stage.name}-{fp[:8]}", workdir=stage_dir)
        backbone_dir = stage_dir / "backbone"
        if backbone_dir.exists():
            shutil.rmtree(backbone_dir)
        shutil.copytree(fit.checkpoint_dir / "backbone", backbone_dir)
        metrics = {k: v for k, v in fit.metrics.items() if isinstance(v, (int, float))}
        report_metrics, report_artifacts = self._heldout_report(job, fit.checkpoint_dir, stage_dir)
        shutil.rmtree(fit.checkpoint_dir, ignore_errors=True)
        metrics.update(report_metrics)
        if stage.evaluate and self.evalset is not None and self.evalset.labels is not None:
            from pipeline.evaluate import quick_evaluate

            quick = quick_evaluate(backbone_dir, self.train, self.evalset, seed=cfg.seed)
            self.log(f"[{stage.name}] kNN accuracy {quick['knn_accuracy']:.4f}  k-means NMI {quick['nmi']:.4f}")
            metrics.update(quick)
        artifacts = {"backbone": str(backbone_dir), **report_artifacts, "checkpoints": fit.storage}
        return StageResult(metrics=metrics, artifacts=artifacts)

    def _run_finetune(self, stage: FinetuneStage, inp: str | None, run_id: str, fp: str) -> StageResult:
        """Train on a stratified labeled share of the training split, then test accuracy on the eval split."""
        from downstream.finetune import stratified_fraction
        from pipeline.classifier import classifier_accuracy, write_classifier
        from pipeline.data import DataError

        for split, data in (("training", self.train), ("evaluation", self.evalset)):
            if data is None or data.labels is None:
                raise DataError(f"stage '{stage.name}': fine-tuning needs labels, but the {split} split of "
                                f"data source '{self.config.data.source}' has none")
        class_ids, targets = np.unique(self.train.labels, return_inverse=True)
        if len(class_ids) < 2:
            raise DataError(f"stage '{stage.name}': fine-tuning needs at least 2 classes in the training labels")
        keep = stratified_fraction(targets, stage.label_fraction, seed=self.config.seed)
        self.log(f"[{stage.name}] {stage.mode} fine-tuning on {len(keep)} labeled images "
                 f"({stage.label_fraction:g} of {len(targets)}, {len(class_ids)} classes)")
        job_stage = stage.model_copy(update={"settings": stage.method_settings(len(class_ids), class_ids.tolist())})
        result = self._run_pretext(job_stage, None if inp == "random" else inp, run_id, fp,
                                   images=self.train.images[keep], labels=targets[keep])
        classifier = write_classifier(result.artifacts["backbone"], result.artifacts["classifier"])
        test = classifier_accuracy(classifier, self.evalset.images, self.evalset.labels)
        self.log(f"[{stage.name}] test accuracy {test['accuracy']:.4f}"
                 + (f"  top-5 {test['top5_accuracy']:.4f}" if "top5_accuracy" in test else ""))
        result.metrics.update(test, labeled_images=float(len(keep)))
        return result

    def _heldout_report(self, job, checkpoint_dir: Path, stage_dir: Path, max_images: int = 256):
        """Rebuild the trained method on the driver and let it report on held-out images."""
        import torch
        from safetensors.torch import load_file

        from downstream.embeddings import match_channels
        from pipeline.trainer import STATE_FILE, batch_channels, build_stage_method

        images = self.evalset if self.evalset is not None else self.train
        method, _ = build_stage_method(job, torch.device("cpu"))
        method.load_state_dict(load_file(str(checkpoint_dir / STATE_FILE)), strict=True)
        method.eval()
        x = torch.from_numpy(images.images[:max_images]).float().div_(255.0)
        x = match_channels(x, batch_channels(method, job.backbone))
        metrics, artifacts = method.heldout_report(x, stage_dir)
        for key, value in metrics.items():
            self.log(f"[{job.stage['name']}] held-out {key}: {value:.4f}")
        return {f"heldout_{k}": float(v) for k, v in metrics.items()}, artifacts

    def _run_metric(self, stage: MetricStage, inp: str | None, run_id: str, fp: str) -> StageResult:
        """Train on the training split's labels, then retrieval of the evaluation split with the exported embedder."""
        from pipeline.data import DataError

        if self.train.labels is None:
            raise DataError(f"stage '{stage.name}': metric learning needs labels; data source "
                            f"'{self.config.data.source}' has none")
        result = self._run_pretext(stage, inp, run_id, fp, labels=self.train.labels)
        if stage.retrieval and self.evalset is not None and self.evalset.labels is not None:
            from downstream.retrieval import retrieval_metrics
            from pipeline.evaluate import backbone_features

            features = backbone_features(Path(result.artifacts["backbone"]), self.evalset.images, batch_size=512)
            metrics = retrieval_metrics(features, self.evalset.labels)
            self.log(f"[{stage.name}] retrieval on {self.config.data.eval_split}: "
                     + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            result.metrics.update(metrics)
        return result

    @staticmethod
    def _method_requires_color(method: str) -> bool:
        from pipeline.methods import method_class

        return bool(getattr(method_class(method), "requires_color", False))

    def _run_evaluate(self, stage: EvaluateStage, inp: str) -> StageResult:
        from pipeline.evaluate import evaluate

        artifact = None if inp == "pixels" else Path(self.results[inp].artifacts["backbone"])
        metrics, artifacts = evaluate(
            stage.model_dump(mode="json"), artifact=artifact, train=self.train, evalset=self.evalset,
            out_dir=self._stage_dir(stage.name), seed=self.config.seed, log=self.log,
        )
        return StageResult(metrics=metrics, artifacts=artifacts)

    # -- graph ----------------------------------------------------------------------------------
    def resolve_input(self, stage) -> str | None:
        """`best` -> the pretext stage with the best selection metric so far; other inputs as written."""
        inp = getattr(stage, "input", None)
        if inp != "best":
            return inp
        from pipeline.config import ConfigError

        sel = self.config.selection
        scored = [(r.metrics[sel.metric], name) for name, r in self.results.items()
                  if self.config.stage(name).kind in ("pretext", "refine") and sel.metric in r.metrics]
        if not scored:
            raise ConfigError(
                f"stage '{stage.name}': input 'best' needs evaluated pretext stages, but none has "
                f"'{sel.metric}' (it needs labelled evaluation data and evaluate: true)"
            )
        value, name = (max if sel.mode == "max" else min)(scored)
        self.summary["best"] = {"stage": name, "metric": sel.metric, "value": value}
        self.log(f"best backbone so far by {sel.metric}: {name} ({value:.4f})")
        return name

    def waves(self) -> list[list]:
        """Consecutive pretext stages that do not feed each other form a wave that may run concurrently."""
        waves: list[list] = []
        for stage in self.config.stages:
            current = waves[-1] if waves else None
            independent = (
                current is not None
                and stage.kind == "pretext"
                and all(s.kind == "pretext" for s in current)
                and stage.input not in {s.name for s in current} | {"best"}
            )
            if independent:
                current.append(stage)
            else:
                waves.append([stage])
        return waves

    def _cluster_fits(self, wave: list) -> bool:
        """True when Ray has free resources for every stage of the wave at once."""
        import ray

        ray_cfg = self.config.ray
        per_worker = dict(ray_cfg.resources_per_worker or {"CPU": 1})
        if ray_cfg.use_gpu:
            per_worker.setdefault("GPU", 1)
        need = {k: v * ray_cfg.num_workers * len(wave) for k, v in per_worker.items()}
        free = ray.available_resources()
        return all(free.get(k, 0.0) >= v for k, v in need.items())

    # -- main -----------------------------------------------------------------------------------
    def _execute(self, stage, index: int) -> None:
        cfg, tracker = self.config, self.tracker
        inp = self.resolve_input(stage)
        upstream = self.results[inp].fingerprint if inp and inp in self.results else inp
        fp = fingerprint(stage.model_dump(mode="json"), cfg.backbone.model_dump(mode="json"),
                         cfg.seed, self.data_fingerprint, upstream)
        self.log(f"== stage {index}/{len(cfg.stages)}: {stage.name} ({stage.kind}"
                 f"{' ' + stage.method if stage.kind in ('pretext', 'metric') else ''}"
                 f"{', input ' + inp if inp else ''}) ==")
        run_id = tracker.start_run(stage.name, parent_id=self.parent_id,
                                   tags={"sslpipe.stage": stage.name, "sslpipe.kind": stage.kind,
                                         "sslpipe.fingerprint": fp, "sslpipe.input": str(inp)})
        tracker.log_params(run_id, flatten(stage.model_dump(mode="json")))
        started = time.time()
        try:
            if stage.kind == "finetune":
                result = self._run_finetune(stage, inp, run_id, fp)
            elif stage.kind in ("pretext", "refine"):
                result = self._run_pretext(stage, inp, run_id, fp)
            elif stage.kind == "metric":
                result = self._run_metric(stage, inp, run_id, fp)
            else:
                result = self._run_evaluate(stage, inp)
        except BaseException:
            tracker.end_run(run_id, "FAILED")
            raise
        result.fingerprint = fp
        result.metrics["stage_time_s"] = time.time() - started
        if stage.kind != "evaluate":  # per-epoch metrics were logged by the rank-0 worker
            tracker.log_metrics(run_id, {k: v for k, v in result.metrics.items()
                                         if k in ("stage_time_s", "knn_accuracy", "nmi", "ari", "cluster_accuracy",
                                                  "accuracy", "top5_accuracy", "labeled_images")
                                         or k.startswith("recall_at_") or k == "map_at_r"})
        else:
            tracker.log_metrics(run_id, result.metrics)
        for key, path in result.artifacts.items():
            if key != "checkpoints":
                tracker.log_artifact(run_id, path, artifact_path=key if Path(path).is_dir() else None)
        tracker.end_run(run_id, "FINISHED")
        with self._lock:
            self.results[stage.name] = result
            self.summary["stages"][stage.name] = {
                "kind": stage.kind,
                "input": inp,
                "fingerprint": fp,
                "run_id": run_id,
                "metrics": result.metrics,
                "artifacts": result.artifacts,
            }
            write_json_atomic(self.output_dir / "summary.json", self.summary)

    def _register_backbone(self) -> None:
        """Final backbone -> a new version in the MLflow model registry (see pipeline.registry)."""
        if not self.config.registry.enabled:
            return
        from pipeline.registry import register_run_backbone
        from pipeline.tracking import TrackingError

        try:
            registered = register_run_backbone(self)
        except TrackingError as err:  # the run's results stand; `sslpipe retrain` treats this as fatal
            self.log(f"warning: {err}")
            registered = {"error": str(err)}
        if registered:
            self.summary["registry"] = registered
            write_json_atomic(self.output_dir / "summary.json", self.summary)

    def run(self) -> dict[str, Any]:
        import threading

        from pipeline.tracking import Tracker, default_uri
        from pipeline.trainer import ray_init

        cfg, out = self.config, self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        resolved = out / "config.resolved.yaml"
        resolved.write_text(dump_config(cfg))
        self.load_data()  # bad data is reported before anything is created in MLflow
        for stage in cfg.stages:
            if stage.kind != "evaluate" and self.train.channels == 1 and self._method_requires_color(stage.method):
                from pipeline.data import DataError

                raise DataError(f"stages[{stage.name}]: method '{stage.method}' needs colour images; "
                                f"data source '{cfg.data.source}' is grayscale")
        self.tracking_uri = cfg.tracking.uri or default_uri(out)
        tracker = self.tracker = Tracker(self.tracking_uri, cfg.tracking.experiment, artifact_root=out / "mlartifacts")

        parent = self.parent_id = tracker.start_run(cfg.tracking.run_name or cfg.name, tags={"sslpipe.pipeline": cfg.name})
        self.summary.update(tracking_uri=self.tracking_uri, parent_run_id=parent,
                            data_fingerprint=self.data_fingerprint, output_dir=str(out))
        tracker.log_params(parent, flatten({k: v for k, v in cfg.model_dump(mode="json").items() if k != "stages"}))
        tracker.log_artifact(parent, resolved)
        tracker.set_tags(parent, {"sslpipe.data_fingerprint": self.data_fingerprint})
        skipped = len(self.train.skipped) + (len(self.evalset.skipped) if self.evalset is not None else 0)
        tracker.log_metrics(parent, {"data_train_images": len(self.train), "data_skipped_files": skipped})
        if skipped:
            lines = [f"{p}\t{reason}" for p, reason in self.train.skipped + (self.evalset.skipped if self.evalset else [])]
            tracker.log_text(parent, "\n".join(lines) + "\n", "skipped_files.tsv")

        if any(s.kind != "evaluate" for s in cfg.stages):
            ray_init(cfg.ray.address)

        status = "FAILED"
        try:
            index = 0
            for wave in self.waves():
                numbered = [(stage, index + i + 1) for i, stage in enumerate(wave)]
                index += len(wave)
                if len(wave) > 1 and self._cluster_fits(wave):
                    from concurrent.futures import ThreadPoolExecutor

                    self.log(f"running {len(wave)} independent pretext stages concurrently: "
                             f"{', '.join(s.name for s in wave)}")
                    with ThreadPoolExecutor(max_workers=len(wave)) as pool:
                        for future in [pool.submit(self._execute, stage, i) for stage, i in numbered]:
                            future.result()
                else:
                    for stage, i in numbered:
                        self._execute(stage, i)
            self._register_backbone()
            status = "FINISHED"
        finally:
            if "best" in self.summary:
                tracker.set_tags(parent, {"sslpipe.best_stage": self.summary["best"]["stage"]})
            tracker.end_run(parent, status if sys.exc_info()[0] is None else "FAILED")
            write_json_atomic(out / "summary.json", self.summary)
        tracker.log_artifact(parent, out / "summary.json")
        return self.summary


TABLE_METRICS = ("loss", "images_per_sec", "accuracy", "top5_accuracy", "knn_accuracy", "recall_at_1", "map_at_r", "nmi", "ari", "cluster_accuracy",
                 "heldout_pretext_accuracy", "heldout_ab_error", "stage_time_s")


def results_table(summary: dict[str, Any]) -> str:
    """A plain-text table: one row per stage, the headline metrics as columns."""
    stages = summary.get("stages", {})
    cols = [m for m in TABLE_METRICS if any(m in s["metrics"] for s in stages.values())]
    header = ["stage", "kind"] + cols
    rows = []
    for name, s in stages.items():
        row = [name, s.get("kind", "")]
        for m in cols:
            v = s["metrics"].get(m)
            row.append("-" if v is None else (f"{v:.0f}" if m in ("images_per_sec", "stage_time_s") else f"{v:.4f}"))
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)
