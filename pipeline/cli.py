"""`sslpipe` command line.

Exit codes: 0 success, 2 bad config or input, or an unreachable MLflow server (nothing started),
1 failure during the run (e.g. a non-finite loss), 130 interrupted by Ctrl-C or SIGTERM (rerun the
same command to continue). torch, Ray and MLflow are imported only once work starts, so `--help` and
config errors are instant.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sslpipe",
        description="Self-supervised pretraining, evaluation and clustering of image backbones on Ray, tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline config", description="Run the stages of a pipeline config.")
    run.add_argument("config", help="pipeline YAML, e.g. configs/quickstart.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set stages.simclr.epochs=2 (repeatable)")
    run.add_argument("--output-dir", default=None, help="where runs, artifacts and summary.json go "
                     "(default: output_dir from the config, else runs/<name>)")
    retrain = sub.add_parser(
        "retrain", help="run on the current data; promote the new backbone if it beats the champion",
        description="Run the pipeline on the current data, evaluate the new model version and the one holding "
                    "the registry alias (default 'champion') on the same evaluation set, and move the alias only "
                    "if the metric improves by at least registry.min_improvement. Does nothing when the data "
                    "and config are unchanged since the last retrain.")
    retrain.add_argument("config", help="pipeline YAML with an optional registry: block")
    retrain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    retrain.add_argument("--output-dir", default=None, help="same default as run; keep it fixed between retrains "
                         "unless tracking.uri points at a shared MLflow server")


    run.add_argument("--dry-run", action="store_true",
                     help="print each stage's plan (run / reuse / resume) and fingerprint; no Ray, no MLflow writes")
    run.add_argument("--force", action="store_true", help="ignore cached stages and checkpoints: train everything again")
    run.add_argument("--rerun", action="append", default=[], metavar="STAGE",
                     help="run this stage again from scratch even if cached (repeatable); stages fed by it follow")
    check = sub.add_parser("check", help="validate a config and print it resolved, without running")
    check.add_argument("config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sub.add_parser("methods", help="list the registered methods and the stage kind that runs each")
    _add_embed_export(sub)
    return parser


BACKBONE_HELP = ("an artifact folder, a stage folder of a run (runs/NAME/stages/STAGE), a stage name with --run-dir, "
                 "or a registry URI models:/NAME@ALIAS or models:/NAME/VERSION")


def _add_backbone_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help=BACKBONE_HELP)
    p.add_argument("--run-dir", default=None, help="a finished run's output folder: --backbone may then be a stage "
                   "name, and models:/ URIs default to its mlflow.db")
    p.add_argument("--tracking-uri", default=None, help="MLflow store of the model registry for models:/ URIs "
                   "(default: MLFLOW_TRACKING_URI, else the --run-dir's mlflow.db)")


def _add_embed_export(sub) -> None:
    embed = sub.add_parser(
        "embed", help="embed the images of a folder or data source with a backbone into .parquet or .npy",
        description="Read one split of a data source as a pipeline run does (the data: keys as options), embed it "
                    "with a backbone and write the embeddings with their image ids. Streamed splits are embedded "
                    "on the Ray cluster and written in row chunks.")
    _add_backbone_options(embed)
    embed.add_argument("--out", required=True, help="OUT.parquet (id, label, embedding) or OUT.npy "
                       "(+ OUT.ids.txt, OUT.labels.npy); unreadable files are listed in OUT.skipped.tsv")
    embed.add_argument("--source", default="folder", help="data.source: folder (default), manifest or a built-in set")
    embed.add_argument("--root", default=None, help="data.root: the image folder or manifest file")
    embed.add_argument("--split", default="train", help="which split: train (default; the whole folder when it "
                       "has no train/ and test/ sub-folders), test, ...")
    embed.add_argument("--labels", choices=("auto", "folders", "none"), default="auto", help="data.labels")
    embed.add_argument("--load-size", type=int, default=None,
                       help="data.load_size: decode size of image files (default: the backbone's input size)")
    embed.add_argument("--backend", choices=("auto", "memory", "stream"), default="auto", help="data.backend")
    embed.add_argument("--cache-dir", default=None, help="data.cache_dir for the stream backend "
                       "(default: pixel_cache beside --out)")
    embed.add_argument("--batch-size", type=int, default=256)
    embed.add_argument("--ray-address", default=None, help="Ray cluster for streamed splits (default: RAY_ADDRESS, "
                       "else a local Ray)")
    export = sub.add_parser(
        "export", help="export a backbone to ONNX (checked with onnxruntime) or one safetensors file",
        description="ONNX: input 'images' float32 (N, 3, S, S) RGB in [0, 1] at the backbone's input size, the "
                    "artifact's normalization inside the graph (--raw-input: without it), output 'embeddings' "
                    "(N, D); onnxruntime must match torch within 1e-4 or nothing is written (exit 1). "
                    "safetensors: the weights with the artifact's metadata in the header.")
    _add_backbone_options(export)
    export.add_argument("--format", required=True, choices=("onnx", "safetensors"))
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    export.add_argument("--batch", type=int, default=2, help="batch size of the example traced for ONNX "
                        "(the batch axis stays dynamic; the check runs batch+1)")
    export.add_argument("--raw-input", action="store_true",
                        help="ONNX without the normalization: the graph takes the backbone's normalized input")


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'your input is wrong' (exit 2); imported lazily to stay fast."""
    from pipeline.config import ConfigError

    errors: list[type[BaseException]] = [ConfigError]
    for module, name in (("pipeline.data", "DataError"), ("pipeline.backbones", "BackboneError"),
                         ("pipeline.tracking", "TrackingError"), ("pipeline.export", "MissingPackageError")):
        mod = sys.modules.get(module)
        if mod is not None:
            errors.append(getattr(mod, name))
    return tuple(errors)


