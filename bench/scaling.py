"""Data scaling: the `memory` and `stream` data backends side by side on synthetic JPEG folders of N images.

For every N the script makes its own folder (``<workdir>/n<N>/train/class_k/*.jpg`` plus a fixed-size
``test/`` split), so every N has its own listing and its own pixel cache. The files are hard links to a small
pool of distinct 500x375 JPEG photos (random smooth colour fields, one mean colour per class, made here): many
training files share pixels, which changes nothing for memory or throughput (every file is opened and decoded),
and the test split's pool is disjoint from the training split's, so no test image has a copy in the kNN bank.

Each run is one `sslpipe run` subprocess in a fresh output folder: a SimCLR pretext stage (all N images,
`--epochs` epochs) and an evaluate stage on its backbone (embeds both splits, kNN, k-means, no t-SNE). The same
command is then run again in the same folder (every stage reused: the cached rerun). While a run goes on, the
script polls /proc for the driver and for the Ray Train worker processes that descend from it, so every memory
figure is per run. The section of bench/RESULTS.md it writes says what every column is.

Usage: python bench/scaling.py [--sizes 10000 30000 100000] [--load-size 64] [--quick] [--results PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import add_results_argument, write_section  # noqa: E402
from bench.speed import fresh_run_command, machine  # noqa: E402

TITLE = "## Data scaling (bench/scaling.py)"
CLASSES = 10
PHOTO_W, PHOTO_H = 500, 375
BACKENDS = ("memory", "stream")
FIRST_STEP = re.compile(r"\] epoch 1/\d+ step 1/")
STAGE_LINE = re.compile(r"^== stage (\S+)")
CACHE_BUILT = re.compile(r"pixel cache: .* built in ([0-9.]+)s")
DATA_LOADED = re.compile(r"^data: folder/train: ")


# ----------------------------------------------------------------------------------------------
# Synthetic folders
# ----------------------------------------------------------------------------------------------


def _photo(rng: np.random.Generator, label: int) -> np.ndarray:
    """A 500x375 RGB 'photo': smooth random colour field around the class's mean colour."""
    from PIL import Image

    hue = np.array([np.cos(2 * np.pi * (label / CLASSES + k / 3)) for k in range(3)])
    mean = 128 + 70 * hue
    coarse = np.clip(mean + rng.normal(0, 45, (6, 8, 3)), 0, 255).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((PHOTO_W, PHOTO_H), Image.Resampling.BICUBIC)
    grain = rng.integers(-8, 9, (PHOTO_H, PHOTO_W, 3))
    return np.clip(np.asarray(smooth, dtype=np.int16) + grain, 0, 255).astype(np.uint8)


def _pool(directory: Path, count: int, seed: int) -> list[Path]:
    """`count` distinct JPEG photos, photo i of class i % CLASSES (made once, reused by every N)."""
    from PIL import Image

    done = directory / ".complete"
    files = [directory / f"photo_{i:04d}.jpg" for i in range(count)]
    if done.exists() and done.read_text() == str(count):
        return files
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, path in enumerate(files):
        Image.fromarray(_photo(rng, i % CLASSES)).save(path, quality=90)
    done.write_text(str(count))
    return files


