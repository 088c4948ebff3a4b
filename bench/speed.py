"""Training speed of our SimCLR stage, side by side in one run, on the same data and backbone:

1. lightly's plain-PyTorch SimCLR example loop (PIL images, lightly's SimCLRTransform in a DataLoader,
   backbone + SimCLRProjectionHead + NTXentLoss), fp32;
2. our SimCLR stage under Ray Train (2 workers, and 1 worker given all cores), fp32, and with the fast
   option (``channels_last: true`` and ``compile: true``; fp32, which ``precision: auto`` picks on a CPU);
3. a bare forward+backward+step on ready-made views (no augmentation, no data path), and our
   in-process method step on the same batch, to show the data path is not the bottleneck;
4. our method step under plain PyTorch DDP without Ray (2 processes sharing the cores, channels_last): what
   two lockstepped processes can reach on this machine at all, the limit of the 2-worker rows.

Every row runs `--repeats` times, interleaved, as throughput over all steps after warm-up (images / total
time, stalls included); the table gives each row's median [min-max] and its ratio to lightly's loop and to
the bare step with the same memory layout, and every sentence of the section is written here.

Writes a section of bench/RESULTS.md.   Usage: python bench/speed.py [--steps 10] [--epochs 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work"

from bench.results import add_results_argument, write_section  # noqa: E402


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from pipeline.trainer import cpu_has_native_bf16

    return (f"{cpu}, {os.cpu_count()} cores, native bf16: {'yes' if cpu_has_native_bf16() else 'no'}, "
            f"torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}")


def images(n: int) -> np.ndarray:
    from pipeline.data import load_images

    return load_images("fashion-mnist", "train", subset=n, seed=0, log=lambda *_: None).images


def build(stem_stride: int):
    from pipeline.backbones import build_backbone

    return build_backbone("resnet18", small_image_stem=True, stem_stride=stem_stride)


def simclr_method(stem_stride: int, channels_last: bool):
    """Our SimCLR method on `build`'s backbone with the augmentation of lightly's loop, in the given layout."""
    from pretext import build_method

    backbone, dim = build(stem_stride)
    method = build_method("simclr", backbone, dim, {"temperature": 0.2, "augment": {"min_scale": 0.3, "cj_strength": 0.5,
                          "gaussian_blur": 0.0}}, input_size=32, channels_last=channels_last)
    if channels_last:
        method.to(memory_format=torch.channels_last)
    return method


def _pil_loader(data: np.ndarray, transform, batch: int):
    """lightly's example data path: grayscale uint8 -> PIL RGB -> lightly transform, in 2 DataLoader workers."""
    from PIL import Image

    class PILSet(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return transform(Image.fromarray(data[i, 0]).convert("RGB")), 0

    return torch.utils.data.DataLoader(PILSet(), batch_size=batch, shuffle=True, drop_last=True, num_workers=2,
                                       persistent_workers=True)


def fresh_run_command(config: Path | str, out: Path, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`sslpipe run CONFIG --output-dir OUT --set ...` that trains every stage again (``--force``).

    A benchmark measures the code as it is; the pipeline's stage cache would hand back an earlier run's
    stage, since its fingerprint covers config and data, not code.
    """
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--output-dir", str(out), "--force"]
    for s in overrides:
        cmd += ["--set", s]
    return cmd


def throughput(batch: int, step_times: list[float]) -> float:
    """Loop mean: images/s over all timed steps (total images / total time), the statistic of our Ray rows'
    epoch figure. A DataLoader stall is part of a loop's speed; the median would hide it."""
    return batch * len(step_times) / float(np.sum(step_times))


def median_step(batch: int, step_times: list[float]) -> float:
    """Median step: images / median step time (fixed batch); compare it only with another median step."""
    return batch / float(np.median(step_times))


def speeds(batch: int, step_times: list[float]) -> dict[str, float]:
    """Both statistics of one timed loop: {"mean": loop mean, "median": median step}, images/s."""
    return {"mean": throughput(batch, step_times), "median": median_step(batch, step_times)}


def lightly_loop(data: np.ndarray, batch: int, steps: int, stem_stride: int) -> dict[str, float]:
    """lightly's SimCLR example, unchanged in substance: PIL dataset -> SimCLRTransform -> DataLoader."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    transform = SimCLRTransform(input_size=32, min_scale=0.3, cj_strength=0.5, gaussian_blur=0.0)
    backbone, dim = build(stem_stride)
    model = torch.nn.Sequential(backbone, SimCLRProjectionHead(dim, 512, 128))
    criterion = NTXentLoss(temperature=0.2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loader = _pil_loader(data, transform, batch)
    times = []
    it = iter(loader)
    for step in range(steps + 1):
        t0 = time.perf_counter()
        (x0, x1), _ = next(it)
        z0, z1 = model(x0), model(x1)
        loss = criterion(z0, z1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step > 0:  # the first step pays for worker start-up
            times.append(time.perf_counter() - t0)
    return speeds(batch, times)


def lightly_moco_loop(data: np.ndarray, batch: int, steps: int, stem_stride: int) -> dict[str, float]:
    """lightly's MoCo v2 example: momentum key encoder, NT-Xent with a memory bank, PIL + DataLoader."""
    import copy

    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import MoCoV2Transform

    transform = MoCoV2Transform(input_size=32, min_scale=0.3, cj_strength=0.5, gaussian_blur=0.0)
    backbone, dim = build(stem_stride)
    query = torch.nn.Sequential(backbone, MoCoProjectionHead(dim, 512, 128))
    key = copy.deepcopy(query)
    deactivate_requires_grad(key)
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
    optimizer = torch.optim.AdamW(query.parameters(), lr=2e-3)
    loader = _pil_loader(data, transform, batch)
    times = []
    it = iter(loader)
    for step in range(steps + 1):
        t0 = time.perf_counter()
        (x_q, x_k), _ = next(it)
        update_momentum(query, key, m=0.99)
        q = query(x_q)
        with torch.no_grad():
            k = key(x_k)
        loss = criterion(q, k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step > 0:
            times.append(time.perf_counter() - t0)
    return speeds(batch, times)


def method_steps(data: np.ndarray, batch: int, steps: int, stem_stride: int,
                 channels_last: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(our in-process SimCLR step, bare fwd+bwd on ready views): images/s as loop mean and median step, same
    model and batch (one fixed batch: no data path)."""
    method = simclr_method(stem_stride, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    optimizer = torch.optim.AdamW(method.parameters(), lr=2e-3)
    x = torch.from_numpy(data[:batch]).float().div(255).expand(-1, 3, -1, -1).contiguous()
    ours, bare = [], []
    with torch.no_grad():
        views = method.augment(torch.cat([x, x])).contiguous(memory_format=fmt)
    for step in range(steps + 1):
        t0 = time.perf_counter()
        loss = method(x)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        t1 = time.perf_counter()
        v0, v1 = views.chunk(2)  # the same two forward passes our step makes, minus augmentation
        loss = method.criterion(method.projection_head(method.encode(v0)), method.projection_head(method.encode(v1)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        t2 = time.perf_counter()
        if step > 0:
            ours.append(t1 - t0)
            bare.append(t2 - t1)
    return speeds(batch, ours), speeds(batch, bare)


def _ddp_child(rank: int, port: int, data: np.ndarray, steps: int, stem_stride: int, threads: int, out) -> None:
    """One rank of `plain_ddp`: our SimCLR step on its half of the fixed batch, gloo, channels_last."""
    import torch.distributed as dist

    from pipeline.trainer import _all_finite

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    method = simclr_method(stem_stride, channels_last=True)
    model = torch.nn.parallel.DistributedDataParallel(method)
    optimizer = torch.optim.AdamW(method.parameters(), lr=2e-3)
    mine = torch.from_numpy(data[rank::2])
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        x = mine.float().div(255).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
        loss = model(x)["loss"]
        _all_finite(loss, 2)  # the stage's per-step check, so both loops make the same collectives
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step > 0:
            times.append(time.perf_counter() - t0)
    out.put(len(data) * len(times) / float(np.sum(times)))
    dist.destroy_process_group()


def plain_ddp(data: np.ndarray, batch: int, steps: int, stem_stride: int) -> float:
    """Our step under plain DDP, 2 processes with half the cores each and half of one fixed batch each, no Ray:
    images/s of the slower rank over the steps after the first."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").SimpleQueue()
    threads = max(1, (os.cpu_count() or 2) // 2)
    mp.spawn(_ddp_child, args=(port, data[:batch], steps, stem_stride, threads, out), nprocs=2)
    return min(out.get() for _ in range(2))


def ray_stage(n: int, batch: int, epochs: int, stem_stride: int, fast: bool, method: str = "simclr",
              workers: int = 2) -> float:
    """Our pretext stage through `sslpipe run` under Ray Train: images/s over every epoch after the first
    (total images / total time of those epochs, from the stage's per-epoch MLflow metrics).

    ``fast``: channels_last and ``compile: true`` (fp32, as ``precision: auto`` on a CPU). The compile happens
    in the stage's warm-up, before the first epoch; the first epoch is left out like the lightly loop's
    first step (worker start-up, allocator and DDP bucket warm-up).
    ``workers``: Ray Train workers sharing the machine's cores (1 worker gets them all as intra-op threads).
    """
    from mlflow.tracking import MlflowClient

    out = WORK / f"speed_{method}_{'fast' if fast else 'fp32'}_w{workers}"
    cpus = max(1, (os.cpu_count() or 2) // workers)
    sets = [f"data.train_subset={n}", f"backbone.stem_stride={stem_stride}", f"stages.simclr.epochs={epochs}",
            f"stages.simclr.batch_size={batch}", f"stages.simclr.channels_last={str(fast).lower()}",
            "stages.simclr.precision=fp32", f"stages.simclr.compile={str(fast).lower()}",
            "stages.simclr.checkpoint_every=1000", "stages.simclr.evaluate=false", f"stages.simclr.method={method}",
            f"ray.num_workers={workers}", f"ray.resources_per_worker={{CPU: {cpus}}}", "registry.enabled=false"]
    if method == "moco":
        sets += ["stages.simclr.settings.memory_bank_size=4096", "stages.simclr.settings.momentum=0.99",
                 "stages.simclr.settings.symmetric=false"]
    cmd = fresh_run_command(ROOT / "bench" / "speed.yaml", out, sets)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    run_id = summary["stages"]["simclr"]["run_id"]
    history = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
               for key in ("images_per_sec", "epoch_time_s")}
    timed = [e for e in sorted(history["epoch_time_s"]) if e > 1]
    images = sum(history["images_per_sec"][e] * history["epoch_time_s"][e] for e in timed)
    return images / sum(history["epoch_time_s"][e] for e in timed)


ROWS = (  # (key, label); the measuring order within one repeat
    ("lightly", "lightly example loop (PIL + DataLoader), fp32"),
    ("ray2", "sslpipe SimCLR stage, Ray Train 2 workers, fp32"),
    ("ray2_fast", "sslpipe SimCLR stage, Ray Train 2 workers, fast option"),
    ("ray1", "sslpipe SimCLR stage, Ray Train 1 worker (all cores), fp32"),
    ("ray1_fast", "sslpipe SimCLR stage, Ray Train 1 worker (all cores), fast option"),
    ("ddp2_cl", "sslpipe SimCLR method step, plain DDP 2 processes, no Ray (one fixed batch), channels_last"),
    ("ours", "sslpipe SimCLR method step in-process (one fixed batch), fp32"),
    ("bare", "bare fwd+bwd on ready views (one fixed batch), fp32"),
    ("ours_cl", "sslpipe SimCLR method step in-process (one fixed batch), channels_last"),
    ("bare_cl", "bare fwd+bwd on ready views (one fixed batch), channels_last"),
)
# The bare step with the same memory layout: the physical limit of each row's loop on this machine.
SAME_LAYOUT_BARE = {"lightly": "bare", "ray2": "bare", "ray1": "bare", "ours": "bare",
                    "ray2_fast": "bare_cl", "ray1_fast": "bare_cl", "ours_cl": "bare_cl", "ddp2_cl": "bare_cl"}


def measure_repeats(data: np.ndarray, args) -> dict[str, list[float]]:
    """Every row `args.repeats` times, interleaved (one of each row per round, then the next round), so a
    drift of the machine's speed spreads over all rows instead of favouring whichever ran first."""
    runs: dict[str, list[float]] = {key: [] for key, _ in ROWS}
    for round_ in range(args.repeats):
        torch.manual_seed(round_)
        runs["lightly"].append(lightly_loop(data, args.batch, args.steps, args.stem_stride)["mean"])
        for key, workers, fast in (("ray2", 2, False), ("ray2_fast", 2, True), ("ray1", 1, False), ("ray1_fast", 1, True)):
            runs[key].append(ray_stage(len(data), args.batch, args.epochs, args.stem_stride, fast=fast, workers=workers))
        runs["ddp2_cl"].append(plain_ddp(data, args.batch, args.steps, args.stem_stride))
        for layout, (ours_key, bare_key) in ((False, ("ours", "bare")), (True, ("ours_cl", "bare_cl"))):
            ours, bare = method_steps(data, args.batch, args.steps, args.stem_stride, channels_last=layout)
            runs[ours_key].append(ours["mean"])
            runs[bare_key].append(bare["mean"])
        print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()), flush=True)
    return runs


def spread(values: list[float]) -> str:
    return f"{np.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the lightly and in-process loops")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--stem-stride", type=int, default=2)
    parser.add_argument("--method", choices=["simclr", "moco"], default="simclr")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each Ray stage run; the first is not timed")
    parser.add_argument("--repeats", type=int, default=3, help="rounds: every row runs once per round, interleaved")
    add_results_argument(parser)
    args = parser.parse_args()
    if args.method == "moco":
        return moco_main(args)
    WORK.mkdir(parents=True, exist_ok=True)
    n = args.batch * (args.steps + 1)
    data = images(max(n, 2 * args.batch))
    torch.manual_seed(0)

    runs = measure_repeats(data, args)
    med = {key: float(np.median(values)) for key, values in runs.items()}
    ratio = {key: med[key] / med["lightly"] for key in med}
    lines = [
        "## SimCLR training speed (bench/speed.py)",
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/speed.py --steps {args.steps} --batch {args.batch} --stem-stride {args.stem_stride} "
        f"--epochs {args.epochs} --repeats {args.repeats}`; resnet18 (small stem, stride {args.stem_stride}), 32 px, "
        f"batch {args.batch} images (2 views each), {len(data)} Fashion-MNIST images, fp32 everywhere.",
        "",
        f"Every row ran {args.repeats} times, interleaved (one of each row per round). A figure is the median of "
        "the rounds [min-max], in images/s (images, not views), each round's figure being the throughput over "
        f"all steps after warm-up: lightly, in-process and plain-DDP rows, the {args.steps} steps after the first; Ray rows, "
        f"epochs 2-{args.epochs} of the stage (the fast option compiles in its warm-up, before epoch 1). The fast "
        "option is `channels_last: true` + `compile: true`. The last column divides the row's median by the "
        "median of the bare forward+backward step with the same memory layout (fp32 rows by the contiguous one, "
        "channels_last rows by the channels_last one): the physical limit of this loop on this machine.",
        "",
        "| loop | images/s, median [min-max] | / lightly loop | / bare step, same layout |",
        "|---|---|---|---|",
    ] + [f"| {label} | {spread(runs[key])} | {ratio[key]:.2f}x | "
         f"{med[key] / med[SAME_LAYOUT_BARE[key]] if key in SAME_LAYOUT_BARE else 1.0:.2f} |" for key, label in ROWS] + [
        "",
        f"- fast option / lightly loop: **{ratio['ray1_fast']:.2f}x** with 1 worker, **{ratio['ray2_fast']:.2f}x** "
        f"with 2 workers; fp32 / lightly loop: **{ratio['ray1']:.2f}x** with 1 worker, **{ratio['ray2']:.2f}x** "
        "with 2 workers (medians over the rounds).",
        f"- our stage / bare channels_last step: **{med['ray1_fast'] / med['bare_cl']:.2f}** (1 worker, fast option), "
        f"**{med['ray2_fast'] / med['bare_cl']:.2f}** (2 workers, fast option).",
        f"- two processes sharing the cores without Ray (plain DDP, channels_last): **{ratio['ddp2_cl']:.2f}x** lightly's "
        f"loop, **{med['ddp2_cl'] / med['bare_cl']:.2f}** of the bare channels_last step: the most a 2-worker stage can "
        f"reach here; the 2-worker fast-option stage runs at **{med['ray2_fast'] / med['ddp2_cl']:.2f}** of it.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_section(lines[0], "\n".join(lines[1:]), args.results)


def cell(speed: dict[str, float], statistic: str) -> str:
    """One statistic of a row, '-' where the row has no such figure (Ray rows report the epoch's loop mean only)."""
    return f"{speed[statistic]:.1f}" if statistic in speed else "-"


def moco_main(args) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    data = images(max(args.batch * (args.steps + 1), 2 * args.batch))
    torch.manual_seed(0)
    lightly = lightly_moco_loop(data, args.batch, args.steps, args.stem_stride)
    ours = ray_stage(len(data), args.batch, 2, args.stem_stride, fast=False, method="moco")
    ours_fast = ray_stage(len(data), args.batch, 2, args.stem_stride, fast=True, method="moco")
    ours1 = ray_stage(len(data), args.batch, 2, args.stem_stride, fast=False, method="moco", workers=1)
    ours1_fast = ray_stage(len(data), args.batch, 2, args.stem_stride, fast=True, method="moco", workers=1)
    lines = [
        "## MoCo training speed (bench/speed.py --method moco)",
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/speed.py --method moco --steps {args.steps} --batch {args.batch}`; resnet18 "
        f"(small stem, stride {args.stem_stride}), 32 px, batch {args.batch}, queue 4096, momentum 0.99, Fashion-MNIST. "
        f"images/s as loop mean (images / total time: lightly's {args.steps} steps after the first, the Ray rows' "
        "epochs after the first) and median step (images / median step time; lightly only). The ratios are loop mean "
        "/ loop mean; one run per row (the SimCLR section repeats its rows).",
        "",
        "| loop | loop mean images/s | median step images/s |",
        "|---|---|---|",
        f"| lightly MoCo v2 example loop (PIL + DataLoader), fp32 | {cell(lightly, 'mean')} | {cell(lightly, 'median')} |",
        f"| sslpipe MoCo v2 stage, Ray Train 2 workers, fp32 | {ours:.1f} | - |",
        f"| sslpipe MoCo v2 stage, Ray Train 2 workers, fast option | {ours_fast:.1f} | - |",
        f"| sslpipe MoCo v2 stage, Ray Train 1 worker (all cores), fp32 | {ours1:.1f} | - |",
        f"| sslpipe MoCo v2 stage, Ray Train 1 worker (all cores), fast option | {ours1_fast:.1f} | - |",
        "",
        f"- loop mean / loop mean, ours / lightly loop, 2 workers: **{ours / lightly['mean']:.2f}x** (fp32), **{ours_fast / lightly['mean']:.2f}x** "
        f"(fast option: channels_last + compile); 1 worker: **{ours1 / lightly['mean']:.2f}x** (fp32), "
        f"**{ours1_fast / lightly['mean']:.2f}x** (fast option). "
        "Both one-sided (`symmetric: false`, as lightly's example); our default symmetric loss does twice the "
        "encoder passes per image.",
        "",
    ]
    print("\n".join(lines))
    write_section(lines[0], "\n".join(lines[1:]), args.results)


if __name__ == "__main__":
    main()
