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


def resolved(config: str, out: Path | None = None):
    """The typed config a run actually ran (its config.resolved.yaml: defaults filled, --set applied)."""
    from pipeline.config import load_config

    return load_config((out or WORK / f"pretext_{config}") / "config.resolved.yaml")


def per_stage(values: dict[str, object]) -> str:
    """'2 per method' when every stage has the same value, else each stage's ('rotation 2, jigsaw 1, ...')."""
    distinct = {str(v) for v in values.values()}
    if len(values) == 1:
        return distinct.pop()
    return f"{distinct.pop()} per method" if len(distinct) == 1 else ", ".join(f"{k} {v}" for k, v in values.items())


def backbone_text(cfg) -> str:
    bb = cfg.backbone
    stem = f"small stem stride {bb.stem_stride}" if bb.small_image_stem else "standard stem"
    return f"{bb.name} {stem}, {bb.image_size} px, {cfg.ray.num_workers} Ray Train worker(s)"


def describe(fm_cfg, photos_cfg, overrides: list[str], fm_stages: dict, reuse: bool = False) -> str:
    """The header's protocol text, built from the resolved configs the two runs wrote and the images they read."""
    import inspect

    import numpy as np

    from bench.quality import read_splits
    from pipeline.evaluate import quick_evaluate

    train, evalset = read_splits(fm_cfg)
    n_classes = len(np.unique(evalset.labels)) if evalset.labels is not None else None
    pretext = [s for s in fm_cfg.stages if s.kind == "pretext" and s.name in fm_stages]
    defaults = inspect.signature(quick_evaluate).parameters
    pixels = next((s for s in fm_cfg.stages if s.kind == "evaluate" and s.input == "pixels"), None)
    pixel_knn = (f"raw pixels: kNN k={pixels.knn_k} t={pixels.knn_temperature}, k-means "
                 f"k={int(fm_stages[pixels.name]['metrics'].get('clusters', 0)) or '?'}; ") if pixels else ""
    data = photos_cfg.data
    colour = [s for s in photos_cfg.stages if s.kind == "pretext"]
    sets = "".join(f" --set {o}" for o in overrides)
    return (
        f"Command: `python bench/pretext.py{' --reuse' if reuse else ''}{sets}`. {fm_cfg.data.source}: configs/fmnist_all_pretext.yaml"
        f"{' with' + sets if sets else ''} ({len(train)} training images, epochs: "
        f"{per_stage({s.name: s.epochs for s in pretext})}, {backbone_text(fm_cfg)}; {pixel_knn}pretext rows: kNN "
        f"k={defaults['k'].default} t={defaults['temperature'].default} with the training images as memory bank, "
        f"NMI of k-means k={n_classes} on {len(evalset)} test images). Colorization: "
        f"configs/photos_colorization.yaml (no --set applied) on {data.source}"
        f"{', scikit-image sample photos' if data.source == 'photos' else ''} "
        f"(no labels, so no kNN/NMI), epochs: {per_stage({s.name: s.epochs for s in colour})}, "
        f"{backbone_text(photos_cfg)}. "
        "images/s counts source images (a rotation step sees 4 rotated copies, a jigsaw step 9 tiles per image); "
        "peak memory is the rank-0 worker's peak RSS."
    )


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
    fm_cfg, photos_cfg = resolved("fmnist_all_pretext"), resolved("photos_colorization")
    fm_source, photos_source = fm_cfg.data.source, f"{photos_cfg.data.source} (unlabeled)"
    rows = []
    for name, stage in fm["stages"].items():
        m = stage["metrics"]
        if name == "pixels":
            rows.append(("raw pixels", fm_source, m.get("knn_accuracy"), m.get("nmi"), None, None, None, None))
        elif stage["kind"] == "pretext":
            pretext_acc = m.get("heldout_pretext_accuracy")
            rows.append((name, fm_source, m.get("knn_accuracy"), m.get("nmi"), m.get("images_per_sec"),
                         m.get("peak_memory_mb"), pretext_acc, m.get("stage_time_s")))
    c = photos["stages"]["colorization"]["metrics"]
    rows.append(("colorization", photos_source, None, None, c.get("images_per_sec"), c.get("peak_memory_mb"),
                 None, c.get("stage_time_s")))
    lines = [
        "## Pretext methods side by side (bench/pretext.py)",
        "",
        f"Machine: {machine()}.",
        describe(fm_cfg, photos_cfg, args.overrides, fm["stages"], args.reuse),
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
