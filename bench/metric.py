"""Supervised metric learning on unseen classes: every loss with and without Embedding Expansion.

One pipeline run (configs/fmnist_metric.yaml, expanded here): raw pixels, then ten metric stages (five
losses x Embedding Expansion off/on), each trained from the *same random init* (same seed, same
architecture) on the labels of Fashion-MNIST classes 0-4 and evaluated by leave-one-out retrieval
(Recall@K, MAP@R, cosine) on test images of classes 5-9. The untrained embedder (that random init:
backbone + fresh head) is embedded here too, so each row can be read against where it started.

With `--retrieval`: the retrieval pieces on the same unseen-class protocol from an ImageNet start
(configs/fmnist_retrieval.yaml): cosine / Euclidean / whitened Mahalanobis / LMNN distances on the untouched
ImageNet embedding; the triplet loss with average, GeM and NetVLAD pooling (run 1); then contrastive, FastAP and
Smooth-AP with whichever pooling won on MAP@R in run 1 (run 2). Its own section of bench/RESULTS.md.

Usage: python bench/metric.py [--quick] [--retrieval] [--reuse] [--set KEY=VALUE ...]   (writes a section of
bench/RESULTS.md; --quick: a tiny smoke run that does not touch RESULTS.md)
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


RETRIEVAL_HEADING = "## Retrieval: pooling, AP losses and learned distances"
DISTANCE_ROWS = (("imagenet", "cosine"), ("imagenet_euclidean", "Euclidean"),
                 ("imagenet_mahalanobis", "whitened Mahalanobis"), ("imagenet_lmnn", "LMNN"))
POOLINGS = ("avg", "gem", "netvlad")
AP_LOSSES = ("contrastive", "fastap", "smoothap")
# --quick --retrieval: a few hundred images at 32 px, one short epoch per stage
RETRIEVAL_QUICK = ["data.train_subset=300", "data.eval_subset=200", "data.load_size=32", "backbone.image_size=32"]


def run_pipeline(config: dict, out: Path, overrides: list[str], reuse: bool) -> dict:
    """Run `config` into `out` (every stage trained again) unless `reuse` finds its summary; the summary."""
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    if not (reuse and (out / "summary.json").exists()):
        start = time.time()
        subprocess.run(fresh_run_command(config_path, out, overrides), check=True, cwd=ROOT)
        summary = json.loads((out / "summary.json").read_text())
        summary["wall_time_s"] = time.time() - start
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return json.loads((out / "summary.json").read_text())


def retrieval_main(args) -> None:
    """Two pipeline runs of configs/fmnist_retrieval.yaml's stages (see the module docstring) and the table."""
    base = yaml.safe_load((ROOT / "configs" / "fmnist_retrieval.yaml").read_text())
    overrides = args.overrides + (RETRIEVAL_QUICK if args.quick else [])
    by_name = {s["name"]: s for s in base["stages"]}
    if args.quick:
        for s in base["stages"]:
            if s["kind"] == "metric":
                s.update(epochs=1, log_every_steps=1000)
    first = dict(base, name="bench_retrieval", stages=[
        s for s in base["stages"] if s["kind"] == "evaluate" or s["settings"]["loss"] == "triplet"])
    tag = "_quick" if args.quick else ""
    run1 = run_pipeline(first, WORK / f"retrieval{tag}", overrides, args.reuse)["stages"]
    best = max(POOLINGS, key=lambda p: run1[f"triplet_{p}"]["metrics"]["map_at_r"])
    second_stages = []
    for loss in AP_LOSSES:
        stage = copy.deepcopy(by_name[f"{loss}_gem"])
        stage["name"] = f"{loss}_{best}"
        stage["settings"] = dict(by_name[f"triplet_{best}"]["settings"], loss=loss)
        second_stages.append(stage)
    # the folder names the pooling: --reuse after a run where another pooling won does not read stale stages
    run2 = run_pipeline(dict(base, name="bench_retrieval_losses", stages=second_stages),
                        WORK / f"retrieval_losses_{best}{tag}", overrides, args.reuse)["stages"]
    stages = {**run1, **run2}
    resolved = yaml.safe_load((WORK / f"retrieval{tag}" / "config.resolved.yaml").read_text())
    data, bb = resolved["data"], resolved["backbone"]
    metric = next(s for s in resolved["stages"] if s["kind"] == "metric")

    def row(label: str, distance: str, name: str) -> str:
        m = stages[name]["metrics"]
        time_s = fmt(m.get("stage_time_s"), 0) if stages[name]["kind"] == "metric" else "-"
        return f"| {label} | {distance} | " + " | ".join(fmt(m.get(k)) for k in KEYS) + f" | {time_s} |"

    lines = [
        f"{RETRIEVAL_HEADING} (bench/metric.py --retrieval)",
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/metric.py --retrieval{' --quick' if args.quick else ''}"
        + "".join(f" --set {o}" for o in args.overrides) + "` (configs/fmnist_retrieval.yaml, in two runs: the "
        "distances and the triplet loss with each pooling, then the other losses with the pooling that won on "
        f"MAP@R). Input backbone: {bb['name']} with its ImageNet weights ({bb.get('weights')}), {bb['image_size']} "
        f"px. Metric stages: {metric['epochs']} epoch(s) on the labels of {data['train_subset']} training images of "
        f"{classes(data.get('train_classes'))}, {metric['settings']['embedding_dim']}-d L2-normalized embedding, "
        f"{metric['settings']['images_per_class']} images per class in a batch, {metric['optimizer']['name']} lr "
        f"{metric['optimizer']['lr']}, {resolved['ray']['num_workers']} Ray Train workers, seed "
        f"{resolved.get('seed', 0)}; NetVLAD with {by_name['triplet_netvlad']['settings']['netvlad_clusters']} "
        "centres from k-means of local features and its projection started as their PCA whitening. Evaluation: "
        f"leave-one-out retrieval on {data['eval_subset']} test images of the unseen "
        f"{classes(data.get('eval_classes'))} (metric stages: cosine). Mahalanobis whitens with the training "
        "split's covariance; LMNN learns its map from the training split's labels (classes no query belongs to).",
        "",
        "| embedding | distance | " + " | ".join(KEYS) + " | stage time (s) |",
        "|---|---|" + "---|" * (len(KEYS) + 1),
        row("raw pixels", "cosine", "pixels"),
    ]
    lines += [row("ImageNet, untouched", label, name) for name, label in DISTANCE_ROWS]
    lines += [row(f"triplet, {p} pooling", "cosine", f"triplet_{p}") for p in POOLINGS]
    lines += [row(f"{loss}, {best} pooling", "cosine", f"{loss}_{best}") for loss in AP_LOSSES]
    base_map = stages["triplet_avg"]["metrics"]["map_at_r"]
    better_pool = [p for p in POOLINGS[1:] if stages[f"triplet_{p}"]["metrics"]["map_at_r"] > base_map]
    better_ap = [loss for loss in AP_LOSSES[1:] if stages[f"{loss}_{best}"]["metrics"]["map_at_r"] > base_map]
    r1 = {name: stages[name]["metrics"]["recall_at_1"] for name, _ in DISTANCE_ROWS}
    met = lambda ok: "met" if ok else "not met"  # noqa: E731
    lines += [
        "",
        f"- Pooling against the avg-pooled triplet baseline (MAP@R {base_map:.4f}): "
        + ", ".join(f"{p} {stages[f'triplet_{p}']['metrics']['map_at_r'] - base_map:+.4f}" for p in POOLINGS[1:])
        + f" (goal, one pooling above it: {met(bool(better_pool))}); best pooling: **{best}**.",
        f"- AP losses with {best} pooling against the same baseline: "
        + ", ".join(f"{loss} {stages[f'{loss}_{best}']['metrics']['map_at_r'] - base_map:+.4f}" for loss in AP_LOSSES[1:])
        + f" (goal, one AP loss above it: {met(bool(better_ap))}).",
        f"- Learned distance on the ImageNet embedding, R@1: LMNN {r1['imagenet_lmnn']:.4f} against whitened "
        f"Mahalanobis {r1['imagenet_mahalanobis']:.4f} ({r1['imagenet_lmnn'] - r1['imagenet_mahalanobis']:+.4f}; goal, "
        f"LMNN above whitening: {met(r1['imagenet_lmnn'] > r1['imagenet_mahalanobis'])}); Euclidean "
        f"{r1['imagenet_euclidean']:.4f}, cosine {r1['imagenet']:.4f}.",
        "- One seed, one run per row.",
        "",
    ]
    print("\n".join(lines))
    if not args.quick or args.results != RESULTS:
        write_section(lines[0], "\n".join(lines[1:]), args.results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (RESULTS.md untouched)")
    parser.add_argument("--retrieval", action="store_true", help="the retrieval pieces (configs/fmnist_retrieval.yaml)")
    parser.add_argument("--reuse", action="store_true", help="report the last run again")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    add_results_argument(parser)
    args = parser.parse_args()
    if args.retrieval:
        return retrieval_main(args)
    size = QUICK if args.quick else FULL
    out = WORK / ("metric_quick" if args.quick else "metric")
    summary = run_pipeline(build_config(size), out, args.overrides, args.reuse)
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
        "| raw pixels | - | " + " | ".join(fmt(stages["pixels"]["metrics"].get(k)) for k in KEYS) + " | - |",
        "| random init, untrained | - | " + " | ".join(fmt(start_point.get(k)) for k in KEYS) + " | - |",
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
