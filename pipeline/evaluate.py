"""The evaluate stage: embed the splits, kNN accuracy, k-means and its metrics, plots, assignments.

Raw pixels (`input: pixels`) go through the same path, so every backbone is judged against the same
baseline with the same code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.data import ImageSet


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def pixel_features(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def backbone_features(artifact: Path, images: np.ndarray, batch_size: int) -> np.ndarray:
    from downstream.embeddings import embed_images
    from pipeline.backbones import load_backbone

    model, meta = load_backbone(artifact, with_meta=True)
    return embed_images(
        model,
        images,
        input_size=meta["input_size"],
        mean=meta["mean"],
        std=meta["std"],
        in_chans=meta["in_chans"],
        input_transform=meta.get("input_transform", "rgb"),
        batch_size=batch_size,
    )


def quick_evaluate(artifact: Path, train: ImageSet, evalset: ImageSet, *, k: int = 200, temperature: float = 0.1,
                   seed: int = 0, batch_size: int = 512) -> dict[str, float]:
    """kNN accuracy and k-means NMI only: what a pretext stage reports about its backbone."""
    from clustering import kmeans, nmi
    from downstream.knn import knn_accuracy

    train_x = backbone_features(artifact, train.images, batch_size)
    eval_x = backbone_features(artifact, evalset.images, batch_size)
    clusters = len(np.unique(evalset.labels))
    km = kmeans(_l2_normalize(eval_x), min(clusters, len(eval_x)), seed=seed)
    return {
        "knn_accuracy": knn_accuracy(train_x, train.labels, eval_x, evalset.labels, k=k, temperature=temperature),
        "nmi": nmi(evalset.labels, km.assignments),
    }


def evaluate(
    stage: dict[str, Any],
    *,
    artifact: Path | None,
    train: ImageSet,
    evalset: ImageSet,
    out_dir: Path,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, float], dict[str, str]]:
    """Returns (metrics, artifacts) for one backbone (or raw pixels when `artifact` is None)."""
    from clustering import cluster_grid, cluster_metrics, embedding_2d, kmeans, scatter_plot, write_assignments
    from downstream.knn import knn_accuracy

    out_dir.mkdir(parents=True, exist_ok=True)
    name = stage["name"]
    metrics: dict[str, float] = {}
    artifacts: dict[str, str] = {}

    t0 = time.time()
    if artifact is None:
        train_x, eval_x = pixel_features(train.images), pixel_features(evalset.images)
    else:
        train_x = backbone_features(artifact, train.images, stage["batch_size"])
        eval_x = backbone_features(artifact, evalset.images, stage["batch_size"])
    metrics["embed_time_s"] = time.time() - t0
    log(f"[{name}] embedded {len(train_x)} + {len(eval_x)} images ({eval_x.shape[1]}-d) in {metrics['embed_time_s']:.1f}s")

    shared_classes = (
        train.labels is not None and evalset.labels is not None
        and bool(set(np.unique(train.labels)) & set(np.unique(evalset.labels)))
    )
    if shared_classes:  # with disjoint classes (unseen-class protocol) a kNN vote cannot be right
        metrics["knn_accuracy"] = knn_accuracy(
            train_x, train.labels, eval_x, evalset.labels, k=stage["knn_k"], temperature=stage["knn_temperature"]
        )
        log(f"[{name}] kNN accuracy (k={stage['knn_k']}, t={stage['knn_temperature']}): {metrics['knn_accuracy']:.4f}")

    if stage.get("retrieval") and evalset.labels is not None:
        from downstream.retrieval import retrieval_metrics

        metrics.update(retrieval_metrics(eval_x, evalset.labels))
        log(f"[{name}] retrieval: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in
                                                 ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r")))

    k = stage["clusters"] or (len(np.unique(evalset.labels)) if evalset.labels is not None else 10)
    k = min(k, len(eval_x))
    feats = _l2_normalize(eval_x)
    t0 = time.time()
    km = kmeans(feats, k, niter=stage["kmeans_iterations"], seed=seed)
    metrics["kmeans_time_s"] = time.time() - t0
    metrics["kmeans_inertia"] = float(km.inertia)
    metrics["clusters"] = float(k)
    if evalset.labels is not None:
        metrics.update(cluster_metrics(evalset.labels, km.assignments))
        log(
            f"[{name}] k-means (k={k}): NMI {metrics['nmi']:.4f}  ARI {metrics['ari']:.4f}  "
            f"accuracy {metrics['cluster_accuracy']:.4f}  purity {metrics['purity']:.4f}"
        )

    ids = evalset.ids if evalset.ids is not None else list(range(len(evalset)))
    assignments = out_dir / "assignments.csv"
    write_assignments(assignments, ids, km.assignments, km.distances, labels=evalset.labels)
    artifacts["assignments"] = str(assignments)
    grid = cluster_grid(evalset.images, km.assignments, km.distances, out_dir / "cluster_grid.png",
                        per_cluster=stage["grid_per_cluster"])
    artifacts["cluster_grid"] = str(grid)
    np.save(out_dir / "embeddings.npy", eval_x)
    artifacts["embeddings"] = str(out_dir / "embeddings.npy")

    if stage["tsne"]:
        t0 = time.time()
        coords, kept = embedding_2d(feats, method="tsne", max_points=stage["tsne_points"], seed=seed)
        colorings = {"cluster": km.assignments[kept]}
        if evalset.labels is not None:
            colorings = {"label": evalset.labels[kept], **colorings}
        plot = scatter_plot(coords, colorings, out_dir / "tsne.png", title=f"{name}: t-SNE of {len(kept)} images")
        artifacts["tsne"] = str(plot)
        metrics["tsne_time_s"] = time.time() - t0

    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    artifacts["metrics"] = str(out_dir / "metrics.json")
    return metrics, artifacts
