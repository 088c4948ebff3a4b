"""Supervised metric learning on unseen classes: every loss with and without Embedding Expansion.

One pipeline run (configs/fmnist_metric.yaml, expanded here): raw pixels, then ten metric stages (five
losses x Embedding Expansion off/on), each trained from the *same random init* (same seed, same
architecture) on the labels of Fashion-MNIST classes 0-4 and evaluated by leave-one-out retrieval
(Recall@K, MAP@R, cosine) on test images of classes 5-9. The untrained embedder (that random init:
backbone + fresh head) is embedded here too, so each row can be read against where it started.

Usage: python bench/metric.py [--quick] [--reuse] [--set KEY=VALUE ...]   (writes a section of bench/RESULTS.md;
--quick: a tiny smoke run that does not touch RESULTS.md)
"""

from __future__ import annotations

import argparse
import copy
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

LOSSES = ("contrastive", "triplet", "margin", "multi_similarity", "quadruplet")
KEYS = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r")
HEADING = "## Supervised metric learning"

# Default run: ~1 min per stage on a quiet 2-core machine (2000 images x 3 epochs at ~130 images/s).
FULL = dict(train_subset=2000, eval_subset=1000, epochs=3, batch_size=128, image_size=28)
QUICK = dict(train_subset=200, eval_subset=200, epochs=1, batch_size=40, image_size=16)


def build_config(size: dict) -> dict:
    base = yaml.safe_load((ROOT / "configs" / "fmnist_metric.yaml").read_text())
    template = next(s for s in base["stages"] if s["kind"] == "metric")
    base["name"] = "bench_metric"
    base["data"].update(train_subset=size["train_subset"], eval_subset=size["eval_subset"])
    base["backbone"]["image_size"] = size["image_size"]
    stages = [next(s for s in base["stages"] if s.get("input") == "pixels")]
    for loss in LOSSES:
        for ee in (False, True):
            stage = copy.deepcopy(template)
            stage.update(name=f"{loss}{'_ee' if ee else ''}", epochs=size["epochs"], batch_size=size["batch_size"],
                         log_every_steps=1000)
            stage["settings"].update(loss=loss, embedding_expansion={"enabled": ee, "points": 2})
            stage["settings"].pop("miner", None)  # each loss's default miner
            stages.append(stage)
    base["stages"] = stages
    return base


def untrained_metrics(summary: dict, config: dict) -> dict[str, float]:
    """Retrieval of the random init every stage starts from: the trainer seeds rank 0 with seed * 1000,
    builds the backbone, then the head; rank 0's weights are broadcast to the other worker."""
    import torch

    from pretext.embeddings import embed_images
    from downstream.metric import MetricEmbedder
    from downstream.retrieval import retrieval_metrics
    from pipeline.backbones import build_backbone, read_backbone_meta
    from pipeline.data import load_images

    bb, d = config["backbone"], config["data"]
    first = next(name for name, s in summary["stages"].items() if s["kind"] == "metric")
    meta = read_backbone_meta(summary["stages"][first]["artifacts"]["backbone"])
    torch.manual_seed(config.get("seed", 0) * 1000)
    backbone, dim = build_backbone(bb["name"], small_image_stem=bb["small_image_stem"], stem_stride=bb["stem_stride"],
                                   in_chans=bb.get("in_chans", 3))
    model = MetricEmbedder(backbone, torch.nn.Linear(dim, meta["embedding_dim"]))
    evalset = load_images(d["source"], "test", subset=d["eval_subset"], classes=d["eval_classes"],
                          seed=config.get("seed", 0))
    x = embed_images(model, evalset.images, input_size=bb["image_size"], mean=meta["mean"], std=meta["std"],
                     in_chans=meta["in_chans"])
    return retrieval_metrics(x, evalset.labels)


def one_or_each(values: dict[str, object]) -> str:
    """A setting as run: its value when every metric stage ran with the same, else each stage's."""
    distinct = {str(v) for v in values.values()}
    return distinct.pop() if len(distinct) == 1 else "; ".join(f"{k}: {v}" for k, v in values.items())


def classes(ids) -> str:
    ids = sorted(ids or [])
    if not ids:
        return "all classes"
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"classes {ids[0]}-{ids[-1]}"
    return "classes " + ", ".join(map(str, ids))


