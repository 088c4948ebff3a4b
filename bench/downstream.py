"""Downstream benchmarks.

--label-efficiency: Fashion-MNIST test accuracy of a linear probe and of full fine-tuning at 1%, 10% and
100% of the training labels, for random-init, SimCLR and SimCLR+STML backbones (configs/fmnist_finetune.yaml:
the backbones are pretrained once in the pipeline and reused by every fine-tune stage). Writes the
"## Label efficiency" section of bench/RESULTS.md.

Usage: python bench/downstream.py --label-efficiency [--quick] [--reuse] [--set KEY=VALUE ...]
  --quick   a smoke check (300 images, 1-2 epochs); prints the table, writes bench/_work/RESULTS.quick.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work"

from bench.results import RESULTS, add_results_argument, write_section  # noqa: E402
from bench.speed import fresh_run_command, machine  # noqa: E402

CONFIG = ROOT / "configs" / "fmnist_finetune.yaml"
BACKBONES = (("random", "random init"), ("simclr", "SimCLR"), ("stml", "SimCLR + STML"))
MODES = ("linear", "full")
FRACTIONS = ((1, 0.01), (10, 0.1), (100, 1.0))


def quick_config(data: dict) -> dict:
    """The same stages on a tiny subset with 1-2 epochs: checks the whole sweep runs, not its numbers."""
    data["data"].update(train_subset=300, eval_subset=300)
    for stage in data["stages"]:
        stage["epochs"] = 1 if stage["kind"] in ("pretext", "refine") else min(stage["epochs"], 2)
    return data


def run_sweep(quick: bool, reuse: bool, overrides: list[str]) -> dict:
    name = "label_efficiency_quick" if quick else "label_efficiency"
    out = WORK / name
    if reuse and (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    data = yaml.safe_load(CONFIG.read_text())
    if quick:
        data = quick_config(data)
    config = WORK / f"{name}.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    cmd = fresh_run_command(config, out, overrides)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_time_s"] = time.time() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def label_efficiency(args: argparse.Namespace) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    summary = run_sweep(args.quick, args.reuse, args.overrides)
    stages = summary["stages"]
    resolved = yaml.safe_load((Path(summary["output_dir"]) / "config.resolved.yaml").read_text())
    data = resolved["data"]
    epochs = {s["name"]: s["epochs"] for s in resolved["stages"]}

    def cell(name: str) -> str:
        m = stages.get(name, {}).get("metrics", {})
        return "-" if "accuracy" not in m else f"{m['accuracy']:.4f}"

    columns = [(mode, pct) for mode in MODES for pct, _ in FRACTIONS]
    labeled = {pct: int(stages[f"random_linear_{pct}"]["metrics"]["labeled_images"]) for pct, _ in FRACTIONS}
    header = " | ".join(f"{mode} {pct}% ({labeled[pct]})" for mode, pct in columns)
    lines = [
        "## Label efficiency (bench/downstream.py)",
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/downstream.py --label-efficiency{' --quick' if args.quick else ''}` "
        f"(configs/fmnist_finetune.yaml{', shrunk by --quick' if args.quick else ''}). Fashion-MNIST, "
        f"{data['train_subset']} training images (stratified subset; the labeled fractions are stratified, seeded "
        f"subsets of them, at least one image per class), test accuracy on {data['eval_subset']} test images. "
        f"{resolved['backbone']['name']}, small stem stride {resolved['backbone']['stem_stride']}, "
        f"{resolved['backbone']['image_size']} px, 2 Ray Train workers. Backbones: random init; SimCLR "
        f"({epochs['simclr']} epochs on the unlabeled training subset); SimCLR + STML ({epochs['stml']} refine "
        f"epoch(s); its bare backbone is fine-tuned, not the STML embedding head). linear: frozen backbone "
        f"(eval mode), linear head, AdamW lr 1e-2, {epochs['random_linear_1']}/{epochs['random_linear_10']}/"
        f"{epochs['random_linear_100']} epochs at 1/10/100%. full: everything trains, AdamW lr 1e-3, label "
        f"smoothing 0.1, random resized crop + flip per image, {epochs['random_full_1']}/{epochs['random_full_10']}/"
        f"{epochs['random_full_100']} epochs. Column headers give the labeled image count. Short schedules on a "
        f"small subset: the numbers compare backbones, they are not the accuracy these models can reach.",
        "",
        f"| backbone | {header} |",
        "|---|" + "---|" * len(columns),
    ]
    for key, label in BACKBONES:
        lines.append(f"| {label} | " + " | ".join(cell(f"{key}_{mode}_{pct}") for mode, pct in columns) + " |")
    pretrain = sum(stages[s]["metrics"].get("stage_time_s", 0.0) for s in ("simclr", "stml"))
    tune = sum(s["metrics"].get("stage_time_s", 0.0) for s in stages.values() if s["kind"] == "finetune")
    lines += [
        "",
        f"- Wall time: {summary.get('wall_time_s', float('nan')):.0f} s in all; pretraining (SimCLR + STML) "
        f"{pretrain:.0f} s, the {sum(s['kind'] == 'finetune' for s in stages.values())} fine-tune stages "
        f"{tune:.0f} s (each includes Ray Train start-up and the driver's test-set pass).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    target = WORK / "RESULTS.quick.md" if args.quick and args.results == RESULTS else args.results
    write_section(lines[0], "\n".join(lines[1:]), target)
    print(f"wrote {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label-efficiency", action="store_true",
                        help="linear probe and fine-tune accuracy at 1/10/100%% labels (about 15 min on 2 cores)")
    parser.add_argument("--quick", action="store_true", help="smoke check on a tiny subset; RESULTS.md untouched")
    parser.add_argument("--reuse", action="store_true", help="reuse a finished run's summary.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_results_argument(parser)
    args = parser.parse_args()
    if not args.label_efficiency:
        parser.error("choose a benchmark: --label-efficiency")
    label_efficiency(args)


if __name__ == "__main__":
    main()
