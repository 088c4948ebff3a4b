"""faiss k-means (clustering.kmeans, what the evaluate stage runs) next to scikit-learn KMeans.

Embeddings: the 60,000 Fashion-MNIST training images, pixels scaled to [0, 1], projected to 128-d by a
fixed Gaussian random matrix (seed 0) — a realistic, non-trivial cluster structure with labels to score
against. Both implementations start from the SAME k-means++ centroids (sklearn.cluster.kmeans_plusplus,
seed 0, computed once and not timed), run up to the same number of Lloyd iterations (n_init=1, tol=0) on ALL points
(faiss' 256-points-per-centroid subsampling is switched off), each with all cores. A third row shows
faiss with its default subsampling, as the evaluate stage runs it. The iterations column is what each run
performed, not what was asked for: scikit-learn's ``n_iter_`` (it stops once the assignment stops changing)
and the length of faiss' ``iteration_stats`` (faiss may stop early, ``early_stop_threshold``, or skip
training when k equals the number of points). Wall times are the best of
`--repeats` runs. Writes the section "## faiss vs scikit-learn k-means" of bench/RESULTS.md.

Usage: python bench/kmeans.py [--quick] [--repeats 3] [--iterations 20] [--threads N] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import add_results_argument, write_section  # noqa: E402

HEADING = "## faiss vs scikit-learn k-means"


def embeddings(n: int, dim: int = 128) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.data import load_images

    data = load_images("fashion-mnist", "train", subset=None if n >= 60000 else n, seed=0, log=lambda *_: None)
    pixels = data.images.reshape(len(data.images), -1).astype(np.float32) / 255.0
    projection = np.random.default_rng(0).normal(size=(pixels.shape[1], dim)).astype(np.float32) / np.sqrt(dim)
    return np.ascontiguousarray(pixels @ projection), data.labels


def best_of(repeats: int, fn):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


@contextlib.contextmanager
def faiss_iterations():
    """Record the Lloyd iterations each faiss.Kmeans.train call made inside ``clustering.kmeans`` (which builds its
    own faiss.Kmeans and keeps only the centroids): len(iteration_stats), one entry per iteration performed,
    summed over faiss' restarts (``nredo``; 1 here)."""
    import faiss

    performed: list[int] = []
    original = faiss.Kmeans

    class RecordingKmeans(original):
        def train(self, *args, **kwargs):
            out = super().train(*args, **kwargs)
            performed.append(len(self.iteration_stats))
            return out

    faiss.Kmeans = RecordingKmeans
    try:
        yield performed
    finally:
        faiss.Kmeans = original


