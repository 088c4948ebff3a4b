"""Quality of SimCLR backbones on Fashion-MNIST next to raw pixels (kNN accuracy k=200 t=0.1, k-means NMI).

Runs each config with `sslpipe run` (each config carries its own `pixels` baseline stage, evaluated with
the same memory bank and evaluation split) and writes a section of bench/RESULTS.md.

Usage: python bench/quality.py [--configs quickstart fmnist_simclr] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work"

from bench.results import add_results_argument, write_section  # noqa: E402
from bench.speed import fresh_run_command, machine  # noqa: E402


def run(config: str, reuse: bool, extra: list[str]) -> tuple[dict, float | None]:
    """(summary, wall time in s); the wall time is None when a reused run did not record one."""
    out = WORK / f"quality_{config}"
    summary_path = out / "summary.json"
    if reuse and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        wall = summary.get("wall_time_s")
        return summary, None if wall is None else float(wall)
    cmd = fresh_run_command(ROOT / "configs" / f"{config}.yaml", out, extra)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.time() - start
    summary = json.loads(summary_path.read_text())
    summary["wall_time_s"] = wall
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary, wall


def read_splits(cfg):
    """The (train, eval) image sets a run read, loaded again as the pipeline loads them
    (pipeline.context.load_split with the run's resolved config)."""
    from pipeline.context import load_split

    quiet = lambda *_: None  # noqa: E731
    return load_split(cfg, "train", quiet), load_split(cfg, "eval", quiet)


def measured_sizes(cfg) -> tuple[int, int]:
    """How many training and evaluation images the run read, counted, instead of a default assumed for an
    unset subset."""
    train, evalset = read_splits(cfg)
    return len(train), len(evalset)


def size_label(n: int, subset: int | None) -> str:
    """The measured count, saying when no subset was set (the whole split was read)."""
    return f"{n}" if subset is not None else f"{n} (whole split)"


def one_value(values: dict[str, object]) -> str:
    """A setting's value, or each config's where they differ."""
    distinct = sorted({str(v) for v in values.values()})
    return distinct[0] if len(distinct) == 1 else ", ".join(f"{v} ({c})" for c, v in values.items())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=["quickstart", "fmnist_simclr"])
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs under bench/_work")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    add_results_argument(parser)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    from pipeline.config import load_config

    rows, knn_k, knn_t, clusters, iterations, sources = [], {}, {}, {}, {}, {}
    for config in args.configs:
        summary, wall = run(config, args.reuse, args.overrides)
        # the config the run actually ran (a reused run may have had other --set overrides than this call)
        cfg = load_config(WORK / f"quality_{config}" / "config.resolved.yaml")
        stages = summary["stages"]
        sources[config] = cfg.data.source
        train_count, eval_count = measured_sizes(cfg)
        train_n = size_label(train_count, cfg.data.train_subset)
        eval_n = size_label(eval_count, cfg.data.eval_subset)
        wall_s = "-" if wall is None else f"{wall:.0f}"
        for name, stage in stages.items():
            if stage["kind"] != "evaluate":
                continue
            src = cfg.stage(name).input
            m = stage["metrics"]
            evaluate = cfg.stage(name)
            knn_k[config], knn_t[config] = evaluate.knn_k, evaluate.knn_temperature
            clusters.setdefault(config, set()).add(int(m["clusters"]) if "clusters" in m else "?")
            iterations[config] = evaluate.kmeans_iterations
            if src == "pixels":
                desc, size, t = "raw pixels", "-", "-"
            elif src == "pretrained":  # the configured backbone with its weights, untrained (the demo's ImageNet row)
                desc, size, t = f"{cfg.backbone.name} pretrained, untrained here", "-", "-"
            else:
                tr = cfg.stage(src)
                desc = f"{tr.method} backbone"
                size = f"{train_n} x {tr.epochs}"
                t = f"{stages[src]['metrics']['stage_time_s']:.0f}"
            rows.append(
                f"| {config} | {desc} | {size} | {eval_n} | {m.get('knn_accuracy', float('nan')):.4f} | "
                f"{m['nmi']:.4f} | {m['ari']:.4f} | {m['cluster_accuracy']:.4f} | {t} | {wall_s} |"
            )
    sets = "".join(f" --set {o}" for o in args.overrides)
    lines = [
        "## SimCLR quality on Fashion-MNIST (bench/quality.py)",
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/quality.py --configs {' '.join(args.configs)}{sets}"
        f"{' --reuse' if args.reuse else ''}`. Data: {one_value(sources)}. Each config's `pixels` row uses the "
        "same kNN memory bank (its training subset) and evaluation split as its backbone row. kNN: cosine, "
        f"weighted vote, k={one_value(knn_k)}, t={one_value(knn_t)}. NMI: faiss k-means, "
        f"k={one_value({c: '/'.join(map(str, sorted(v, key=str))) for c, v in clusters.items()})} (as run), "
        f"{one_value(iterations)} iterations, on L2-normalized features. Image counts are those the run read "
        "(the splits loaded again with its resolved config and counted); run wall time '-' when a reused "
        "run did not record it.",
        "",
        "| config | features | train images x epochs | eval images | kNN accuracy | k-means NMI | ARI | cluster acc. | stage time (s) | run wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_section(lines[0], "\n".join(lines[1:]), args.results)


if __name__ == "__main__":
    main()
