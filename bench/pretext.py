"""All pretext methods side by side: kNN accuracy, k-means NMI, training images/s and peak memory.

Runs configs/fmnist_all_pretext.yaml (raw pixels, rotation, jigsaw, SimCLR, MoCo on the same
Fashion-MNIST subset) and configs/photos_colorization.yaml (colorization needs colour photos), then
writes a section of bench/RESULTS.md.

Usage: python bench/pretext.py [--reuse] [--set KEY=VALUE ...]
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


def run(config: str, reuse: bool, overrides: list[str], out: Path | None = None) -> dict:
    """Train ``configs/<config>.yaml`` afresh into ``out`` (default bench/_work/pretext_<config>); ``reuse`` keeps
    a finished run there."""
    out = out or WORK / f"pretext_{config}"
    if not (reuse and (out / "summary.json").exists()):
        cmd = fresh_run_command(ROOT / "configs" / f"{config}.yaml", out, overrides)
        start = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        summary = json.loads((out / "summary.json").read_text())
        summary["wall_time_s"] = time.time() - start
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return json.loads((out / "summary.json").read_text())


def fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    add_results_argument(parser)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    fm = run("fmnist_all_pretext", args.reuse, args.overrides)
    photos = run("photos_colorization", args.reuse, [])
    rows = []
    for name, stage in fm["stages"].items():
        m = stage["metrics"]
        if name == "pixels":
            rows.append(("raw pixels", "fashion-mnist", m.get("knn_accuracy"), m.get("nmi"), None, None, None, None))
        elif stage["kind"] == "pretext":
            pretext_acc = m.get("heldout_pretext_accuracy")
            rows.append((name, "fashion-mnist", m.get("knn_accuracy"), m.get("nmi"), m.get("images_per_sec"),
                         m.get("peak_memory_mb"), pretext_acc, m.get("stage_time_s")))
    c = photos["stages"]["colorization"]["metrics"]
    rows.append(("colorization", "photos (unlabeled)", None, None, c.get("images_per_sec"), c.get("peak_memory_mb"),
                 None, c.get("stage_time_s")))
    lines = [
        "## Pretext methods side by side (bench/pretext.py)",
        "",
        f"Machine: {machine()}.",
        "Command: `python bench/pretext.py`. Fashion-MNIST: configs/fmnist_all_pretext.yaml (3000 training "
        "images, 2 epochs per method (jigsaw: 1), resnet18 small stem stride 2, 28 px, 2 Ray Train workers; kNN k=200 t=0.1 "
        "with the training subset as memory bank; NMI of k-means k=10 on 2000 test images). Colorization: "
        "configs/photos_colorization.yaml on scikit-image's sample photos (no labels, so no kNN/NMI). "
        "images/s counts source images (a rotation step sees 4 rotated copies, a jigsaw step 9 tiles per image); "
        "peak memory is the rank-0 worker's peak RSS.",
        "",
        "| method | data | kNN accuracy | k-means NMI | train images/s | peak memory (MB) | held-out pretext accuracy | stage time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, data, knn, nmi, ips, mem, acc, t in rows:
        lines.append(f"| {name} | {data} | {fmt(knn)} | {fmt(nmi)} | {fmt(ips, 1)} | {fmt(mem, 0)} | {fmt(acc)} | {fmt(t, 0)} |")
    if "best" in fm:
        lines += ["", f"Best backbone by {fm['best']['metric']}: **{fm['best']['stage']}** ({fm['best']['value']:.4f})."]
    if "heldout_ab_error" in c:
        lines += ["", f"Colorization held-out ab error {c['heldout_ab_error']:.2f} vs predicting gray "
                      f"{c.get('heldout_gray_ab_error', float('nan')):.2f} (lower is better)."]
    lines.append("")
    text = "\n".join(lines)
    print(text)
    write_section(lines[0], "\n".join(lines[1:]), args.results)


if __name__ == "__main__":
    main()