def _root_cause_bad_input(err: BaseException) -> BaseException | None:
    """Ray wraps worker exceptions; find a bad-input error inside the chain."""
    names = {"ConfigError", "DataError", "BackboneError", "TrackingError"}
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ in names:
            return err
        err = err.__cause__ or err.__context__
    return None


def _run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    config = load_config(args.config, args.overrides)
    output_dir = Path(args.output_dir or config.output_dir or Path("runs") / config.name)

    from pipeline.runner import PipelineRun
    from pipeline.tracking import ui_command

    pipeline = PipelineRun(config, output_dir, force=args.force, rerun=args.rerun)
    if args.dry_run:
        print(plan_table(pipeline.plan()))
        return EXIT_OK
    summary = pipeline.run()
    print("\n" + results_table(summary))
    print(f"\nsummary: {output_dir / 'summary.json'}")
    print(f"MLflow:  {ui_command(summary['tracking_uri'])}")
    return EXIT_OK


def _retrain(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    config = load_config(args.config, args.overrides)
    output_dir = Path(args.output_dir or config.output_dir or Path("runs") / config.name)

    from pipeline.retrain import retrain

    decision = retrain(config, output_dir)
    if decision["decision"] != "noop":
        print(f"\nretrain: {decision['decision']}: {decision['reason']}")
        print(f"'{decision['alias']}' of model '{decision['model_name']}' is version {decision['champion_after']}")
        print(f"summary: {output_dir / 'summary.json'}")
    return EXIT_OK


def _scratch_dir(out: str):
    """Where a models:/ backbone is downloaded: beside the output (shared storage on a cluster), removed after."""
    import tempfile

    parent = Path(out).expanduser().resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".sslpipe-backbone-", dir=parent)


