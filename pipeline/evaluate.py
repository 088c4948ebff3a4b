"""The evaluate stage: embed the splits, kNN accuracy, k-means and its metrics, plots, assignments.

Raw pixels (`input: pixels`) go through the same path, so every backbone is judged against the same
baseline with the same code.

No nearest-neighbour metric may find a query's own image: on a folder without train/ and test/ the
evaluation split IS the training split, and every kNN query would find its copy in the bank (raw pixels
scored 0.88 on random labels, chance 0.14). :func:`self_matches` says, per evaluation image, which training
(or, for leave-one-out retrieval, evaluation) images are the same image: same id (source path) when both
sets carry ids, else the same pixels (ImageSet.row_digests). kNN and retrieval leave those out; the metrics
`knn_excluded_matches` / `retrieval_excluded_matches` count the removed pairs and metrics.json records the rule.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.config import EvaluateStage
from pipeline.data import ImageSet


def pixel_features(images, chunk: int = 4096) -> np.ndarray:
    """Raw pixels in [0, 1] as float32 (N, C*H*W), filled a chunk of rows at a time so that an array-like
    that reads its rows from disk is never copied whole as uint8 besides the features."""
    out = np.empty((len(images), int(np.prod(images.shape[1:]))), dtype=np.float32)
    for start in range(0, len(images), chunk):
        rows = np.asarray(images[start : start + chunk])
        out[start : start + len(rows)] = rows.reshape(len(rows), -1)
    out /= 255.0
    return out


def check_pixel_budget(stage: EvaluateStage, train: ImageSet, evalset: ImageSet) -> None:
    """The pixels baseline holds every image of both splits as float32 features: refuse (DataError) a set
    that would not fit in `stage.pixels_max_gib`, before any stage runs, rather than run out of memory."""
    from pipeline.data import DataError

    need = 4 * sum(len(s) * int(np.prod(s.images.shape[1:])) for s in (train, evalset))
    limit = stage.pixels_max_gib * 2**30
    if need > limit:
        raise DataError(
            f"stage '{stage.name}': the raw-pixel baseline (input: pixels) would hold {len(train) + len(evalset)} "
            f"images ({len(train)} train + {len(evalset)} evaluation) as float32 features: {need / 2**30:.3g} GiB "
            f"({need} bytes), over its limit pixels_max_gib: {stage.pixels_max_gib:g} GiB. Evaluate a backbone "
            "input instead, or subsample the splits with data.train_subset / data.eval_subset"
        )


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # never imported means not running: not worth importing Ray to ask
    return ray is not None and ray.is_initialized()


def backbone_features(artifact: Path, images, batch_size: int, *, bare: bool = False, pooling: str = "avg",
                      out_path: Path | None = None) -> np.ndarray:
    """Embeddings of `images` by the artifact's exported module, or by its backbone alone with `bare` (pooled
    by GeM with `pooling="gem"`).

    Images that are not an in-memory array (the streamed backend's array-like, whose rows are read from
    files) are embedded on the Ray cluster when Ray is running (:mod:`pipeline.cluster_embed`: one actor per
    GPU, else one per 4 CPUs), into a .npy memory map at `out_path` (a temporary file, removed once mapped,
    when None). An np.ndarray, np.memmap included, is embedded in this process, as is everything without Ray.
    """
    from pipeline.backbones import embed_with, load_backbone

    if not isinstance(images, np.ndarray) and _ray_running():
        import ray

        from pipeline.cluster_embed import embed_on_cluster

        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        options = dict(batch_size=batch_size, bare=bare, pooling=pooling, use_gpu=gpus > 0,
                       concurrency=gpus or max(1, int(resources.get("CPU", 1)) // 4))
        if out_path is not None:
            return embed_on_cluster(artifact, images, out_path=out_path, **options)
        with tempfile.TemporaryDirectory() as scratch:  # the memory map outlives its removed file
            return embed_on_cluster(artifact, images, out_path=Path(scratch) / "embeddings.npy", **options)
    model, meta = load_backbone(artifact, with_meta=True, bare=bare, pooling=pooling)
    return embed_with(model, meta, images, batch_size)


def same_images(a: ImageSet, b: ImageSet) -> bool:
    """Whether two splits hold the same images in the same order (data.train_split = data.eval_split): their
    embeddings are then computed once. Compared by row digests, which the stream backend has without reading
    pixels."""
    if a is b:
        return True
    if len(a) != len(b) or tuple(a.images.shape[1:]) != tuple(b.images.shape[1:]):
        return False
    return bool(np.array_equal(a.row_digests(), b.row_digests()))


def identity_rule(a: ImageSet, b: ImageSet) -> str:
    """How images of `a` and `b` are recognised as the same image: "id" when both carry ids, else "pixels"."""
    return "id" if a.ids is not None and b.ids is not None else "pixels"


def self_matches(queries: ImageSet, bank: ImageSet):
    """(Exclusion, rule): per query image, the bank images that ARE it, by id when both sets carry ids
    (rule "id"), else by pixel digest (rule "pixels"). See downstream.exclusion.Exclusion."""
    from downstream.exclusion import Exclusion

    query_keys, bank_keys, rule = queries.identity_keys(bank)
    return Exclusion.by_key(query_keys, bank_keys), rule


def quick_evaluate(artifact: Path, train: ImageSet, evalset: ImageSet, *, k: int = 200, temperature: float = 0.1,
                   seed: int = 0, batch_size: int = 512) -> dict[str, float]:
    """kNN accuracy (each evaluation image's own copies in the training split excluded, see
    :func:`self_matches`) and k-means NMI only: what a pretext stage reports about its backbone and what
    `sslpipe retrain` compares."""
    from clustering import kmeans, l2_normalize, nmi
    from downstream.knn import knn_accuracy

    exclude, _ = self_matches(evalset, train)
    train_x = backbone_features(artifact, train.images, batch_size)
    eval_x = backbone_features(artifact, evalset.images, batch_size)
    clusters = len(np.unique(evalset.labels))
    km = kmeans(l2_normalize(eval_x), min(clusters, len(eval_x)), seed=seed)
    return {
        "knn_accuracy": knn_accuracy(train_x, train.labels, eval_x, evalset.labels, k=k, temperature=temperature,
                                     exclude=exclude),
        "nmi": nmi(evalset.labels, km.assignments),
        "knn_excluded_matches": float(exclude.total),
    }


def _retrieval(stage: EvaluateStage, train_x: np.ndarray, train: ImageSet, eval_x: np.ndarray,
               evalset: ImageSet, seed: int, log: Callable[[str], None]) -> dict[str, float]:
    """Retrieval metrics of the evaluation split: leave-one-out, or eval queries against the train split;
    either way without the query's own image in the gallery (:func:`self_matches`). Past the exact limit,
    a `seed`ed sample of queries and a capped depth (see downstream.retrieval.retrieval_metrics)."""
    from downstream.retrieval import relevant_counts, retrieval_metrics

    name = stage.name
    gallery = stage.retrieval_gallery
    distance = stage.retrieval_distance
    if gallery == "train" and train.labels is None:
        log(f"[{name}] retrieval against the train split skipped: the train split has no labels")
        return {}
    g_set = train if gallery == "train" else evalset
    exclude, rule = self_matches(evalset, g_set)
    if not (relevant_counts(evalset.labels, g_set.labels, leave_one_out=False, exclude=exclude) > 0).any():
        why = "shares no class with the train split" if gallery == "train" else "has no two images of one class"
        log(f"[{name}] retrieval skipped: the evaluation split {why}")
        return {}
    metrics = retrieval_metrics(
        eval_x, evalset.labels, ks=stage.recall_at, metric=distance,
        gallery_features=train_x if gallery == "train" else eval_x, gallery_labels=g_set.labels,
        train_features=train_x, shrinkage=stage.mahalanobis_shrinkage, exclude=exclude,
        max_queries=stage.retrieval_max_queries, max_depth=stage.retrieval_max_depth, seed=seed,
        train_labels=train.labels,
    )
    log(f"[{name}] retrieval: {exclude.total} query-gallery pairs left out as the same image "
        f"(rule: same {rule})")
    recalls = sorted((k for k in metrics if k.startswith("recall_at_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    shown = [k for k in recalls + ["r_precision", "map_at_r", "r_precision_capped", "map_at_r_capped", "map"]
             if k in metrics]
    bounds = ""
    if "retrieval_sampled_queries" in metrics:
        bounds += f" of a seeded sample of {int(metrics['retrieval_sampled_queries'])} of {len(eval_x)}"
    if "retrieval_depth_cap" in metrics:
        bounds += f", R capped at depth {int(metrics['retrieval_depth_cap'])}"
    log(f"[{name}] retrieval ({distance}, gallery: {'leave-one-out' if gallery == 'eval' else 'train split'}, "
        f"{int(metrics['retrieval_queries'])} queries{bounds}): " + "  ".join(f"{k} {metrics[k]:.4f}" for k in shown))
    return metrics


def _two_d_plot(method: str, feats: np.ndarray, assignments: np.ndarray, evalset: ImageSet, stage: EvaluateStage,
                out_dir: Path, seed: int) -> tuple[str, float]:
    from clustering import embedding_2d, scatter_plot

    t0 = time.time()
    coords, kept = embedding_2d(feats, method=method, max_points=stage.tsne_points, seed=seed)
    colorings = {"cluster": assignments[kept]}
    if evalset.labels is not None:
        colorings = {"label": evalset.labels[kept], **colorings}
    label = {"tsne": "t-SNE", "umap": "UMAP"}[method]
    plot = scatter_plot(coords, colorings, out_dir / f"{method}.png",
                        title=f"{stage.name}: {label} of {len(kept)} images")
    return str(plot), time.time() - t0


_METRIC_NAMES = (("nmi", "NMI"), ("ari", "ARI"), ("cluster_accuracy", "accuracy"), ("purity", "purity"),
                 ("pair_f1", "pair F1"))
LEAST_CONFIDENT_LISTED = 5  # per cluster, in the report's table


def _method_name(stage: EvaluateStage, dim: int) -> str:
    """How the chosen clustering reads in logs and the report, e.g. "GMM (full covariance) on UMAP-10"."""
    from clustering.gmm import default_covariance

    if stage.cluster_algorithm == "gmm":
        method = f"GMM ({default_covariance(dim)} covariance)"
    else:
        method = f"{'spherical ' if stage.spherical_kmeans and stage.cluster_space == 'embedding' else ''}k-means"
    spaces = {"umap": f" on UMAP-{stage.umap_components}", "lmnn": " in the LMNN space"}
    return method + spaces.get(stage.cluster_space, "")


def _cluster(stage: EvaluateStage, feats: np.ndarray, evalset: ImageSet, out_dir: Path, seed: int,
             log: Callable[[str], None], metrics: dict, artifacts: dict, figures: list, tables: dict,
             train_feats: np.ndarray | None = None, train_labels: np.ndarray | None = None):
    """The chosen clustering of the L2-normalized features: (result, k), its metrics added to `metrics`.

    `cluster_space: umap` clusters UMAP coordinates of `feats` (cosine; saved as cluster_space.npy), where
    spherical k-means does not apply (the coordinates are not directions); `cluster_space: lmnn` clusters
    `feats` mapped by LMNN fitted on the L2-normalized training features and their labels (downstream.lmnn),
    so the clusters follow the distance the labels teach. `cluster_algorithm: gmm` fits a
    Gaussian mixture. Either way plain k-means on the embedding is run too, with the same k, and reported as
    embedding_kmeans_* next to the chosen one; the unprefixed metrics (nmi, ...) are the chosen clustering's.
    """
    from clustering import choose_k, cluster_metrics, gmm, kmeans, silhouette_plot, umap_reduce

    name = stage.name
    umap_space = stage.cluster_space == "umap"
    mapped_space = stage.cluster_space != "embedding"
    use_gmm = stage.cluster_algorithm == "gmm"
    spherical = bool(stage.spherical_kmeans) and not mapped_space
    space = feats
    if umap_space:
        t0 = time.time()
        space, fitted = umap_reduce(feats, stage.umap_components, metric="cosine", n_neighbors=stage.umap_neighbors,
                                    fit_sample=stage.umap_fit_sample, seed=seed)
        metrics["cluster_umap_time_s"] = time.time() - t0
        metrics["cluster_umap_fit_points"] = float(fitted.size)
        np.save(out_dir / "cluster_space.npy", space)
        artifacts["cluster_space"] = str(out_dir / "cluster_space.npy")
        log(f"[{name}] UMAP to {stage.umap_components}-d (cosine, {stage.umap_neighbors} neighbours) fitted on "
            f"{fitted.size} of {len(feats)} images in {metrics['cluster_umap_time_s']:.1f}s")
    elif stage.cluster_space == "lmnn":
        from clustering import l2_normalize
        from downstream.lmnn import fit_lmnn

        if train_feats is None or train_labels is None:
            raise ValueError(f"stage '{name}': cluster_space lmnn learns its map from the training split's labels")
        t0 = time.time()
        mean, matrix = fit_lmnn(l2_normalize(train_feats), train_labels, seed=seed)
        space = np.ascontiguousarray((feats - mean) @ matrix, dtype=np.float32)
        metrics["cluster_lmnn_time_s"] = time.time() - t0
        np.save(out_dir / "cluster_space.npy", space)
        artifacts["cluster_space"] = str(out_dir / "cluster_space.npy")
        log(f"[{name}] LMNN map fitted on the training split's labels in {metrics['cluster_lmnn_time_s']:.1f}s")
    method = _method_name(stage, space.shape[1])
    iterations = stage.gmm_iterations if use_gmm else stage.kmeans_iterations

    t0 = time.time()
    if stage.clusters == "auto":
        rng = stage.choose_k or EvaluateStage.ChooseK()
        chosen = choose_k(space, rng.min, min(rng.max, len(feats) - 1), spherical=spherical, niter=iterations,
                          seed=seed, algorithm=stage.cluster_algorithm)
        k, result = chosen.k, chosen.result
        metrics["silhouette"] = chosen.silhouettes[k]
        plot = silhouette_plot(chosen.silhouettes, k, out_dir / "silhouette_vs_k.png",
                               title=f"{name}: silhouette vs k ({method})")
        artifacts["silhouette_vs_k"] = str(plot)
        figures.append(("silhouette vs k", str(plot)))
        header, rows = ["k", "silhouette"], [[kk, v] for kk, v in chosen.silhouettes.items()]
        if chosen.bics:
            header, rows = header + ["BIC"], [row + [chosen.bics[row[0]]] for row in rows]
        tables["Choosing k"] = (header, rows)
        log(f"[{name}] chose k={k} by silhouette ({method}) over k={min(chosen.silhouettes)}.."
            f"{max(chosen.silhouettes)}: " + "  ".join(f"{kk}:{v:.3f}" for kk, v in chosen.silhouettes.items()))
    else:
        k = stage.clusters or (len(np.unique(evalset.labels)) if evalset.labels is not None else 10)
        k = min(k, len(feats))
        if use_gmm:
            result = gmm(space, k, max_iter=iterations, n_init=stage.kmeans_restarts, seed=seed)
        else:
            result = kmeans(space, k, niter=iterations, nredo=stage.kmeans_restarts, seed=seed, spherical=spherical)
    elapsed = time.time() - t0
    if use_gmm:
        metrics.update(gmm_time_s=elapsed, gmm_bic=float(result.bic), gmm_converged=float(bool(result.converged)))
        if not result.converged:
            log(f"[{name}] WARNING: the GMM did not converge in gmm_iterations: {iterations}")
    else:
        metrics.update(kmeans_time_s=elapsed, kmeans_inertia=float(result.inertia))
    metrics["clusters"] = float(k)
    metrics["confidence_mean"] = float(np.mean(result.confidence))
    if evalset.labels is not None:
        metrics.update(cluster_metrics(evalset.labels, result.assignments))
        log(f"[{name}] {method} (k={k}): " + "  ".join(f"{label} {metrics[key]:.4f}" for key, label in _METRIC_NAMES))

    if mapped_space or use_gmm:  # the plain k-means on the embedding, next to the chosen clustering
        t0 = time.time()
        plain = kmeans(feats, k, niter=stage.kmeans_iterations, nredo=stage.kmeans_restarts, seed=seed,
                       spherical=bool(stage.spherical_kmeans))
        metrics["embedding_kmeans_time_s"] = time.time() - t0
        metrics["embedding_kmeans_inertia"] = float(plain.inertia)
        if evalset.labels is not None:
            plain_metrics = cluster_metrics(evalset.labels, plain.assignments)
            metrics.update({f"embedding_kmeans_{key}": value for key, value in plain_metrics.items()})
            plain_method = f"{'spherical ' if stage.spherical_kmeans else ''}k-means on the embedding"
            log(f"[{name}] {plain_method} (k={k}): "
                + "  ".join(f"{label} {plain_metrics[key]:.4f}" for key, label in _METRIC_NAMES))
            tables["Chosen clustering and plain k-means"] = (
                ["clustering"] + [label for _, label in _METRIC_NAMES],
                [[f"{method} (chosen)"] + [metrics[key] for key, _ in _METRIC_NAMES],
                 [plain_method] + [plain_metrics[key] for key, _ in _METRIC_NAMES]],
            )
    return result, k


def _uncertain_page(name: str, count: int, evalset: ImageSet, result, class_names, out_dir: Path) -> str:
    """uncertain.png: the `count` least confident images, least first, each captioned with its cluster and
    confidence (and class when known)."""
    from clustering import image_page

    order = np.argsort(result.confidence, kind="stable")[:count]
    captions = [f"c{int(result.assignments[i])} {float(result.confidence[i]):.2f}"
                + (f"\n{class_names[i]}" if class_names is not None else "") for i in order]
    return image_page(evalset.images, order, out_dir / "uncertain.png", captions=captions,
                      title=f"{name}: the {len(order)} least confident of {len(evalset)} images "
                            "(cluster, confidence)")


def cluster_outputs(name: str, evalset: ImageSet, result, k: int, out_dir: Path, *, per_cluster: int,
                    per_page: int, uncertain: int, artifacts: dict, figures: list, tables: dict) -> list[str]:
    """What a user acts on, for any clustering of the evaluation split (k-means, GMM, SCAN): assignments.csv
    with a confidence per image, the grid of each cluster's most central members, the least confident images
    (a page and a per-cluster table) and one page per cluster, whose paths it returns. Adds to `artifacts`,
    `figures` and `tables` for the report."""
    from clustering import cluster_grid, cluster_pages, write_assignments

    ids = evalset.ids if evalset.ids is not None else list(range(len(evalset)))
    assignments = out_dir / "assignments.csv"
    write_assignments(assignments, ids, result.assignments, result.distances, labels=evalset.labels,
                      confidence=result.confidence)
    artifacts["assignments"] = str(assignments)
    class_names = _class_names(evalset)
    grid = cluster_grid(evalset.images, result.assignments, result.distances, out_dir / "cluster_grid.png",
                        per_cluster=per_cluster, clusters=range(k), class_names=class_names)
    artifacts["cluster_grid"] = str(grid)
    figures.append(("clusters: the members nearest each centroid", str(grid)))
    artifacts["uncertain"] = _uncertain_page(name, uncertain, evalset, result, class_names, out_dir)
    figures.append(("the least confident images (cluster and confidence under each)", artifacts["uncertain"]))
    tables["Least confident images per cluster"] = _least_confident_table(ids, result, k)
    for stale in (out_dir / "clusters").glob("cluster_*.png"):  # a rerun with fewer clusters
        stale.unlink()
    pages = cluster_pages(evalset.images, result.assignments, result.distances, out_dir / "clusters",
                          clusters=range(k), per_page=per_page, class_names=class_names)
    artifacts["clusters"] = str(out_dir / "clusters")
    return pages


def _least_confident_table(ids, result, k: int) -> tuple[list[str], list[list]]:
    """Per cluster: size, mean confidence and the ids of its least confident members (with confidence)."""
    rows = []
    for c in range(k):
        members = np.flatnonzero(result.assignments == c)
        worst = members[np.argsort(result.confidence[members], kind="stable")[:LEAST_CONFIDENT_LISTED]]
        listed = ", ".join(f"{ids[i]} ({float(result.confidence[i]):.2f})" for i in worst)
        mean = float(result.confidence[members].mean()) if members.size else float("nan")
        rows.append([c, int(members.size), mean, listed])
    return ["cluster", "size", "mean confidence", "least confident (id, confidence)"], rows


def evaluate(
    stage: EvaluateStage,
    *,
    artifact: Path | None,
    train: ImageSet,
    evalset: ImageSet,
    out_dir: Path,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, float], dict[str, str]]:
    """Returns (metrics, artifacts) for one backbone (or raw pixels when `artifact` is None).

    Artifacts are files directly in `out_dir` plus the `clusters/` folder of per-cluster pages, the layout
    the HTML report links to (the runner logs folders under their own name, files at the artifact root).
    """
    from clustering import l2_normalize
    from downstream.knn import knn_accuracy

    out_dir.mkdir(parents=True, exist_ok=True)
    name = stage.name
    metrics: dict[str, float] = {}
    artifacts: dict[str, str] = {}
    figures: list[tuple[str, str]] = []
    tables: dict[str, tuple[list[str], list[list]]] = {}

    t0 = time.time()
    if artifact is None:
        check_pixel_budget(stage, train, evalset)
        train_x, eval_x = pixel_features(train.images), pixel_features(evalset.images)
    else:
        bare, pooling = stage.features == "backbone", stage.pooling
        if bare:
            log(f"[{name}] features: the backbone's {'GeM-' if pooling == 'gem' else ''}pooled features alone "
                "(an embedding head, if any, left out)")
        eval_x = backbone_features(artifact, evalset.images, stage.batch_size, bare=bare, pooling=pooling,
                                   out_path=out_dir / "embeddings.npy")
        if same_images(train, evalset):  # train_split = eval_split (transductive clustering): embedded once
            train_x = eval_x
        else:
            train_x = backbone_features(artifact, train.images, stage.batch_size, bare=bare, pooling=pooling)
    metrics["embed_time_s"] = time.time() - t0
    log(f"[{name}] embedded {len(train_x)} + {len(eval_x)} images ({eval_x.shape[1]}-d) in {metrics['embed_time_s']:.1f}s")

    shared_classes = (
        train.labels is not None and evalset.labels is not None
        and bool(set(np.unique(train.labels)) & set(np.unique(evalset.labels)))
    )
    exclusion: dict[str, object] = {}
    if shared_classes:  # with disjoint classes (unseen-class protocol) a kNN vote cannot be right
        exclude, rule = self_matches(evalset, train)
        metrics["knn_accuracy"] = knn_accuracy(
            train_x, train.labels, eval_x, evalset.labels, k=stage.knn_k, temperature=stage.knn_temperature,
            exclude=exclude,
        )
        metrics["knn_excluded_matches"] = float(exclude.total)
        exclusion.update(knn_rule=rule, knn_excluded_matches=exclude.total,
                         knn_queries_with_matches=int((exclude.counts > 0).sum()))
        log(f"[{name}] kNN: {exclude.total} query-bank pairs left out as the same image (rule: same "
            f"{rule}; {exclusion['knn_queries_with_matches']} of {len(eval_x)} "
            "queries had a copy in the train split)")
        log(f"[{name}] kNN accuracy (k={stage.knn_k}, t={stage.knn_temperature}): {metrics['knn_accuracy']:.4f}")

    if stage.retrieval and evalset.labels is not None:
        t0 = time.time()
        metrics.update(_retrieval(stage, train_x, train, eval_x, evalset, seed, log))
        metrics["retrieval_time_s"] = time.time() - t0
        if "retrieval_excluded_matches" in metrics:
            gallery_set = train if stage.retrieval_gallery == "train" else evalset
            exclusion.update(retrieval_rule=identity_rule(evalset, gallery_set),
                             retrieval_gallery=stage.retrieval_gallery,
                             retrieval_excluded_matches=int(metrics["retrieval_excluded_matches"]))

    feats = l2_normalize(eval_x)
    km, k = _cluster(stage, feats, evalset, out_dir, seed, log, metrics, artifacts, figures, tables,
                     train_feats=train_x, train_labels=train.labels)

    pages = cluster_outputs(name, evalset, km, k, out_dir, per_cluster=stage.grid_per_cluster,
                            per_page=stage.cluster_page_images, uncertain=stage.uncertain_images,
                            artifacts=artifacts, figures=figures, tables=tables)
    if not isinstance(eval_x, np.memmap):  # embedded on the cluster straight into that file
        np.save(out_dir / "embeddings.npy", eval_x)
    artifacts["embeddings"] = str(out_dir / "embeddings.npy")
    np.save(out_dir / "centroids.npy", km.centroids)
    artifacts["centroids"] = str(out_dir / "centroids.npy")

    if stage.tsne:
        artifacts["tsne"], metrics["tsne_time_s"] = _two_d_plot("tsne", feats, km.assignments, evalset, stage,
                                                                out_dir, seed)
        figures.append(("t-SNE", artifacts["tsne"]))
    if stage.umap:
        try:
            artifacts["umap"], metrics["umap_time_s"] = _two_d_plot("umap", feats, km.assignments, evalset, stage,
                                                                    out_dir, seed)
            figures.append(("UMAP", artifacts["umap"]))
        except ImportError as err:
            log(f"[{name}] WARNING: UMAP plot skipped: {err}")

    # "exclusion": which rule kept each query's own image out of the kNN bank and retrieval gallery
    (out_dir / "metrics.json").write_text(json.dumps({**metrics, "exclusion": exclusion}, indent=2))
    artifacts["metrics"] = str(out_dir / "metrics.json")

    if stage.html_report:
        from clustering import html_report

        source = "raw pixels" if artifact is None else f"backbone {artifact}"
        report = html_report(
            out_dir / "report.html", title=f"{name}: evaluation of {source}", metrics=metrics,
            figures=figures, tables=tables,
            pages=[(f"cluster {c}", p) for c, p in zip(range(k), pages)],
            links=[("cluster assignments (CSV)", artifacts["assignments"]), ("metrics (JSON)", artifacts["metrics"]),
                   ("the least confident images (PNG)", artifacts["uncertain"])],
        )
        artifacts["report"] = str(report)
        log(f"[{name}] report: {report}")
    return metrics, artifacts


def _class_names(evalset: ImageSet) -> list[str] | None:
    """Per-image class names for captions when the set has labels (names when known, else the label)."""
    if evalset.labels is None:
        return None
    names = getattr(evalset, "class_names", None)
    if names:
        return [str(names[int(y)]) if 0 <= int(y) < len(names) else str(y) for y in evalset.labels]
    return [str(y) for y in evalset.labels]
