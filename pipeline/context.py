"""What every stage executor gets: the config, the data splits, the MLflow tracker, Ray and the output folder.

The driver loads the splits once (the evaluation split only when a stage reads it) and hands them to every
executor; Ray starts the first time a stage needs training, so a fully cached rerun never starts it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import PipelineConfig, StageBase
from pipeline.store import stage_dir


def log(message: str) -> None:
    print(message, flush=True)


def load_split(config: PipelineConfig, which: str, log: Callable[[str], None] = log, *,
               cache_root: Path | None = None, start_ray: Callable[[], None] | None = None,
               decoded: dict[str, Any] | None = None):
    """One split of the configured data source: `train` (data.train_*) or `eval` (data.eval_*).

    Image files (folder, manifest) go to the backend `data.backend` names; `auto` streams a split whose decoded
    pixels (N x 3 x S^2 bytes) exceed `data.memory_limit_gb`. Streaming needs `cache_root` and `start_ray`.
    `decoded` remembers the splits decoded so far by listing: a folder without train/ and test/ is decoded
    once for both splits."""
    from pipeline.data import FILE_SOURCES, load_images, select_listing

    d = config.data
    split, subset, classes = ((d.train_split, d.train_subset, d.train_classes) if which == "train"
                              else (d.eval_split, d.eval_subset, d.eval_classes))
    if d.source not in FILE_SOURCES:
        return load_images(d.source, split, subset=subset, classes=classes, root=d.root, download=d.download,
                           image_size=d.load_size, seed=config.seed, max_image_pixels=d.max_image_pixels, log=log)
    from pipeline import pixel_cache
    from pipeline.image_files import DEFAULT_FOLDER_IMAGE_SIZE, decode_listing, list_folder, read_manifest

    lister = list_folder if d.source == "folder" else read_manifest
    listing = select_listing(lister(d.root, split, d.labels, log), classes, subset, config.seed)
    size = d.load_size or DEFAULT_FOLDER_IMAGE_SIZE
    decoded_gb = len(listing) * 3 * size * size / 2**30
    backend = d.backend
    if backend == "auto":
        backend = "stream" if decoded_gb > d.memory_limit_gb else "memory"
        log(f"data.backend auto: {len(listing)} images at {size}px are {decoded_gb:.2f} GB decoded, "
            f"{'above' if backend == 'stream' else 'within'} memory_limit_gb={d.memory_limit_gb:g}: {backend}")
    if backend == "memory" or cache_root is None or start_ray is None:
        key = f"{listing.digest()}:{size}:{d.max_image_pixels}"
        if decoded is not None and key in decoded:
            log(f"data: {split} lists the same files as an already decoded split: shared, not decoded again")
            return dataclasses.replace(decoded[key], split=split)
        out = decode_listing(listing, source=d.source, split=split, image_size=size,
                             max_image_pixels=d.max_image_pixels, log=log)
        if decoded is not None:
            decoded[key] = out
        return out
    return pixel_cache.load(listing, source=d.source, split=split, size=size, max_pixels=d.max_image_pixels,
                            cache_root=cache_root, start_ray=start_ray, log=log)


@dataclass
class RunContext:
    config: PipelineConfig
    output_dir: Path
    log: Callable[[str], None] = log
    train: Any = None  # pipeline.data.ImageSet
    evalset: Any = None  # ImageSet, or None when no stage reads the evaluation split
    data_fingerprint: str = ""
    eval_fingerprint: str | None = None
    tracker: Any = None  # pipeline.tracking.Tracker, set when the run starts (not for --dry-run)
    tracking_uri: str = ""
    parent_run_id: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _ray_lock: threading.Lock = field(default_factory=threading.Lock)
    ray_started: bool = False
    _train_ref: Any = None
    _decoded: dict[str, Any] = field(default_factory=dict)  # see load_split
    weights: Any = None  # pipeline.weights.ResolvedWeights with backbone.pretrained / backbone.weights

    def resolve_weights(self) -> None:
        """Pretrained weights, found, checked and written once for every worker, before any stage starts."""
        if self.weights is None and (self.config.backbone.pretrained or self.config.backbone.weights):
            from pipeline.weights import resolve_weights

            self.weights = resolve_weights(self.config.backbone, self.output_dir, self.log)

    def load_data(self) -> None:
        """Load the splits once: bad data is reported before anything is created in MLflow."""
        if self.train is not None:
            return
        d = self.config.data
        self.train = self.load_split("train")
        self.log(f"data: {d.source}/{d.train_split}: {len(self.train)} images {self.train.images.shape[1:]}")
        if any(stage.uses_eval_split() for stage in self.config.stages):
            self.evalset = self.load_split("eval")
            self.log(f"data: {d.source}/{d.eval_split}: {len(self.evalset)} images for evaluation")
        self.data_fingerprint = self.train.fingerprint()
        self.eval_fingerprint = self.evalset.fingerprint() if self.evalset is not None else None

    def load_split(self, which: str):
        """One split (see :func:`load_split`); streamed ones are cached under data.cache_dir."""
        cache_root = Path(self.config.data.cache_dir or self.output_dir / "pixel_cache")
        return load_split(self.config, which, self.log, cache_root=cache_root, start_ray=self.ensure_ray,
                          decoded=self._decoded)

    def log_datasets(self, run_id: str, *, evaluation: bool = True) -> None:
        """The splits a run reads as MLflow input datasets (source, split, size; the fingerprint as digest)."""
        d = self.config.data
        for data, digest, context in ((self.train, self.data_fingerprint, "training"),
                                      (self.evalset if evaluation else None, self.eval_fingerprint, "evaluation")):
            if data is None:
                continue
            try:  # a description of the run: a store that refuses it must not fail the run
                self.tracker.log_input_dataset(run_id, name=f"{d.source}/{data.split}", source=d.root or d.source,
                                               split=data.split, size=len(data), digest=digest, context=context)
            except Exception as err:  # noqa: BLE001
                self.log(f"warning: MLflow did not take the {context} dataset: {type(err).__name__}: {err}")

    def log_run_data(self, run_id: str) -> None:
        """The parent run's data: input datasets, image and skipped-file counts, the skipped files and why."""
        self.log_datasets(run_id)
        splits = [s for s in (self.train, self.evalset) if s is not None]
        skipped = [item for s in splits for item in s.skipped]
        self.tracker.log_metrics(run_id, {"data_train_images": len(self.train), "data_skipped_files": len(skipped)})
        if skipped:
            self.tracker.log_text(run_id, "".join(f"{p}\t{reason}\n" for p, reason in skipped), "skipped_files.tsv")

    def stage_dir(self, name: str) -> Path:
        return stage_dir(self.output_dir, name)

    @property
    def storage_path(self) -> str:
        """Ray Train's checkpoints: ray.storage_path, else <output_dir>/ray."""
        return self.config.ray.storage_path or str(self.output_dir / "ray")

    def ensure_ray(self) -> None:
        """Start (or attach to) Ray the first time a stage needs training; keep our SIGTERM handler."""
        with self._ray_lock:
            if self.ray_started:
                return
            from pipeline.console import logs_line, quiet_ray_console
            from pipeline.trainer import ray_init

            main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGTERM) if main else None
            address = self.config.ray.address or os.environ.get("RAY_ADDRESS")
            # A cluster may have preemptible nodes: keep Train's preemption watcher there (its line is filtered)
            quiet_ray_console(self.logs_dir, preemption_watcher=bool(address))
            ray_init(self.config.ray.address, local_metrics=self.config.ray.local_metrics)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)  # ray.init installs one that exits without cleanup
            self.ray_started = True
            self.log(logs_line(self.logs_dir))

    @property
    def logs_dir(self) -> Path:
        """Ray's own logs for this run (the console shows only our progress lines)."""
        return self.output_dir / "logs"

    def save_ray_logs(self) -> None:
        """Copy this job's Ray logs into the run folder (call while Ray is up, also after a failure)."""
        if self.ray_started:
            from pipeline.console import save_ray_logs

            try:
                save_ray_logs(self.logs_dir)
            except Exception as err:  # noqa: BLE001 - the run's results do not depend on a copy of logs
                self.log(f"warning: Ray's logs were not copied to {self.logs_dir}: {err}")

    def cluster_fits(self, stages: list[StageBase]) -> bool:
        """True when Ray has free resources for every one of `stages` at once."""
        import ray

        ray_cfg = self.config.ray
        per_worker = dict(ray_cfg.resources_per_worker or {"CPU": 1})
        if ray_cfg.use_gpu:
            per_worker.setdefault("GPU", 1)
        need = {k: v * ray_cfg.num_workers * len(stages) for k, v in per_worker.items()}
        free = ray.available_resources()
        return all(free.get(k, 0.0) >= v for k, v in need.items())

    def put_images(self, images: np.ndarray | None = None):
        """What a Train worker reads its pixels from: an object-store reference to in-memory `images` (or the
        training split, put once and shared), or the stream backend's ShardedImages itself."""
        import ray

        self.ensure_ray()
        if images is not None:
            return images if not isinstance(images, np.ndarray) else ray.put(images)
        if not isinstance(self.train.images, np.ndarray):
            return self.train.images  # the pixel cache: workers map its shards themselves
        with self.lock:
            if self._train_ref is None:
                self._train_ref = ray.put(self.train.images)
            return self._train_ref