def _embed(args: argparse.Namespace) -> int:
    from pipeline.backbone_ref import resolve_backbone
    from pipeline.backbones import read_backbone_meta
    from pipeline.embed import check_output, data_config, embed_split

    out = Path(args.out).expanduser()
    check_output(out)
    if args.batch_size < 1:
        from pipeline.config import ConfigError

        raise ConfigError(f"embed: --batch-size must be at least 1, got {args.batch_size}")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with _scratch_dir(args.out) as scratch:
        artifact = resolve_backbone(args.backbone, scratch=Path(scratch), run_dir=args.run_dir,
                                    tracking_uri=args.tracking_uri)
        meta = read_backbone_meta(artifact)
        load_size = args.load_size
        if load_size is None and args.source in ("folder", "manifest"):
            load_size = max(8, int(meta["input_size"]))
        data = data_config(source=args.source, root=args.root, train_split=args.split, labels=args.labels,
                           load_size=load_size, backend=args.backend, cache_dir=args.cache_dir)
        log(f"backbone: {artifact} ({meta['timm_name']}, {meta['feature_dim']} features, "
            f"{meta['input_size']}px input)")
        result = embed_split(artifact, data, out, batch_size=args.batch_size, ray_address=args.ray_address,
                             backbone_spec=args.backbone, log=log)
    where = "on the Ray cluster" if result["streamed"] else "in this process"
    print(f"embedded {result['rows']} images ({result['dim']} dims) {where} in {result['embed_s']:.1f}s "
          f"(data {result['load_s']:.1f}s); skipped {result['skipped']}")
    for path in result["files"] + ([result["skipped_file"]] if result["skipped_file"] else []):
        print(f"wrote {path}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from pipeline.backbone_ref import resolve_backbone

    with _scratch_dir(args.out) as scratch:
        artifact = resolve_backbone(args.backbone, scratch=Path(scratch), run_dir=args.run_dir,
                                    tracking_uri=args.tracking_uri)
        from pipeline import export

        if args.format == "onnx":
            if args.batch < 1:
                from pipeline.config import ConfigError

                raise ConfigError(f"export: --batch must be at least 1, got {args.batch}")
            result = export.export_onnx(artifact, Path(args.out).expanduser(), opset=args.opset, batch=args.batch,
                                        raw_input=args.raw_input)
            print(f"onnxruntime matches torch on a batch of {result['checked_batch']}: max abs difference "
                  f"{result['max_abs_diff']:.3g} (limit {export.DEFAULT_TOLERANCE:g})")
            print(f"input 'images': {result['input']}; output 'embeddings'")
        else:
            result = export.export_safetensors(artifact, Path(args.out).expanduser())
            print(f"{result['tensors']} tensors; the artifact metadata is in the header under '{export.META_KEY}'")
    print(f"wrote {result['out']}")
    return EXIT_OK


TABLE_METRICS = ("loss", "images_per_sec", "accuracy", "top5_accuracy", "knn_accuracy", "recall_at_1", "map_at_r", "nmi",
                 "ari", "cluster_accuracy", "heldout_pretext_accuracy", "heldout_ab_error", "stage_time_s")


def results_table(summary: dict) -> str:
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


def plan_table(plans) -> str:
    rows = [("stage", "kind", "input", "fingerprint", "action")]
    rows += [(p.name, p.kind, p.input or "-", p.fingerprint or "?", p.describe()) for p in plans]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def _exit_past_stage_threads(code: int) -> None:
    """Concurrent stages still block in Ray calls (their MLflow runs are already KILLED); the interpreter
    would wait for them at exit. Stop Ray (bounded), then leave without waiting."""
    def stop_ray():
        import ray

        ray.shutdown()

    stopper = threading.Thread(target=stop_ray, daemon=True)
    stopper.start()
    stopper.join(timeout=15)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _sigterm_as_interrupt(signum, frame) -> None:
    """SIGTERM (a scheduler stopping the job) gets the same cleanup as Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def _failure_message(err: BaseException) -> str | None:
    """A one-line message for failures whose cause is already clear (no traceback needed)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ in ("NonFiniteLossError", "ExportMismatch"):
            return str(err)
        err = err.__cause__ or err.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("run", "retrain") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    if args.command == "methods":
        import downstream
        from pretext import REFINE_METHODS, method_names

        for name in method_names():
            print(f"{name}\t{'refine' if name in REFINE_METHODS else 'pretext'}")
        for name in sorted(downstream.METHODS):
            print(f"{name}\t{name}")
        return EXIT_OK
    try:
        if args.command == "check":
            from pipeline.config import dump_config, load_config

            print(dump_config(load_config(args.config, args.overrides)), end="")
            return EXIT_OK
        if args.command == "retrain":
            return _retrain(args)
        if args.command == "embed":
            return _embed(args)
        if args.command == "export":
            return _export(args)
        return _run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are in summary.json; rerun the same command to continue", file=sys.stderr)
        from pipeline.runner import STAGE_THREAD_PREFIX

        if any(t.is_alive() and t.name.startswith(STAGE_THREAD_PREFIX) for t in threading.enumerate()):
            _exit_past_stage_threads(130)
        return 130
    except _bad_input_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - top level: report, then a non-zero exit
        cause = _root_cause_bad_input(err)
        if cause is not None:
            print(f"error: {cause}", file=sys.stderr)
            return EXIT_BAD_INPUT
        message = _failure_message(err)
        if message is not None:
            print(f"error: {message}", file=sys.stderr)
            return EXIT_FAILURE
        import traceback

        traceback.print_exc()
        print(f"error: the run failed: {type(err).__name__}: {err}", file=sys.stderr)
        if os.environ.get("SSLPIPE_DEBUG"):
            raise
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
