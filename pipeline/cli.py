"""`sslpipe` command line.

Exit codes: 0 success, 2 bad config or input (nothing started), 1 failure during the run.
torch, Ray and MLflow are imported only once work starts, so `--help` and config errors are instant.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    check = sub.add_parser("check", help="validate a config and print it resolved, without running")
    check.add_argument("config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sub.add_parser("methods", help="list the registered pretext methods")
    return parser


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'your input is wrong' (exit 2); imported lazily to stay fast."""
    from pipeline.config import ConfigError

    errors: list[type[BaseException]] = [ConfigError]
    for module, name in (("pipeline.data", "DataError"), ("pipeline.backbones", "BackboneError"),
                         ("pipeline.tracking", "TrackingError")):
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

    from pipeline.runner import PipelineRun, results_table
    from pipeline.tracking import ui_command

    summary = PipelineRun(config, output_dir).run()
    print("\n" + results_table(summary))
    print(f"\nsummary: {output_dir / 'summary.json'}")
    print(f"MLflow:  {ui_command(summary['tracking_uri'])}")
    return EXIT_OK


def _retrain(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    config = load_config(args.config, args.overrides)
    output_dir = Path(args.output_dir or config.output_dir or Path("runs") / config.name)

    from pipeline.registry import retrain

    decision = retrain(config, output_dir)
    if decision["decision"] != "noop":
        print(f"\nretrain: {decision['decision']}: {decision['reason']}")
        print(f"'{decision['alias']}' of model '{decision['model_name']}' is version {decision['champion_after']}")
        print(f"summary: {output_dir / 'summary.json'}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "methods":
        from pretext import method_names

        print("\n".join(method_names()))
        return EXIT_OK
    try:
        if args.command == "check":
            from pipeline.config import dump_config, load_config

            print(dump_config(load_config(args.config, args.overrides)), end="")
            return EXIT_OK
        if args.command == "retrain":
            return _retrain(args)
        return _run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are in summary.json; rerun the same command to continue", file=sys.stderr)
        return 130
    except _bad_input_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - top level: report, then a non-zero exit
        cause = _root_cause_bad_input(err)
        if cause is not None:
            print(f"error: {cause}", file=sys.stderr)
            return EXIT_BAD_INPUT
        import traceback

        traceback.print_exc()
        print(f"error: the run failed: {type(err).__name__}: {err}", file=sys.stderr)
        if os.environ.get("SSLPIPE_DEBUG"):
            raise
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
