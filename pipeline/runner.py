"""Runs a pipeline: stages in order, each in its own nested MLflow run, results in summary.json.

The driver loads the data once and puts it in Ray's object store; training stages run under Ray Train
(`pipeline.trainer`), the evaluate stage embeds and clusters on the driver (or a GPU task). After every
stage the summary is rewritten atomically, so a crash never loses a finished stage's results.

Reruns are cheap: every finished stage leaves a record (`stages/<name>/stage.json`) with its fingerprint
(stage config, backbone config, seed, data fingerprints, upstream fingerprint). A rerun into the same
output directory reuses a stage whose record matches, whose artifacts are on disk and whose MLflow run
is FINISHED; an unfinished training stage resumes from its Ray Train checkpoint. Ray starts only when
something needs training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import EvaluateStage, FinetuneStage, MetricStage, PipelineConfig, PretextStage, dump_config, flatten


def log(message: str) -> None:
    print(message, flush=True)


# Stage keys that change how a stage runs, not what it computes: left out of the cache fingerprint, so
# turning them on reuses finished stages (and adding them did not invalidate earlier caches).
EXECUTION_ONLY_KEYS = ("compile",)


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


RECORD_FILE = "stage.json"  # a finished stage's record inside its stage directory: the cache index


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside the target, fsync, rename: readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str))


def replace_dir_atomic(source: Path, target: Path) -> None:
    """Copy `source` to a temp folder beside `target`, then swap it in: `target` is never half-written."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def latest_checkpoint_epoch(storage_path: str, run_name: str) -> int | None:
    """Epochs done in the newest checkpoint Ray Train recorded for `run_name` (local storage only)."""
    if "://" in storage_path:
        return None
    snapshot = Path(storage_path) / run_name / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        return int(latest["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class StagePlan:
    """What a run would do with one stage; `--dry-run` prints these."""

    name: str
    kind: str
    input: str | None
    fingerprint: str | None
    action: str  # run | reuse | resume
    detail: str = ""

    def describe(self) -> str:
        return self.action + (f" ({self.detail})" if self.detail else "")


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    reused: bool = False


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
    """One invocation of a pipeline. `force` ignores every cached stage, `rerun` the named ones."""

    def __init__(self, config: PipelineConfig, output_dir: Path, log: Callable[[str], None] = log, *,
                 force: bool = False, rerun: tuple[str, ...] | list[str] = ()) -> None:
        self.config = config
        self.output_dir = output_dir.resolve()
        self.log = log
        self.summary: dict[str, Any] = {"pipeline": config.name, "stages": {}}
        self.evalset = None
        self.eval_fingerprint: str | None = None
        self.results: dict[str, StageResult] = {}
        self.fingerprints: dict[str, str | None] = {}
        self.force = force
        self.rerun = set(rerun)
        unknown = sorted(self.rerun - {s.name for s in config.stages})
        if unknown:
            from pipeline.config import ConfigError

            raise ConfigError(f"--rerun {unknown[0]}: no such stage (stages: {', '.join(s.name for s in config.stages)})")
        self._lock = threading.Lock()
        self._ray_lock = threading.Lock()
        self._ray_started = False
        self._interrupted = False
        self._active_runs: dict[str, str] = {}  # MLflow run id -> stage name, for stages in flight

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
        self.eval_fingerprint = self.evalset.fingerprint() if self.evalset is not None else None

    def load_data(self) -> None:
        """Load the splits once: retrain needs the data fingerprint before it decides to run."""
        if not hasattr(self, "data_fingerprint"):
            self._load_data()

    def _stage_dir(self, name: str) -> Path:
        path = self.output_dir / "stages" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- stages ---------------------------------------------------------------------------------
    def _storage_path(self) -> str:
        return self.config.ray.storage_path or str(self.output_dir / "ray")

    def _ray_run_name(self, stage, fp: str) -> str:
        return f"{self.config.name}-{stage.name}-{fp[:8]}"

    def _ensure_ray(self) -> None:
        """Start (or attach to) Ray the first time a stage needs training; keep our SIGTERM handler."""
        with self._ray_lock:
            if self._ray_started:
                return
            from pipeline.trainer import ray_init

            main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGTERM) if main else None
            ray_init(self.config.ray.address, local_metrics=self.config.ray.local_metrics)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)  # ray.init installs one that exits without cleanup
            self._ray_started = True

    def _run_pretext(self, stage: PretextStage, inp: str | None, run_id: str, fp: str, *, fresh: bool = False,
                     images: np.ndarray | None = None, labels: np.ndarray | None = None) -> StageResult:
        """Train a stage under Ray Train: on the training split, or on `images` (+ `labels` for labeled methods).

        `fresh`: forced, or its input was retrained, so old checkpoints of this fingerprint must not be resumed."""
        import ray

        from pipeline.trainer import TrainJob, fit_stage

        cfg = self.config
        if self.train.channels == 1 and self._method_requires_color(stage.method):
            from pipeline.data import DataError

            raise DataError(f"stage '{stage.name}': method '{stage.method}' needs colour images; "
                            f"data source '{cfg.data.source}' is grayscale")
        init_artifact = self.results[inp].artifacts["backbone"] if inp else None
        mean, std = channel_stats(self.train.images, cfg.backbone.in_chans)
        self._ensure_ray()
        if images is None:
            with self._lock:
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
        storage, run_name = self._storage_path(), self._ray_run_name(stage, fp)
        if fresh:  # forced, or its input was retrained: old checkpoints of this fingerprint must not be resumed
            if "://" in storage:
                run_name += f"-{int(time.time())}"
            else:
                shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
        fit = fit_stage(job, ray_cfg=cfg.ray.model_dump(mode="json"), storage_path=storage,
                        run_name=run_name, workdir=stage_dir)
        backbone_dir = stage_dir / "backbone"
        replace_dir_atomic(fit.checkpoint_dir / "backbone", backbone_dir)
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

    def _run_finetune(self, stage: FinetuneStage, inp: str | None, run_id: str, fp: str, *,
                      fresh: bool = False) -> StageResult:
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
        result = self._run_pretext(job_stage, None if inp == "random" else inp, run_id, fp, fresh=fresh,
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

    def _run_metric(self, stage: MetricStage, inp: str | None, run_id: str, fp: str, *,
                    fresh: bool = False) -> StageResult:
        """Train on the training split's labels, then retrieval of the evaluation split with the exported embedder."""
        from pipeline.data import DataError

        if self.train.labels is None:
            raise DataError(f"stage '{stage.name}': metric learning needs labels; data source "
                            f"'{self.config.data.source}' has none")
        result = self._run_pretext(stage, inp, run_id, fp, fresh=fresh, labels=self.train.labels)
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

    # -- cache ----------------------------------------------------------------------------------
    def _uses_evalset(self, stage) -> bool:
        return self.evalset is not None and (stage.kind in ("evaluate", "finetune") or bool(getattr(stage, "evaluate", False))
                                             or bool(getattr(stage, "retrieval", False)))

    def _stage_fingerprint(self, stage, inp: str | None) -> str | None:
        """Stage config, backbone config, seed, data and upstream fingerprints; None when upstream is unknown."""
        upstream = self.fingerprints.get(inp, inp) if inp else None
        if inp in self.fingerprints and upstream is None:
            return None
        parts: list[Any] = [stage.model_dump(mode="json", exclude=set(EXECUTION_ONLY_KEYS)),
                            self.config.backbone.model_dump(mode="json"),
                            self.config.seed, self.data_fingerprint, upstream]
        if self._uses_evalset(stage):
            parts.append(self.eval_fingerprint)
        return fingerprint(*parts)

    def _record_path(self, name: str) -> Path:
        return self.output_dir / "stages" / name / RECORD_FILE

    def _read_record(self, name: str) -> dict | None:
        try:
            record = json.loads(self._record_path(name).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _input_reran(self, inp: str | None) -> bool:
        """True when the input stage was (or will be) trained again in this run rather than reused."""
        return inp is not None and inp in self.fingerprints and not getattr(self.results.get(inp), "reused", False)

    def _forced(self, stage) -> bool:
        return self.force or stage.name in self.rerun

    def _decide(self, stage, inp: str | None) -> tuple[StagePlan, dict | None]:
        """reuse (record matches, artifacts on disk, MLflow run FINISHED), resume (Ray checkpoint) or run."""
        fp = self._stage_fingerprint(stage, inp)
        plan = StagePlan(stage.name, stage.kind, inp, fp, "run")
        if fp is None:
            plan.detail = f"input {inp} is decided after training"
            return plan, None
        if self._forced(stage):
            plan.detail = "forced"
            return plan, None
        record = self._read_record(stage.name)
        if record is not None and self._input_reran(inp):
            plan.detail = f"input {inp} runs again"
            return plan, None
        if record is not None and record.get("fingerprint") != fp:
            plan.detail = "config or upstream changed"
        elif record is not None:
            missing = [p for k, p in record.get("artifacts", {}).items() if k != "checkpoints" and not Path(p).exists()]
            status = None if missing else self._run_status(record.get("run_id", ""))
            if missing:
                plan.detail = f"artifact missing: {missing[0]}"
            elif status != "FINISHED":
                plan.detail = f"MLflow run {record.get('run_id')} is {status or 'not found'}"
            else:
                plan.action, plan.detail = "reuse", f"run {record['run_id']}"
                return plan, record
        if stage.kind != "evaluate":
            epoch = latest_checkpoint_epoch(self._storage_path(), self._ray_run_name(stage, fp))
            if epoch:
                plan.action, plan.detail = "resume", f"checkpoint after epoch {epoch}"
        return plan, None

    def _run_status(self, run_id: str) -> str | None:
        return self._status_reader(run_id) if run_id else None

    def _reuse(self, stage, index: int, plan: StagePlan, record: dict) -> None:
        result = StageResult(metrics=dict(record.get("metrics", {})), artifacts=dict(record.get("artifacts", {})),
                             fingerprint=plan.fingerprint or "", reused=True)
        self.log(f"== stage {index}/{len(self.config.stages)}: {stage.name} ({stage.kind}"
                 f"{', input ' + plan.input if plan.input else ''}): reused, fingerprint {plan.fingerprint} "
                 f"matches MLflow run {record['run_id']} ==")
        self.tracker.set_tags(self.parent_id, {f"sslpipe.reused.{stage.name}": record["run_id"]})
        with self._lock:
            self.results[stage.name] = result
            self.fingerprints[stage.name] = plan.fingerprint
            self.summary["stages"][stage.name] = {**record, "input": plan.input, "reused": True}
            write_json_atomic(self.output_dir / "summary.json", self.summary)

    def plan(self) -> list[StagePlan]:
        """What `run()` would do, without Ray and without writing to MLflow (`sslpipe run --dry-run`)."""
        from pipeline.tracking import check_reachable, default_uri, read_run_status

        cfg = self.config
        self.tracking_uri = cfg.tracking.uri or default_uri(self.output_dir)
        check_reachable(self.tracking_uri)
        self._status_reader = lambda run_id: read_run_status(self.tracking_uri, run_id)
        self._load_data()
        self._check_colour()
        plans: list[StagePlan] = []
        for stage in cfg.stages:
            inp = getattr(stage, "input", None)
            if inp == "best" and any(s.kind in ("pretext", "refine") and not getattr(self.results.get(s.name), "reused", False)
                                     for s in cfg.stages[: cfg.stages.index(stage)]):
                plan, record = StagePlan(stage.name, stage.kind, inp, None, "run", "input best is decided after training"), None
            else:
                plan, record = self._decide(stage, self.resolve_input(stage))
            if record is not None:
                self.results[stage.name] = StageResult(metrics=dict(record.get("metrics", {})), reused=True,
                                                       artifacts=dict(record.get("artifacts", {})))
            self.fingerprints[stage.name] = plan.fingerprint
            plans.append(plan)
        return plans

    # -- main -----------------------------------------------------------------------------------
    def _execute(self, stage, index: int) -> None:
        cfg, tracker = self.config, self.tracker
        inp = self.resolve_input(stage)
        plan, record = self._decide(stage, inp)
        if record is not None:
            self._reuse(stage, index, plan, record)
            return
        fp = plan.fingerprint
        fresh = self._forced(stage) or self._input_reran(inp)
        self._record_path(stage.name).unlink(missing_ok=True)  # the old record no longer describes the artifacts
        with self._lock:
            self.fingerprints[stage.name] = fp
        self.log(f"== stage {index}/{len(cfg.stages)}: {stage.name} ({stage.kind}"
                 f"{' ' + stage.method if stage.kind != 'evaluate' else ''}"
                 f"{', input ' + inp if inp else ''}): {plan.describe()} ==")
        run_id = tracker.start_run(stage.name, parent_id=self.parent_id,
                                   tags={"sslpipe.stage": stage.name, "sslpipe.kind": stage.kind,
                                         "sslpipe.fingerprint": fp, "sslpipe.input": str(inp),
                                         "sslpipe.action": plan.describe()})
        with self._lock:
            self._active_runs[run_id] = stage.name
        started = time.time()
        try:
            tracker.log_params(run_id, flatten(stage.model_dump(mode="json")))
            if stage.kind == "finetune":
                result = self._run_finetune(stage, inp, run_id, fp, fresh=fresh)
            elif stage.kind in ("pretext", "refine"):
                result = self._run_pretext(stage, inp, run_id, fp, fresh=fresh)
            elif stage.kind == "metric":
                result = self._run_metric(stage, inp, run_id, fp, fresh=fresh)
            else:
                result = self._run_evaluate(stage, inp)
        except BaseException as err:
            interrupted = isinstance(err, KeyboardInterrupt) or self._interrupted
            with self._lock:
                self._active_runs.pop(run_id, None)
            tracker.end_run(run_id, "KILLED" if interrupted else "FAILED")
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
        record = {"kind": stage.kind, "input": inp, "fingerprint": fp, "run_id": run_id,
                  "metrics": result.metrics, "artifacts": result.artifacts}
        with self._lock:
            self._active_runs.pop(run_id, None)
            self.results[stage.name] = result
            write_json_atomic(self._stage_dir(stage.name) / RECORD_FILE, record)
            self.summary["stages"][stage.name] = {**record, "reused": False}
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

    def _check_colour(self) -> None:
        for stage in self.config.stages:
            if stage.kind != "evaluate" and self.train.channels == 1 and self._method_requires_color(stage.method):
                from pipeline.data import DataError

                raise DataError(f"stages[{stage.name}]: method '{stage.method}' needs colour images; "
                                f"data source '{self.config.data.source}' is grayscale")

    def _run_wave(self, wave: list, numbered: list) -> None:
        """Reuse what is cached; train the rest concurrently when Ray has room for all of them."""
        to_train = []
        for stage, i in numbered:
            if len(wave) > 1 and self._decide(stage, self.resolve_input(stage))[1] is None:
                to_train.append((stage, i))
            else:
                self._execute(stage, i)  # cached stages return at once; single stages run here
        if not to_train:
            return
        self._ensure_ray()
        if len(to_train) == 1 or not self._cluster_fits([s for s, _ in to_train]):
            for stage, i in to_train:
                self._execute(stage, i)
            return
        from concurrent.futures import ThreadPoolExecutor

        self.log(f"running {len(to_train)} independent pretext stages concurrently: "
                 f"{', '.join(s.name for s, _ in to_train)}")
        pool = ThreadPoolExecutor(max_workers=len(to_train), thread_name_prefix="sslpipe-stage")
        futures = [pool.submit(self._execute, stage, i) for stage, i in to_train]
        try:
            for future in futures:
                future.result()
        except BaseException:
            self._interrupted = True
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def run(self) -> dict[str, Any]:
        from pipeline.tracking import Tracker, check_reachable, default_uri

        cfg, out = self.config, self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = cfg.tracking.uri or default_uri(out)
        check_reachable(self.tracking_uri)  # an unreachable server fails in seconds, before data or training
        resolved = out / "config.resolved.yaml"
        write_text_atomic(resolved, dump_config(cfg))
        self.load_data()  # bad data is reported before anything is created in MLflow
        self._check_colour()
        tracker = self.tracker = Tracker(self.tracking_uri, cfg.tracking.experiment, artifact_root=out / "mlartifacts")
        self._status_reader = tracker.run_status

        parent = self.parent_id = tracker.start_run(cfg.tracking.run_name or cfg.name, tags={"sslpipe.pipeline": cfg.name})
        self.summary.update(tracking_uri=self.tracking_uri, parent_run_id=parent,
                            data_fingerprint=self.data_fingerprint, output_dir=str(out))
        tracker.log_params(parent, flatten({k: v for k, v in cfg.model_dump(mode="json").items() if k != "stages"}))
        tracker.log_artifact(parent, resolved)
        tracker.set_tags(parent, {"sslpipe.data_fingerprint": self.data_fingerprint})
        if self.force or self.rerun:
            tracker.set_tags(parent, {"sslpipe.rerun": "all" if self.force else ",".join(sorted(self.rerun))})
        skipped = len(self.train.skipped) + (len(self.evalset.skipped) if self.evalset is not None else 0)
        tracker.log_metrics(parent, {"data_train_images": len(self.train), "data_skipped_files": skipped})
        if skipped:
            lines = [f"{p}\t{reason}" for p, reason in self.train.skipped + (self.evalset.skipped if self.evalset else [])]
            tracker.log_text(parent, "\n".join(lines) + "\n", "skipped_files.tsv")

        try:
            index = 0
            for wave in self.waves():
                numbered = [(stage, index + i + 1) for i, stage in enumerate(wave)]
                index += len(wave)
                self._run_wave(wave, numbered)
            self._register_backbone()
            reused = [name for name, r in self.results.items() if r.reused]
            if reused:
                self.log(f"reused {len(reused)}/{len(cfg.stages)} stage(s): {', '.join(reused)}"
                         f"{'' if self._ray_started else '; nothing to train, Ray not started'}")
        finally:
            error = sys.exc_info()[0]
            interrupted = error is not None and issubclass(error, KeyboardInterrupt)
            if interrupted:
                self._interrupted = True
            with self._lock:
                in_flight = dict(self._active_runs)
            for run_id in in_flight:  # stages still running in pool threads
                tracker.end_run(run_id, "KILLED" if self._interrupted else "FAILED")
            if "best" in self.summary:
                tracker.set_tags(parent, {"sslpipe.best_stage": self.summary["best"]["stage"]})
            self.summary["reused_stages"] = [name for name, r in self.results.items() if r.reused]
            self.summary["status"] = "FINISHED" if error is None else ("KILLED" if interrupted else "FAILED")
            with self._lock:
                write_json_atomic(out / "summary.json", self.summary)
            tracker.end_run(parent, self.summary["status"])
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
