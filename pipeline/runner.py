"""The conductor: runs a pipeline's stages in order, each in its own nested MLflow run, results in summary.json.

It plans (graph: order and waves; cache: run / reuse / resume), hands each stage to the executor of its kind
(`pipeline.stages`), records what the stage returned (stage record, MLflow run, summary) and registers the
final backbone. After every stage the summary is rewritten atomically, so a crash never loses a finished
stage's results; rerunning the same command continues where it stopped.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from pipeline import graph
from pipeline.cache import Cache, StagePlan
from pipeline.config import ConfigError, PipelineConfig, StageBase, dump_config, flatten
from pipeline.context import RunContext, log
from pipeline.inputs import resolve_external_inputs
from pipeline.stages import StageResult, StageRun, executor_for
from pipeline.store import drop_record, write_json_atomic, write_record, write_text_atomic

STAGE_THREAD_PREFIX = "sslpipe-stage"  # threads of concurrently running stages (the CLI looks for them)


class PipelineRun:
    """One invocation of a pipeline. `force` ignores every cached stage, `rerun` the named ones."""

    def __init__(self, config: PipelineConfig, output_dir: Path, log: Callable[[str], None] = log, *,
                 force: bool = False, rerun: tuple[str, ...] | list[str] = ()) -> None:
        unknown = sorted(set(rerun) - {s.name for s in config.stages})
        if unknown:
            raise ConfigError(f"--rerun {unknown[0]}: no such stage (stages: {', '.join(s.name for s in config.stages)})")
        self.config, self.log = config, log
        self.ctx = RunContext(config, Path(output_dir).resolve(), log)
        self.output_dir = self.ctx.output_dir
        self.cache = Cache(self.ctx, force=force, rerun=set(rerun))
        self.results: dict[str, StageResult] = {}
        self.summary: dict[str, Any] = {"pipeline": config.name, "stages": {}}
        self._active_runs: dict[str, str] = {}  # MLflow run id -> stage name, for stages in flight
        self._interrupted = False

    def _prepare(self) -> None:
        """Everything that can fail on bad input, before anything is created in MLflow."""
        from pipeline.tracking import check_reachable, default_uri, read_run_status

        uri = self.ctx.tracking_uri = self.config.tracking.uri or default_uri(self.output_dir)
        check_reachable(uri)  # an unreachable server fails in seconds, before data or training
        self.cache.run_status = lambda run_id: read_run_status(uri, run_id)
        self.ctx.resolve_weights()  # offline hub weights or a file that does not fit: exit 2 in seconds
        self.ctx.load_data()
        for inp, (folder, fp) in resolve_external_inputs(self.ctx, self.config.stages).items():
            self.results[inp] = StageResult(metrics={}, artifacts={"backbone": str(folder)}, fingerprint=fp, reused=True)
            self.cache.note(inp, fp, reused=True)  # stands in the run like a reused stage
        for stage in self.config.stages:
            executor_for(stage).check(self.ctx, stage)

    def resolve_input(self, stage: StageBase) -> str | None:
        """`best` -> the candidate stage with the best selection metric so far; other inputs as written."""
        inp = getattr(stage, "input", None)
        if inp != "best":
            return inp
        best = graph.best_stage(self.config, stage, {name: r.metrics for name, r in self.results.items()})
        self.summary["best"] = best
        self.log(f"best backbone so far by {best['metric']}: {best['stage']} ({best['value']:.4f})")
        return best["stage"]

    def plan(self) -> list[StagePlan]:
        """What `run()` would do, without Ray and without writing to MLflow (`sslpipe run --dry-run`)."""
        self._prepare()
        plans = []
        for stage in self.config.stages:
            if graph.best_pending(self.config, stage, self.cache.reused):
                plan, record = StagePlan(stage.name, stage.kind, "best", None, "run", "input best is decided after training"), None
            else:
                plan, record = self.cache.decide(stage, self.resolve_input(stage))
            if record is not None:
                self.results[stage.name] = _result_from_record(record, plan)
            self.cache.note(stage.name, plan.fingerprint, reused=record is not None)
            plans.append(plan)
        return plans

    def run(self) -> dict[str, Any]:
        from pipeline.tracking import Tracker, source_tags

        cfg, out, ctx = self.config, self.output_dir, self.ctx
        out.mkdir(parents=True, exist_ok=True)
        self._prepare()
        resolved = out / "config.resolved.yaml"
        write_text_atomic(resolved, dump_config(cfg))
        tracker = ctx.tracker = Tracker(ctx.tracking_uri, cfg.tracking.experiment, artifact_root=out / "mlartifacts")
        self.cache.run_status = tracker.run_status
        parent = ctx.parent_run_id = tracker.start_run(cfg.tracking.run_name or cfg.name, tags={
            "sslpipe.pipeline": cfg.name, **source_tags(Path(__file__).resolve().parents[1])})
        self.summary.update(tracking_uri=ctx.tracking_uri, parent_run_id=parent,
                            data_fingerprint=ctx.data_fingerprint, output_dir=str(out))
        tracker.log_params(parent, flatten({k: v for k, v in cfg.model_dump(mode="json").items() if k != "stages"}))
        tracker.log_artifact(parent, resolved)
        tracker.set_tags(parent, {"sslpipe.data_fingerprint": ctx.data_fingerprint})
        if self.cache.force or self.cache.rerun:
            tracker.set_tags(parent, {"sslpipe.rerun": "all" if self.cache.force else ",".join(sorted(self.cache.rerun))})
        ctx.log_run_data(parent)
        try:
            index = 0
            for wave in graph.waves(cfg.stages):
                self._run_wave([(stage, index + i + 1) for i, stage in enumerate(wave)])
                index += len(wave)
            self._register_backbone()
            reused = self._reused()
            if reused:
                self.log(f"reused {len(reused)}/{len(cfg.stages)} stage(s): {', '.join(reused)}"
                         f"{'' if ctx.ray_started else '; nothing to train, Ray not started'}")
        finally:
            self._finish(sys.exc_info()[0])
        tracker.log_artifact(parent, out / "summary.json")
        return self.summary

    def _finish(self, error: type[BaseException] | None) -> None:
        """End the runs still in flight, keep Ray's logs and write the final summary, whatever happened."""
        tracker = self.ctx.tracker
        interrupted = error is not None and issubclass(error, KeyboardInterrupt)
        self._interrupted = self._interrupted or interrupted
        with self.ctx.lock:  # stage threads may still record results after an interrupt
            in_flight = dict(self._active_runs)
            self.summary["reused_stages"] = self._reused()
            self.summary["status"] = "FINISHED" if error is None else ("KILLED" if interrupted else "FAILED")
            write_json_atomic(self.output_dir / "summary.json", self.summary)
        for run_id in in_flight:  # stages still running in pool threads
            tracker.end_run(run_id, "KILLED" if self._interrupted else "FAILED")
        if "best" in self.summary:
            tracker.set_tags(self.ctx.parent_run_id, {"sslpipe.best_stage": self.summary["best"]["stage"]})
        tracker.end_run(self.ctx.parent_run_id, self.summary["status"])
        self.ctx.save_ray_logs()  # last: nothing above waits for a copy of Ray's logs

    def _reused(self) -> list[str]:
        return [s.name for s in self.config.stages if s.name in self.results and self.results[s.name].reused]

    def _run_wave(self, numbered: list[tuple[StageBase, int]]) -> None:
        """Reuse what is cached; train the rest concurrently when Ray has room for all of them."""
        to_train = []
        for stage, i in numbered:
            if len(numbered) > 1 and self.cache.decide(stage, self.resolve_input(stage))[1] is None:
                to_train.append((stage, i))
            else:
                self._execute(stage, i)  # cached stages return at once; single stages run here
        if not to_train:
            return
        self.ctx.ensure_ray()
        if len(to_train) == 1 or not self.ctx.cluster_fits([s for s, _ in to_train]):
            for stage, i in to_train:
                self._execute(stage, i)
            return
        self.log(f"running {len(to_train)} independent pretext stages concurrently: "
                 f"{', '.join(s.name for s, _ in to_train)}")
        pool = ThreadPoolExecutor(max_workers=len(to_train), thread_name_prefix=STAGE_THREAD_PREFIX)
        futures = [pool.submit(self._execute, stage, i) for stage, i in to_train]
        try:
            for future in futures:
                future.result()
        except BaseException:
            self._interrupted = True
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def _execute(self, stage: StageBase, index: int) -> None:
        ctx, tracker, cache = self.ctx, self.ctx.tracker, self.cache
        inp = self.resolve_input(stage)
        plan, record = cache.decide(stage, inp)
        where = f"{index}/{len(self.config.stages)}: {stage.name} ({stage.kind}" + (
            f" {stage.method}" if hasattr(stage, "method") else "") + (f", input {inp}" if inp else "") + ")"
        if record is not None:
            self.log(f"== stage {where}: reused, fingerprint {plan.fingerprint} matches MLflow run {record['run_id']} ==")
            tracker.set_tags(ctx.parent_run_id, {f"sslpipe.reused.{stage.name}": record["run_id"]})
            self._record(stage.name, _result_from_record(record, plan), {**record, "input": inp, "reused": True})
            return
        fresh = cache.forced(stage) or cache.input_reran(inp)
        drop_record(self.output_dir, stage.name)  # the old record no longer describes the artifacts
        with ctx.lock:
            cache.note(stage.name, plan.fingerprint, reused=False)
        self.log(f"== stage {where}: {plan.describe()} ==")
        run_id = tracker.start_run(stage.name, parent_id=ctx.parent_run_id,
                                   tags={"sslpipe.stage": stage.name, "sslpipe.kind": stage.kind,
                                         "sslpipe.fingerprint": plan.fingerprint, "sslpipe.input": str(inp),
                                         "sslpipe.action": plan.describe()})
        with ctx.lock:
            self._active_runs[run_id] = stage.name
        executor, started = executor_for(stage), time.time()
        upstream = self.results.get(inp) if inp else None
        if upstream is not None and "backbone" not in upstream.artifacts:
            raise ConfigError(f"stage '{stage.name}': input '{inp}' left no backbone artifact")
        run = StageRun(inp, upstream.artifacts["backbone"] if upstream else None, plan, run_id, fresh)
        try:
            tracker.log_params(run_id, flatten(stage.model_dump(mode="json")))
            ctx.log_datasets(run_id, evaluation=stage.uses_eval_split())
            result = executor.run(ctx, stage, run)
        except BaseException as err:
            with ctx.lock:
                self._active_runs.pop(run_id, None)
            tracker.end_run(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) or self._interrupted else "FAILED")
            raise
        result.fingerprint = plan.fingerprint or ""
        result.metrics["stage_time_s"] = time.time() - started
        tracker.log_metrics(run_id, executor.final_metrics(result))
        for key, path in result.artifacts.items():
            if key != "checkpoints":
                tracker.log_artifact(run_id, path, artifact_path=key if Path(path).is_dir() else None)
        tracker.end_run(run_id, "FINISHED")
        record = {"kind": stage.kind, "input": inp, "fingerprint": plan.fingerprint, "run_id": run_id,
                  "metrics": result.metrics, "artifacts": result.artifacts}
        write_record(self.output_dir, stage.name, record)
        with ctx.lock:
            self._active_runs.pop(run_id, None)
        self._record(stage.name, result, {**record, "reused": False})

    def _record(self, name: str, result: StageResult, entry: dict[str, Any]) -> None:
        with self.ctx.lock:
            self.results[name] = result
            self.cache.note(name, result.fingerprint, reused=result.reused)
            self.summary["stages"][name] = entry
            write_json_atomic(self.output_dir / "summary.json", self.summary)

    def _register_backbone(self) -> None:
        """Final backbone -> a new version in the MLflow model registry (see pipeline.registry)."""
        stage = self.config.registered_stage()
        if not self.config.registry.enabled or stage is None or stage not in self.results:
            return
        from pipeline.registry import register_stage_backbone
        from pipeline.tracking import TrackingError

        try:
            registered = register_stage_backbone(self.ctx, stage, self.results[stage],
                                                 self.summary["stages"][stage]["run_id"])
        except TrackingError as err:  # the run's results stand; `sslpipe retrain` treats this as fatal
            self.log(f"warning: {err}")
            registered = {"error": str(err)}
        self.summary["registry"] = registered
        write_json_atomic(self.output_dir / "summary.json", self.summary)


def _result_from_record(record: dict, plan: StagePlan) -> StageResult:
    return StageResult(metrics=dict(record.get("metrics", {})), artifacts=dict(record.get("artifacts", {})),
                       fingerprint=plan.fingerprint or "", reused=True)
