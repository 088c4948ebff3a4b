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


def run(config: str, reuse: bool, extra: list[str]) -> tuple[dict, float]:
    out = WORK / f"quality_{config}"
    summary_path = out / "summary.json"
    if reuse and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        return summary, float(summary.get("wall_time_s", 0.0))
    cmd = fresh_run_command(ROOT / "configs" / f"{config}.yaml", out, extra)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.time() - start
    summary = json.loads(summary_path.read_text())
    summary["wall_time_s"] = wall
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary, wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=["quickstart", "fmnist_simclr"])
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs under bench/_work")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    add_results_argument(parser)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    lines = [
        "## SimCLR quality on Fashion-MNIST (bench/quality.py)",
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/quality.py --configs {' '.join(args.configs)}`. Each config's `pixels` row uses the "
        "same kNN memory bank (its training subset) and evaluation split as its backbone row. kNN: cosine, "
        "weighted vote, k=200, t=0.1. NMI: faiss k-means, k=10, on L2-normalized features.",
        "",
        "| config | features | train images x epochs | eval images | kNN accuracy | k-means NMI | ARI | cluster acc. | stage time (s) | run wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in args.configs:
        summary, wall = run(config, args.reuse, args.overrides)
        from pipeline.config import load_config

        cfg = load_config(ROOT / "configs" / f"{config}.yaml", args.overrides)
        stages = summary["stages"]
        train_n = cfg.data.train_subset or 60000
        eval_n = cfg.data.eval_subset or 10000
        for name, stage in stages.items():
            if stage["kind"] != "evaluate":
                continue
            src = cfg.stage(name).input
            m = stage["metrics"]
            if src == "pixels":
                desc, size, t = "raw pixels", "-", "-"
            else:
                tr = cfg.stage(src)
                desc = f"{tr.method} backbone"
                size = f"{train_n} x {tr.epochs}"
                t = f"{stages[src]['metrics']['stage_time_s']:.0f}"
            lines.append(
                f"| {config} | {desc} | {size} | {eval_n} | {m.get('knn_accuracy', float('nan')):.4f} | "
                f"{m['nmi']:.4f} | {m['ari']:.4f} | {m['cluster_accuracy']:.4f} | {t} | {wall:.0f} |"
            )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    write_section(lines[0], "\n".join(lines[1:]), args.results)


if __name__ == "__main__":
    main()
