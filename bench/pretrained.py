"""Pretrained starts on Fashion-MNIST: raw pixels, the ImageNet MobileNetV2 untouched, the same backbone after a
short SimCLR adaptation (configs/quickstart.yaml, the demo), the ImageNet MobileNetV2 distilled into a random-init
resnet18 and SimCLR from scratch on the same resnet18 for a comparable training time (both times reported)
(configs/fmnist_distill.yaml). Both configs read the same training subset (the kNN memory bank) and test images.

Needs `make weights` (~/.cache/sslpipe/weights/mobilenetv2_100.in1k.safetensors).

Usage: python bench/pretrained.py [--quality-data] [--reuse]     (writes a section of bench/RESULTS.md; with
--quality-data both configs read bench/quality.py's images, into their own folders and section)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.pretext import WORK, resolved, run  # noqa: E402
from bench.quality import measured_sizes  # noqa: E402
from bench.results import add_results_argument, write_section  # noqa: E402
from bench.speed import machine  # noqa: E402

CONFIGS = ("quickstart", "fmnist_distill")
TITLE = "## Pretrained starts on Fashion-MNIST (bench/pretrained.py)"
TITLE_QUALITY_DATA = "## Pretrained starts on Fashion-MNIST, bench/quality.py's images (bench/pretrained.py --quality-data)"


def out_dir(config: str, quality_data: bool = False) -> Path:
    return WORK / f"pretrained_{config}{'_quality_data' if quality_data else ''}"


def quality_data_sets() -> list[str]:
    """--set overrides giving a run bench/quality.py's images: configs/fmnist_simclr.yaml's training subset (the
    memory bank) and test subset (unset: the whole test split)."""
    from pipeline.config import load_config

    data = load_config(ROOT / "configs" / "fmnist_simclr.yaml").data
    return [f"data.train_subset={data.train_subset}",
            f"data.eval_subset={'null' if data.eval_subset is None else data.eval_subset}"]


def training(cfg, stages: dict, name: str) -> tuple[str, str]:
    """("images x epochs", stage time) of a training stage."""
    stage, m = cfg.stage(name), stages[name]["metrics"]
    return f"{cfg.data.train_subset} x {stage.epochs}", f"{m['stage_time_s']:.0f}"



def loop(cfg, stages: dict, name: str) -> float:
    """The training loop's time without the stage's start-up: epochs x the last epoch's wall time."""
    return cfg.stage(name).epochs * stages[name]["metrics"]["epoch_time_s"]



def knn_hits(artifact: Path, train, evalset, expected: float) -> np.ndarray:
    """Per test image: does the kNN vote (k=200, t=0.1, its copies in the bank excluded) name its class; the
    terms of the stage's kNN accuracy, recomputed from the artifact (checked against the stage's figure)."""
    from downstream.knn import knn_predict
    from pipeline.evaluate import backbone_features, self_matches

    exclude, _ = self_matches(evalset, train)
    predicted = knn_predict(backbone_features(artifact, train.images, 512), train.labels,
                            backbone_features(artifact, evalset.images, 512), k=200, temperature=0.1, exclude=exclude)
    hits = predicted == evalset.labels
    if abs(hits.mean() - expected) > 1e-6:
        raise RuntimeError(f"{artifact}: kNN accuracy {hits.mean():.4f} disagrees with the stage's {expected:.4f}")
    return hits