def performed_iterations(counts: list[int]):
    """One count when every repeat made as many iterations (the usual case), else "min-max"."""
    if not counts:
        raise RuntimeError("faiss.Kmeans.train was not called: cannot tell how many iterations it made")
    return counts[0] if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def compare(x: np.ndarray, labels: np.ndarray, k: int, iterations: int, repeats: int) -> list[dict]:
    import faiss
    from sklearn.cluster import KMeans, kmeans_plusplus
    from sklearn.metrics import normalized_mutual_info_score as nmi

    from clustering import kmeans

    init, _ = kmeans_plusplus(x, k, random_state=0)
    rows = []

    with faiss_iterations() as performed:
        t, res = best_of(repeats, lambda: kmeans(x, k, niter=iterations, init_centroids=init, use_gpu=False,
                                                 max_points_per_centroid=len(x)))
    rows.append(dict(impl="faiss (all points)", k=k, time=t, iters=performed_iterations(performed),
                     assign=res.assignments, inertia=res.inertia))

    def sk():
        return KMeans(k, init=init, n_init=1, max_iter=iterations, tol=0.0, algorithm="lloyd").fit(x)

    t, model = best_of(repeats, sk)
    rows.append(dict(impl="scikit-learn (all points)", k=k, time=t, iters=int(model.n_iter_), assign=model.labels_,
                     inertia=float(model.inertia_)))

    with faiss_iterations() as performed:
        t, res = best_of(repeats, lambda: kmeans(x, k, niter=iterations, init_centroids=init, use_gpu=False))
    rows.append(dict(impl="faiss (default: 256 points per centroid)", k=k, time=t,
                     iters=performed_iterations(performed), assign=res.assignments, inertia=res.inertia))

    reference = rows[1]
    for row in rows:
        row["nmi_labels"] = float(nmi(labels, row["assign"]))
        row["nmi_sklearn"] = float(nmi(reference["assign"], row["assign"]))
        row["ratio"] = reference["time"] / row["time"]
    rows[0]["threads"] = faiss.omp_get_max_threads()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="6,000 points, k = 10 only, one repeat (a smoke test)")
    parser.add_argument("--points", type=int, default=60000)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both libraries (default: all cores). faiss' OpenMP slows down badly "
                             "when the cores are shared with other busy processes; 1 thread is then fairer")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    add_results_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.points, args.ks, args.repeats = 6000, [10], 1

    import faiss
    from threadpoolctl import threadpool_info, threadpool_limits

    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
        threadpool_limits(args.threads)
    x, labels = embeddings(args.points)
    table = []
    for k in args.ks:
        rows = compare(x, labels, k, args.iterations, args.repeats)
        for row in rows:
            print(f"k={k:4d}  {row['impl']:42s} {row['time']:7.2f}s  iters {row['iters']!s:>3}  "
                  f"NMI(labels) {row['nmi_labels']:.4f}  NMI(vs sklearn) {row['nmi_sklearn']:.4f}  "
                  f"sklearn/this time {row['ratio']:.2f}x", flush=True)
        table.append(rows)

    if args.no_write:
        return
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    sk_threads = max((p.get("num_threads", 0) for p in threadpool_info() if p.get("user_api") == "openmp"), default=0)
    flags = " --quick" if args.quick else ""
    if not args.quick and (args.ks != [10, 100] or args.iterations != 20 or args.repeats != 3 or args.points != 60000):
        flags += f" --points {args.points} --ks {' '.join(map(str, args.ks))} --iterations {args.iterations} --repeats {args.repeats}"
    if args.threads is not None:
        flags += f" --threads {args.threads}"
    lines = [
        HEADING + " (bench/kmeans.py)",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores; faiss {__import__('faiss').__version__} "
        f"({table[0][0]['threads']} OpenMP threads), scikit-learn {__import__('sklearn').__version__} "
        f"({sk_threads} OpenMP threads); load average {os.getloadavg()[0]:.1f} at the end of the run.",
        f"Command: `python bench/kmeans.py{flags}`.",
        "",
        f"Embeddings: {len(x):,} Fashion-MNIST training images, pixels in [0, 1] randomly projected to "
        f"{x.shape[1]}-d (Gaussian matrix, seed 0), float32. Both start from the same k-means++ centroids and "
        f"are asked for {args.iterations} Lloyd iterations (n_init=1, tol=0) on all points; the last row is faiss "
        "as the evaluate stage calls it (it trains on at most 256 points per centroid, then assigns all). "
        "Iterations: those each run performed (scikit-learn's n_iter_; faiss: the length of its iteration_stats). "
        f"Times: best of {args.repeats}. Speed-up = scikit-learn time / row time. NMI against the 10 labels, "
        "and against the scikit-learn clustering.",
        "",
        "| k | implementation | wall time (s) | iterations | speed-up | NMI (labels) | NMI (vs scikit-learn) | inertia |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rows in table:
        for row in rows:
            lines.append(f"| {row['k']} | {row['impl']} | {row['time']:.2f} | {row['iters']} | {row['ratio']:.2f}x | "
                         f"{row['nmi_labels']:.4f} | {row['nmi_sklearn']:.4f} | {row['inertia']:.4g} |")
    for rows in table:
        gap = abs(rows[0]["nmi_labels"] - rows[1]["nmi_labels"])
        lines.append("")
        lines.append(f"k={rows[0]['k']}: |NMI(faiss) - NMI(scikit-learn)| = {gap:.4f} "
                     f"({'within' if gap <= 0.01 else 'NOT within'} 0.01).")
    write_section(lines[0], "\n".join(lines[1:]), args.results)
    print(f"wrote the '{HEADING}' section of {args.results}")


if __name__ == "__main__":
    main()