def describe(config: dict, overrides: list[str], quick: bool, train_n: int, eval_n: int) -> str:
    """The header's protocol text, from the resolved config the run wrote (so --set overrides show)."""
    from downstream.settings import LOSS_MINERS

    data, bb = config["data"], config["backbone"]
    metric = [s for s in config["stages"] if s["kind"] == "metric"]
    each = lambda f: one_or_each({s["name"]: f(s) for s in metric})  # noqa: E731
    pixels = next((s for s in config["stages"] if s["name"] == "pixels"), None)
    stem = f"small stem stride {bb['stem_stride']}" if bb["small_image_stem"] else "standard stem"
    sets = "".join(f" --set {o}" for o in overrides)
    miners = each(lambda s: "hardest negatives among original and synthetic points (EE)"
                  if s["settings"]["embedding_expansion"]["enabled"]
                  else (s["settings"].get("miner") or LOSS_MINERS[s["settings"]["loss"]][0]))
    return (
        f"Command: `python bench/metric.py{' --quick' if quick else ''}{sets}` (configs/fmnist_metric.yaml, one "
        f"stage per row; every figure below is read from the run's resolved config): {train_n} labelled "
        f"{data['source']} training images of {classes(data.get('train_classes'))}, "
        f"{each(lambda s: s['epochs'])} epoch(s), batch {each(lambda s: s['batch_size'])} "
        f"({each(lambda s: s['settings']['images_per_class'])} images per class), "
        f"{each(lambda s: s['optimizer']['name'])} lr {each(lambda s: s['optimizer']['lr'])}, "
        f"{each(lambda s: s['settings']['embedding_dim'])}-d L2-normalized embedding on {bb['name']} ({stem}, "
        f"{bb['image_size']} px), {config['ray']['num_workers']} Ray Train worker(s), seed {config.get('seed', 0)}. "
        f"Every stage starts from {each(lambda s: 'the same random init (no pretraining)' if not s.get('input') else s['input'])}. "
        f"Evaluation: leave-one-out retrieval (cosine; raw pixels: "
        f"{pixels.get('retrieval_distance', 'cosine') if pixels else '-'}) on {eval_n} test images of the unseen "
        f"{classes(data.get('eval_classes'))}. Miners as run: {miners}. Embedding Expansion (EE) points per "
        f"positive pair: {each(lambda s: s['settings']['embedding_expansion']['points'])}."
    )


def fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (RESULTS.md untouched)")
    parser.add_argument("--reuse", action="store_true", help="report the last run again")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    add_results_argument(parser)
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    out = WORK / ("metric_quick" if args.quick else "metric")
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(size)
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    if not (args.reuse and (out / "summary.json").exists()):
        cmd = fresh_run_command(config_path, out, args.overrides)
        start = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        summary = json.loads((out / "summary.json").read_text())
        summary["wall_time_s"] = time.time() - start
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())  # what the run ran, --set included
    start_point = untrained_metrics(summary, resolved)

    from bench.quality import measured_sizes
    from pipeline.config import load_config

    train_n, eval_n = measured_sizes(load_config(out / "config.resolved.yaml"))
    lines = [
        f"{HEADING} (bench/metric.py)",
        "",
        f"Machine: {machine()}.",
        describe(resolved, args.overrides, args.quick, train_n, eval_n),
        "",
        "| embedding | EE | " + " | ".join(KEYS) + " | stage time (s) |",
        "|---|---|" + "---|" * (len(KEYS) + 1),
        f"| raw pixels | - | " + " | ".join(fmt(stages["pixels"]["metrics"].get(k)) for k in KEYS) + " | - |",
        f"| random init, untrained | - | " + " | ".join(fmt(start_point.get(k)) for k in KEYS) + " | - |",
    ]
    gains = []
    for loss in LOSSES:
        for ee in (False, True):
            m = stages[f"{loss}{'_ee' if ee else ''}"]["metrics"]
            lines.append(f"| {loss} | {'yes' if ee else 'no'} | " + " | ".join(fmt(m.get(k)) for k in KEYS)
                         + f" | {fmt(m.get('stage_time_s'), 0)} |")
        plain, expanded = stages[loss]["metrics"], stages[f"{loss}_ee"]["metrics"]
        gains.append(f"{loss} {expanded['recall_at_1'] - plain['recall_at_1']:+.4f}")
    best = max((n for n, s in stages.items() if s["kind"] == "metric"), key=lambda n: stages[n]["metrics"]["recall_at_1"])
    lines += [
        "",
        f"- R@1 change from Embedding Expansion: {', '.join(gains)}.",
        f"- Best R@1: **{best}** ({stages[best]['metrics']['recall_at_1']:.4f}); untrained start "
        f"{start_point['recall_at_1']:.4f}, raw pixels {stages['pixels']['metrics']['recall_at_1']:.4f}.",
        "- The untrained row is the seeded init embedded in eval mode, BatchNorm running statistics still at "
        "their defaults: a near-degenerate embedding, shown as the starting point rather than as a baseline.",
        f"- Wall time of the whole run: {summary.get('wall_time_s', float('nan')):.0f} s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick or args.results != RESULTS:  # --quick alone leaves RESULTS.md alone
        write_section(lines[0], "\n".join(lines[1:]), args.results)


if __name__ == "__main__":
    main()