def make_folder(workdir: Path, n: int, test_n: int, pool_size: int) -> Path:
    """``<workdir>/n<N>``: train/ with `n` files and test/ with `test_n`, in CLASSES class sub-folders, hard
    links to the pools (copies where the file system has no hard links). Made once; reused while complete."""
    root = workdir / f"n{n}"
    stamp = f"{n} {test_n} {pool_size}"
    if (root / ".complete").exists() and (root / ".complete").read_text() == stamp:
        return root
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.time()
    pools = {"train": _pool(workdir / "pool_train", pool_size, seed=1),
             "test": _pool(workdir / "pool_test", max(CLASSES, pool_size // 4), seed=2)}
    for split, count in (("train", n), ("test", test_n)):
        pool = pools[split]
        for c in range(CLASSES):
            (root / split / f"class_{c}").mkdir(parents=True)
        for i in range(count):
            src = pool[i % len(pool)]
            dst = root / split / f"class_{i % len(pool) % CLASSES}" / f"img_{i:07d}.jpg"
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    (root / ".complete").write_text(stamp)
    print(f"made {root}: {n} + {test_n} files in {time.time() - t0:.1f}s", flush=True)
    return root


# ----------------------------------------------------------------------------------------------
# One run, watched
# ----------------------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process in KiB ({} once it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    return out


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _is_train_worker(pid: int) -> bool:
    try:
        return b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Watch(threading.Thread):
    """Polls the driver and its Ray Train worker descendants every `interval` s until `stop` is set."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.driver: list[tuple[float, dict[str, int]]] = []
        self.workers: dict[int, dict[str, int]] = {}  # pid -> peak of each field

    def run(self) -> None:
        scan = 0
        known: set[int] = set()
        while not self.stop.is_set():
            now = time.time()
            status = _status(self.pid)
            if status:
                self.driver.append((now, status))
            if scan % 4 == 0:  # the process tree once a second
                known = {p for p in _descendants(self.pid) if _is_train_worker(p)} | \
                        {p for p in known if Path(f"/proc/{p}").exists()}
            scan += 1
            for p in known:
                s = _status(p)
                peak = self.workers.setdefault(p, {})
                for key, value in s.items():
                    peak[key] = max(peak.get(key, 0), value)
            self.stop.wait(self.interval)


def watched_run(cmd: list[str], log_path: Path) -> dict:
    """Run `cmd`, timestamping its output lines and polling its memory; returns the raw observations."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.time()
    lines: list[tuple[float, str]] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env=env)
        watch = Watch(proc.pid)
        watch.start()
        for line in proc.stdout:
            lines.append((time.time() - start, line.rstrip("\n")))
            log.write(f"{lines[-1][0]:8.2f} {line}")
        rc = proc.wait()
        wall = time.time() - start
        watch.stop.set()
        watch.join()
    if rc != 0:
        tail = "\n".join(text for _, text in lines[-30:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}; log {log_path}; last lines:\n{tail}")
    return {"wall": wall, "start": start, "lines": lines, "driver": watch.driver, "workers": watch.workers}


def _first(lines: list[tuple[float, str]], pattern: re.Pattern) -> float | None:
    return next((t for t, text in lines if pattern.search(text)), None)


def _mb(kib: float) -> float:
    return kib / 1024


def digest_run(raw: dict, out: Path, n: int, size: int, backend: str) -> dict:
    """The figures of one fresh run from its observations, its summary.json and (stream) its pixel cache."""
    lines, start = raw["lines"], raw["start"]
    summary = json.loads((out / "summary.json").read_text())
    pretext, evaluate = summary["stages"]["pretext"]["metrics"], summary["stages"]["evaluate"]["metrics"]
    eval_start = next((t for t, text in lines if (m := STAGE_LINE.search(text)) and m.group(1) == "evaluate"), None)
    samples = raw["driver"]
    before_eval = [s for t, s in samples if eval_start is None or t - start < eval_start] or [{}]
    builds = [float(m.group(1)) for _, text in lines if (m := CACHE_BUILT.search(text))]
    workers = list(raw["workers"].values())
    if not workers:
        raise RuntimeError(f"no Ray Train worker process was seen under the driver of {out}: worker memory unknown")
    row = {
        "backend": backend, "n": n, "wall_s": raw["wall"],
        "data_load_s": _first(lines, DATA_LOADED),
        "cache_build_s": sum(builds) if builds else None,
        "first_step_s": _first(lines, FIRST_STEP),
        "images_per_sec": pretext.get("images_per_sec"),
        "epoch_time_s": pretext.get("epoch_time_s"),
        "eval_s": evaluate.get("stage_time_s"),
        "embed_s": evaluate.get("embed_time_s"),
        "driver_hwm_mb": _mb(max((s.get("VmHWM", 0) for _, s in samples), default=0)),
        "driver_anon_mb": _mb(max((s.get("RssAnon", 0) for _, s in samples), default=0)),
        "driver_anon_train_mb": _mb(max(s.get("RssAnon", 0) for s in before_eval)),
        "driver_shmem_mb": _mb(max((s.get("RssShmem", 0) for _, s in samples), default=0)),
        "workers": len(workers),
        "worker_rss_mb": _mb(max((w.get("VmHWM", w.get("VmRSS", 0)) for w in workers), default=0)),
        "worker_anon_mb": _mb(max((w.get("RssAnon", 0) for w in workers), default=0)),
        "worker_maxrss_mb": pretext.get("peak_memory_mb"),
        "put_bytes": object_bytes(out, n, size, backend),
    }
    return row


def object_bytes(out: Path, n: int, size: int, backend: str) -> int:
    """What the driver hands Train workers through Ray, a proxy for object-store use: `memory` ray.puts the
    decoded training split (N x 3 x S x S uint8); `stream` passes the pickled ShardedImages descriptor."""
    if backend == "memory":
        return n * 3 * size * size
    from pipeline.pixel_cache import open_cache

    for meta in sorted((out / "pixel_cache").glob("*/meta.json")):
        if json.loads(meta.read_text())["where"].rstrip("/").endswith("/train"):
            return len(pickle.dumps(open_cache(meta.parent, source="folder", split="train").images))
    raise RuntimeError(f"no training pixel cache under {out / 'pixel_cache'}")


def config(root: Path, args) -> dict:
    batch = args.batch
    return {
        "name": "bench_scaling",
        "data": {"source": "folder", "root": str(root), "load_size": args.load_size, "labels": "folders"},
        "backbone": {"name": "resnet18", "small_image_stem": True, "stem_stride": 2, "image_size": args.image_size},
        "ray": {"num_workers": 2},
        "registry": {"enabled": False},
        "stages": [
            {"name": "pretext", "kind": "pretext", "method": "simclr", "epochs": args.epochs, "batch_size": batch,
             "optimizer": {"name": "adamw", "lr": 2.0e-3}, "evaluate": False, "log_every_steps": 1,
             "checkpoint_every": 1000,
             "settings": {"temperature": 0.2, "augment": {"min_scale": 0.3, "cj_strength": 0.5, "gaussian_blur": 0.0}}},
            {"name": "evaluate", "kind": "evaluate", "input": "pretext", "tsne": False, "clusters": CLASSES,
             "kmeans_iterations": 20, "grid_per_cluster": 4, "cluster_page_images": 8, "html_report": False},
        ],
    }


def measure(n: int, backend: str, args) -> dict:
    import yaml

    root = make_folder(args.workdir, n, args.test_size, args.pool)
    run_dir = args.workdir / "runs" / f"{backend}_n{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config(root, args), sort_keys=False))
    out = run_dir / "out"
    cmd = fresh_run_command(cfg_path, out, [f"data.backend={backend}"])
    print(f"-- {backend}, N={n}: {' '.join(cmd[1:])}", flush=True)
    row = digest_run(watched_run(cmd, run_dir / "fresh.log"), out, n, args.load_size, backend)
    rerun = watched_run([c for c in cmd if c != "--force"], run_dir / "rerun.log")
    reused = json.loads((out / "summary.json").read_text()).get("reused_stages", [])
    row["rerun_s"] = rerun["wall"]
    row["rerun_all_reused"] = sorted(reused) == ["evaluate", "pretext"]
    row["rerun_driver_hwm_mb"] = _mb(max((s.get("VmHWM", 0) for _, s in rerun["driver"]), default=0))
    print("   " + json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return row


# ----------------------------------------------------------------------------------------------
# The section
# ----------------------------------------------------------------------------------------------


def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bytes(value: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def spread(values: list[float]) -> float:
    """max / min - 1 of positive values: 0.10 means the largest is 10% above the smallest."""
    return max(values) / min(values) - 1


def verdicts(rows: list[dict], throughput_n: int, rerun_n: int) -> list[str]:
    """The issue's three pass criteria, computed from the rows ('not measured' where a size is missing)."""
    by = {(r["backend"], r["n"]): r for r in rows}
    sizes = sorted({r["n"] for r in rows})
    lo, hi = sizes[0], sizes[-1]
    out = []
    if set(BACKENDS) - {r["backend"] for r in rows}:
        return ["- not computed: the criteria compare both backends"]
    if lo == hi:
        out.append("- memory flat from smallest to largest N: not measured (one size)")
    else:
        for key, what in (("driver_hwm_mb", "driver peak RSS"), ("driver_anon_mb", "driver peak anonymous RSS"),
                          ("worker_rss_mb", "worker peak RSS"), ("worker_anon_mb", "worker peak anonymous RSS")):
            s = [by[("stream", n)][key] for n in (lo, hi)]
            m = [by[("memory", n)][key] for n in (lo, hi)]
            ok = abs(s[1] / s[0] - 1) <= 0.10
            out.append(f"- {what}, N={lo} -> {hi}: stream {s[0]:.0f} -> {s[1]:.0f} MB ({s[1] / s[0] - 1:+.0%}), "
                       f"memory {m[0]:.0f} -> {m[1]:.0f} MB ({m[1] / m[0] - 1:+.0%}): "
                       f"**{'pass' if ok else 'FAIL'}** (stream within ±10%)")
    if ("stream", throughput_n) in by and ("memory", throughput_n) in by:
        s, m = by[("stream", throughput_n)]["images_per_sec"], by[("memory", throughput_n)]["images_per_sec"]
        out.append(f"- images/s at N={throughput_n}: stream {s:.1f}, memory {m:.1f} = {s / m:.2f}x: "
                   f"**{'pass' if s >= 0.9 * m else 'FAIL'}** (>= 0.9x)")
    else:
        out.append(f"- images/s at N={throughput_n}: not measured (N={throughput_n} not among the sizes)")
    if ("stream", rerun_n) in by:
        r = by[("stream", rerun_n)]
        ok = r["rerun_s"] <= 60 and r["rerun_all_reused"]
        out.append(f"- stream cached rerun at N={rerun_n}: {r['rerun_s']:.1f} s"
                   f"{'' if r['rerun_all_reused'] else ' (NOT every stage reused)'}: "
                   f"**{'pass' if ok else 'FAIL'}** (<= 60 s); memory: {by[('memory', rerun_n)]['rerun_s']:.1f} s")
    else:
        out.append(f"- cached rerun at N={rerun_n}: not measured (N={rerun_n} not among the sizes)")
    return out


def section(rows: list[dict], args, command: str, elapsed: float) -> str:
    header = ("| backend | N | data load s | cache build s | first step s | images/s | eval s | rerun s | "
              "driver peak RSS MB | driver anon MB (train / all) | worker peak RSS MB | worker anon MB | "
              "worker ru_maxrss MB | to workers |")
    table = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["backend"], r["n"])):
        table.append(
            f"| {r['backend']} | {r['n']} | {_f(r['data_load_s'])} | {_f(r['cache_build_s'])} | "
            f"{_f(r['first_step_s'])} | {_f(r['images_per_sec'])} | {_f(r['eval_s'])} | {_f(r['rerun_s'])}"
            f"{'' if r['rerun_all_reused'] else ' (not all reused)'} | {r['driver_hwm_mb']:.0f} | "
            f"{r['driver_anon_train_mb']:.0f} / {r['driver_anon_mb']:.0f} | {r['worker_rss_mb']:.0f} | "
            f"{r['worker_anon_mb']:.0f} | {_f(r['worker_maxrss_mb'], 0)} | {_bytes(r['put_bytes'])} |")
    throughput_n = 30000 if not args.quick else sorted(args.sizes)[len(args.sizes) // 2]
    rerun_n = 100000 if not args.quick else max(args.sizes)
    lines = [
        f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end of the run.",
        f"Command: `{command}` ({elapsed / 60:.0f} min). Synthetic folders made by the script: N training JPEGs "
        f"(500x375, hard links to {args.pool} distinct photos, {CLASSES} class sub-folders) and {args.test_size} "
        f"test JPEGs from a disjoint pool, decoded at load size {args.load_size}. Each run: a SimCLR stage "
        f"({args.epochs} epoch(s) over all N, resnet18 small stem stride 2 at {args.image_size} px, batch "
        f"{args.batch}, 2 Ray Train workers) and an evaluate stage (embeds the N training and {args.test_size} test "
        "images on the driver, kNN, k-means k=10, no t-SNE), one `sslpipe run` subprocess in a fresh output folder. "
        "The distinct photos stay in the page cache, so reading files costs no disk I/O here: decoding is measured, "
        "a cold disk or a network file system is not.",
        "",
        *table,
        "",
        "Columns (seconds from the start of the `sslpipe run` subprocess unless said):",
        "- data load: until the driver logs the training split loaded (listing + decode for memory; listing + "
        "pixel cache build for stream). cache build: the `pixel cache: ... built in` times of both splits (stream).",
        "- first step: until rank 0 prints its first finished step (`log_every_steps: 1`; Ray forwards worker "
        "output with up to about a second of delay).",
        "- images/s: the pretext stage's last epoch (summary.json). eval: the evaluate stage's stage time.",
        "- rerun: the same command again in the same folder, every stage reused (the memory backend still "
        "decodes every file on the driver to fingerprint the data).",
        "- driver peak RSS: VmHWM of the driver process (file-backed and shared pages included: memory-mapped "
        "cache shards and the object store's pages count). driver anon: peak anonymous RSS polled every 0.25 s, "
        "before the evaluate stage / over the whole run (the evaluate stage holds the N training embeddings).",
        "- worker peak RSS / anon: the Ray Train worker processes descending from the driver, polled every "
        "0.25 s, the largest of them; worker ru_maxrss: the stage's own `peak_memory_mb` (rank 0's "
        "`ru_maxrss`). Memory-mapped shard pages a worker has read count in its RSS but not in its anonymous RSS.",
        "- to workers: a proxy for object-store bytes, not a measurement of the store: memory ray.puts the "
        "decoded split (N x 3 x S x S bytes); stream passes the pickled ShardedImages descriptor (8 bytes a row "
        "plus the shard names).",
        "",
        "Pass criteria of the issue, computed from the table:",
        *verdicts(rows, throughput_n, rerun_n),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000, 100000])
    parser.add_argument("--load-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=16,
                        help="backbone input size (the SimCLR crop; default 16 keeps one epoch over 1e5 images to "
                             "minutes on 2 cores and makes the data path a larger share of each step)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--test-size", type=int, default=2000, help="test split images (fixed for every N)")
    parser.add_argument("--pool", type=int, default=256, help="distinct training photos the files link to")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sslpipe-scaling"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: sizes 300 900, 200 test images, 16 px, batch 64; writes no section "
                             "unless --results is given")
    add_results_argument(parser)
    args = parser.parse_args()
    explicit_results = "--results" in sys.argv
    command = "python bench/scaling.py " + " ".join(a for a in sys.argv[1:])
    if args.quick:
        if "--sizes" not in sys.argv:
            args.sizes = [300, 900]
        args.test_size, args.image_size, args.batch, args.pool = 200, 16, 64, 64
    args.workdir = args.workdir.resolve()
    t0 = time.time()
    rows = [measure(n, backend, args) for n in sorted(args.sizes) for backend in args.backends]
    (args.workdir / "rows.json").write_text(json.dumps(rows, indent=1))  # every figure, the table's and the rest
    body = section(rows, args, command.strip(), time.time() - t0)
    print(TITLE + "\n\n" + body)
    if args.quick and not explicit_results:
        print("(--quick: no section written; give --results PATH to write one)")
        return
    if set(args.backends) != set(BACKENDS):
        print("(one backend only: no section written)")
        return
    write_section(TITLE, body, args.results)


if __name__ == "__main__":
    main()
