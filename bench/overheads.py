"""Operational overheads of a pipeline run on a local Ray: what an operator waits for besides training.

1. `sslpipe run` launched -> end of the first training step (Ray start, data to the object store,
   Ray Train worker group, DDP setup, model build).
2. A Ray Train worker SIGKILLed mid-epoch -> end of the first step after Ray Train restarted the worker
   group from the last checkpoint (`ray.max_failures: 1`).
3. The same command again once the pipeline finished: every stage reused, Ray not started.
4. `--dry-run` of the finished pipeline.

Writes the "## Operational overheads" section of bench/RESULTS.md.
Usage: python bench/overheads.py [--quick]   (--quick: 256 digits images, a few seconds of training)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work" / "overheads"

from bench.results import add_results_argument, write_section  # noqa: E402
from bench.speed import machine  # noqa: E402

FULL = ("configs/quickstart.yaml", ["data.train_subset=2000", "data.eval_subset=500", "stages.simclr.epochs=3",
                                    "stages.evaluate.tsne=false", "ray.max_failures=1"])
QUICK_CONFIG = {
    "name": "overheads-quick",
    "seed": 0,
    "data": {"source": "digits", "train_subset": 256, "eval_subset": 128},
    "backbone": {"name": "test_resnet", "small_image_stem": False, "image_size": 16},
    "ray": {"num_workers": 2, "max_failures": 1},
    "stages": [
        {"name": "pixels", "kind": "evaluate", "input": "pixels", "tsne": False, "knn_k": 10, "grid_per_cluster": 2},
        {"name": "simclr", "kind": "pretext", "method": "simclr", "epochs": 3, "batch_size": 64, "evaluate": False,
         "log_every_steps": 4, "settings": {"augment": {"gaussian_blur": 0.0}}},
        {"name": "evaluate", "kind": "evaluate", "input": "simclr", "tsne": False, "knn_k": 10, "grid_per_cluster": 2},
    ],
}


def read_progress(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def checkpoint_epoch(out: Path) -> int:
    from pipeline.cache import latest_checkpoint_epoch

    epochs = [latest_checkpoint_epoch(str(p.parent), p.name) or 0 for p in (out / "ray").glob("*") if p.is_dir()]
    return max(epochs, default=0)


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise SystemExit(f"sslpipe exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny digits pipeline: checks the script, numbers are rough")
    add_results_argument(parser)
    args = parser.parse_args()

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    out, progress = WORK / "run", WORK / "progress"
    rank0 = Path(f"{progress}.rank0")
    if args.quick:
        import yaml

        config = WORK / "quick.yaml"
        config.write_text(yaml.safe_dump(QUICK_CONFIG))
        config_arg, overrides = str(config), []
    else:
        config_arg, overrides = FULL
    command = [sys.executable, "-m", "pipeline.cli", "run", config_arg, "--output-dir", str(out)]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "SSLPIPE_TEST_PROGRESS_FILE": str(progress)}
    if args.quick:
        env["SSLPIPE_TEST_STEP_SLEEP"] = "0.3"  # tiny epochs: leave time to kill a worker mid-epoch

    log = open(WORK / "first_run.log", "w")
    launched = time.time()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    first = wait_for(lambda: read_progress(rank0), proc, 1800, "the first training step")
    to_first_step = first["time"] - launched
    state = wait_for(lambda: checkpoint_epoch(out) >= 1 and (p := read_progress(rank0)) and p["epoch"] >= 2 and p,
                     proc, 3600, "epoch 2 after the first checkpoint")
    killed_at = time.time()
    os.kill(state["pid"], signal.SIGKILL)
    after = wait_for(lambda: (p := read_progress(rank0)) and p["pid"] != state["pid"] and p, proc, 1800,
                     "the first step after the restart")
    to_resume = after["time"] - killed_at
    if proc.wait() != 0:
        raise SystemExit(f"first run failed; see {WORK / 'first_run.log'}")
    first_wall = time.time() - launched
    log.close()

    env.pop("SSLPIPE_TEST_STEP_SLEEP", None)
    started = time.time()
    cached = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    cached_wall = time.time() - started
    if cached.returncode != 0 or "nothing to train, Ray not started" not in cached.stdout:
        raise SystemExit(f"cached rerun did not reuse every stage:\n{cached.stdout[-2000:]}\n{cached.stderr[-2000:]}")
    started = time.time()
    subprocess.run(command + ["--dry-run"], cwd=ROOT, env=env, capture_output=True, check=True)
    dry_wall = time.time() - started

    shown = " ".join(["sslpipe run", config_arg if not args.quick else "<digits 256 images, test_resnet, 3 epochs>",
                      *[f"--set {o}" for o in overrides], "--output-dir ..."])
    lines = [
        "## Operational overheads (bench/overheads.py)",
        "",
        f"Machine: {machine()}; local Ray started by the command; 2 Ray Train workers.",
        f"Command: `python bench/overheads.py{' --quick' if args.quick else ''}`, which runs `{shown}`"
        + (" (quick setting: rough numbers, 0.3 s sleep per step)" if args.quick else "") + ".",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| `sslpipe run` launched -> first training step done | {to_first_step:.1f} |",
        f"| worker SIGKILLed mid-epoch -> first step after Ray Train restarted it from the checkpoint (resumed after epoch {after['start_epoch']}) | {to_resume:.1f} |",
        f"| whole first run, including the restart | {first_wall:.1f} |",
        f"| cached rerun of the finished pipeline (every stage reused, Ray not started) | {cached_wall:.1f} |",
        f"| `--dry-run` of the finished pipeline | {dry_wall:.1f} |",
    ]
    print("\n".join(lines))
    write_section(lines[0], "\n".join(lines[1:]), args.results)


if __name__ == "__main__":
    main()
