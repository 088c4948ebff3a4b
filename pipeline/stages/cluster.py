"""Cluster stages: SCAN on a backbone input, then the learned clusters of the evaluation split with a confidence
per image (the kept head's probability), their metrics against labels when there are any, grids and a report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline.config import ClusterStage
from pipeline.context import RunContext
from pipeline.stages.base import StageResult, StageRun
from pipeline.stages.training import TrainingExecutor, train_stage


class ClusterExecutor(TrainingExecutor):
    def check(self, ctx: RunContext, stage: ClusterStage) -> None:
        """An unlabeled collection has no class count to take C from: refused before anything starts."""
        from pipeline.data import DataError

        super().check(ctx, stage)
        if stage.clusters is None and (ctx.evalset is None or ctx.evalset.labels is None):
            raise DataError(f"stage '{stage.name}': the data has no labels to count clusters from; set "
                            "clusters: <C> or clusters: auto")

    def run(self, ctx: RunContext, stage: ClusterStage, run: StageRun) -> StageResult:
        from downstream.knn import nearest_neighbours
        from pipeline.evaluate import backbone_features

        t0 = time.time()
        features = backbone_features(Path(run.input_backbone), ctx.train.images, batch_size=512)
        k = min(int(stage.settings["num_neighbors"]), len(features) - 1)
        neighbours = nearest_neighbours(features, k)
        mined = {"neighbours": float(k), "mining_time_s": time.time() - t0}
        if ctx.train.labels is not None:  # how often a mined neighbour shares the image's class (SCAN reports it)
            agree = float((ctx.train.labels[neighbours] == ctx.train.labels[:, None]).mean())
            mined["neighbour_label_agreement"] = agree
            ctx.log(f"[{stage.name}] {k} neighbours per image; {agree:.3f} of them share the image's label")
        clusters = self._clusters(ctx, stage, features)
        result = train_stage(ctx, stage.job(clusters), run, neighbours=neighbours)
        result.metrics.update(mined, clusters=float(clusters))
        metrics, artifacts = assign(ctx, stage, Path(result.artifacts["backbone"]), ctx.stage_dir(stage.name))
        result.metrics.update(metrics)
        result.artifacts.update(artifacts)
        return result

    def final_metrics(self, result: StageResult) -> dict[str, float]:
        return result.metrics

    @staticmethod
    def _clusters(ctx: RunContext, stage: ClusterStage, features: np.ndarray) -> int:
        if isinstance(stage.clusters, int):
            return stage.clusters
        if stage.clusters is None:
            return int(len(np.unique(ctx.evalset.labels)))
        from clustering import choose_k, l2_normalize

        lo, hi = stage.clusters_range
        chosen = choose_k(l2_normalize(features), lo, min(hi, len(features) - 1), seed=ctx.config.seed)
        ctx.log(f"[{stage.name}] clusters: auto chose C={chosen.k} by the silhouette of k-means on the input "
                "embedding: " + "  ".join(f"{c}:{v:.3f}" for c, v in chosen.silhouettes.items()))
        return int(chosen.k)


def assign(ctx: RunContext, stage: ClusterStage, model: Path, out_dir: Path) -> tuple[dict, dict]:
    """The cluster model's assignments of the evaluation split (the kept head's most probable cluster, its
    probability as the confidence), metrics, and the files an evaluate stage writes (pipeline.evaluate)."""
    from clustering import ClusterResult, cluster_metrics, html_report
    from pipeline.config import EvaluateStage
    from pipeline.evaluate import backbone_features, cluster_outputs

    evalset = ctx.evalset
    out_dir.mkdir(parents=True, exist_ok=True)
    probs = np.asarray(backbone_features(model, evalset.images, batch_size=512))
    confidence = probs.max(axis=1).astype(np.float32)
    result = ClusterResult(assignments=probs.argmax(axis=1).astype(np.int64), distances=1.0 - confidence,
                           centroids=np.eye(probs.shape[1], dtype=np.float32), inertia=0.0, confidence=confidence)
    sizes = np.bincount(result.assignments, minlength=probs.shape[1]) / len(probs)
    metrics = {
        "confident_share": float((confidence > stage.settings["confidence_threshold"]).mean()),
        "confidence_mean": float(confidence.mean()),
        "cluster_size_entropy": float(-(sizes[sizes > 0] * np.log(sizes[sizes > 0])).sum()),
        "clusters_used": float((sizes > 0).sum()),
    }
    if evalset.labels is not None:
        metrics.update(cluster_metrics(evalset.labels, result.assignments))
        ctx.log(f"[{stage.name}] SCAN clusters: NMI {metrics['nmi']:.4f}  ARI {metrics['ari']:.4f}  accuracy "
                f"{metrics['cluster_accuracy']:.4f}; {metrics['confident_share']:.3f} of images above the threshold")
    artifacts: dict[str, str] = {}
    figures: list[tuple[str, str]] = []
    tables: dict = {}
    default = {k: EvaluateStage.model_fields[k].default
               for k in ("grid_per_cluster", "cluster_page_images", "uncertain_images")}
    pages = cluster_outputs(stage.name, evalset, result, probs.shape[1], out_dir,
                            per_cluster=default["grid_per_cluster"], per_page=default["cluster_page_images"],
                            uncertain=default["uncertain_images"], artifacts=artifacts, figures=figures, tables=tables)
    np.save(out_dir / "probabilities.npy", probs)
    artifacts["probabilities"] = str(out_dir / "probabilities.npy")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    artifacts["metrics"] = str(out_dir / "metrics.json")
    artifacts["report"] = str(html_report(
        out_dir / "report.html", title=f"{stage.name}: SCAN clusters", metrics=metrics, figures=figures,
        tables=tables, pages=[(f"cluster {c}", p) for c, p in enumerate(pages)],
        links=[("cluster assignments (CSV)", artifacts["assignments"]), ("metrics (JSON)", artifacts["metrics"]),
               ("the least confident images (PNG)", artifacts["uncertain"])]))
    return metrics, artifacts