def paired_lines(qc, q: dict, d: dict, quickstart_out: Path) -> list[str]:
    """kNN accuracy differences paired on the same test images, with 95% bootstrap intervals over the images."""
    from bench.quality import read_splits
    from bench.stml import paired_recall_at_1 as paired  # a paired bootstrap of two boolean hit vectors

    train, evalset = read_splits(qc)
    start = next(quickstart_out.joinpath("inputs").glob("pretrained-*"))
    art = {"imagenet": start, "adapted": Path(q["simclr"]["artifacts"]["backbone"]),
           "student": Path(d["distill"]["artifacts"]["backbone"]), "scratch": Path(d["simclr"]["artifacts"]["backbone"])}
    knn = {"imagenet": q["imagenet"], "adapted": q["evaluate"], "student": d["eval_distill"], "scratch": d["eval_simclr"]}
    hits = {k: knn_hits(a, train, evalset, knn[k]["metrics"]["knn_accuracy"]) for k, a in art.items()}
    return [f"- kNN accuracy paired on the same {len(evalset)} test images (difference, 95% bootstrap interval over the "
            f"images, 10000 rounds; one training seed): adapted against its ImageNet start "
            f"{paired(hits['imagenet'], hits['adapted'])}; student against SimCLR from scratch "
            f"{paired(hits['scratch'], hits['student'])}."]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs under bench/_work")
    parser.add_argument("--quality-data", action="store_true",
                        help="bench/quality.py's images (20000-image bank, the whole test split) instead of the configs' own")
    add_results_argument(parser)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    sets = quality_data_sets() if args.quality_data else []
    outs = {c: out_dir(c, args.quality_data) for c in CONFIGS}
    runs = {c: run(c, args.reuse, sets, out=outs[c]) for c in CONFIGS}
    cfgs = {c: resolved(c, outs[c]) for c in CONFIGS}
    data = {c: cfg.data.model_dump() for c, cfg in cfgs.items()}
    if data["quickstart"] != data["fmnist_distill"]:
        raise SystemExit("configs/quickstart.yaml and configs/fmnist_distill.yaml read different data: the rows "
                         "would not share a memory bank and test set")
    q, d = runs["quickstart"]["stages"], runs["fmnist_distill"]["stages"]
    qc, dc = cfgs["quickstart"], cfgs["fmnist_distill"]
    mb, rn = qc.backbone, dc.backbone
    mobilenet = f"{mb.name} ImageNet, {mb.image_size} px"
    resnet = f"{rn.name} random init, small stem stride {rn.stem_stride}, {rn.image_size} px"
    rows = [
        ("raw pixels", "-", "-", "-", q["pixels"]["metrics"]),
        ("ImageNet MobileNetV2, untouched", mobilenet, "-", "-", q["imagenet"]["metrics"]),
        ("ImageNet + SimCLR adaptation", mobilenet, *training(qc, q, "simclr"), q["evaluate"]["metrics"]),
        ("ImageNet MobileNetV2 distilled (student)", resnet, *training(dc, d, "distill"), d["eval_distill"]["metrics"]),
        ("SimCLR from scratch", resnet, *training(dc, d, "simclr"), d["eval_simclr"]["metrics"]),
    ]
    train_n, eval_n = measured_sizes(qc)
    simclr, distill = qc.stage("simclr"), dc.stage("distill")
    lines = [
        TITLE_QUALITY_DATA if args.quality_data else TITLE,
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/pretrained.py{' --quality-data' if args.quality_data else ''}"
        f"{' --reuse' if args.reuse else ''}` (configs/quickstart.yaml and configs/fmnist_distill.yaml"
        f"{', ' + ' '.join('--set ' + x for x in sets) if sets else ''}). {qc.data.source}: {train_n} training "
        f"images (unlabeled for training; also the kNN memory bank), {eval_n} test images, the same for every row"
        f"{' and as bench/quality.py' if args.quality_data else ' (bench/quality.py: --quality-data)'}. "
        "kNN: cosine, weighted vote, k=200, t=0.1; NMI: k-means k=10 on L2-normalized "
        f"features. Adaptation: SimCLR from the ImageNet weights, lr {simclr.optimizer.lr:g}. Distillation: teacher "
        f"the same ImageNet file ({distill.settings['teacher'].get('input_size')} px), loss "
        f"{distill.settings['loss']}, targets {distill.settings.get('targets', 'view')}, mixup "
        f"{str(distill.settings.get('mixup', True)).lower()}, crops min_scale "
        f"{distill.settings.get('augment', {}).get('min_scale', 0.2)}, lr {distill.optimizer.lr:g}; SimCLR from scratch with the demo's former "
        "settings (lr 0.002). Stage times are wall seconds of the training stage.",
        "",
        "| features | backbone | train images x epochs | stage time (s) | kNN accuracy | k-means NMI | ARI | cluster acc. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, backbone, size, t, m in rows:
        lines.append(f"| {label} | {backbone} | {size} | {t} | {m['knn_accuracy']:.4f} | {m['nmi']:.4f} | "
                     f"{m['ari']:.4f} | {m['cluster_accuracy']:.4f} |")
    knn = {label: m["knn_accuracy"] for label, *_, m in rows}
    pixels, imagenet, adapted, student, scratch = knn.values()
    ratio = d["distill"]["metrics"]["stage_time_s"] / d["simclr"]["metrics"]["stage_time_s"]
    lines += [
        "",
        f"- Adapted backbone against pixels: kNN {adapted - pixels:+.4f}; against its ImageNet start: "
        f"{adapted - imagenet:+.4f} (goal: above both: {'met' if adapted > max(pixels, imagenet) else 'not met'} on the "
        "point estimates; the paired interval is below).",
        f"- Student against its teacher (the untouched ImageNet row): {student / imagenet:.3f} of its kNN (goal 0.95: "
        f"{'met' if student >= 0.95 * imagenet else 'not met'}); against SimCLR from scratch: {student - scratch:+.4f} "
        f"(goal: above: {'met' if student > scratch else 'not met'}); distillation took {ratio:.2f}x SimCLR's stage time "
        f"(epochs x last epoch's time: {loop(dc, d, 'distill'):.0f} s against {loop(dc, d, 'simclr'):.0f} s; the rest of a "
        "stage is Ray Train's start, building the teacher, its pass over the training images when its targets are "
        "cached, and held-out metrics).",
        *paired_lines(qc, q, d, outs["quickstart"]),
        "",
    ]
    print("\n".join(lines))
    write_section(lines[0], "\n".join(lines[1:]), args.results)


if __name__ == "__main__":
    main()
