"""Training speed of our SimCLR stage, side by side in one run, on the same data and backbone:

1. lightly's plain-PyTorch SimCLR example loop (PIL images, lightly's SimCLRTransform in a DataLoader,
   backbone + SimCLRProjectionHead + NTXentLoss), fp32;
2. our SimCLR stage under Ray Train (2 workers, and 1 worker given all cores), fp32, and with the fast
   option (channels_last, ``compile: true``, plus bf16 autocast where the CPU/GPU has native bf16);
3. a bare forward+backward+step on ready-made views (no augmentation, no data path), and our
   in-process method step on the same batch, to show the data path is not the bottleneck.

Two statistics, never mixed in one ratio: the loop mean (images / total time of the timed steps, what
the Ray rows' epoch figure is, stalls included) and the median step (images / median step time, which
hides stalls). A ratio compares loop mean with loop mean, or median step with median step.

Writes a section of bench/RESULTS.md.   Usage: python bench/speed.py [--steps 6] [--batch 256]
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
    from pretext import build_method

    backbone, dim = build(stem_stride)
    method = build_method("simclr", backbone, dim, {"temperature": 0.2, "augment": {"min_scale": 0.3, "cj_strength": 0.5,
                          "gaussian_blur": 0.0}}, input_size=32, channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        method.to(memory_format=torch.channels_last)
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


def ray_stage(n: int, batch: int, epochs: int, stem_stride: int, fast: bool, method: str = "simclr",
              workers: int = 2) -> float:
    """Our pretext stage through `sslpipe run` under Ray Train; images/s of the last epoch.

    ``fast``: channels_last, ``compile: true`` and ``precision: auto`` (bf16 only where it is native). The
    last epoch's mean excludes the one-off compile, as the lightly loop's timing excludes its start-up step.
    ``workers``: Ray Train workers sharing the machine's cores (1 worker gets them all as intra-op threads).
    """
    out = WORK / f"speed_{method}_{'fast' if fast else 'fp32'}_w{workers}"
    cpus = max(1, (os.cpu_count() or 2) // workers)
    sets = [f"data.train_subset={n}", f"backbone.stem_stride={stem_stride}", f"stages.simclr.epochs={epochs}",
            f"stages.simclr.batch_size={batch}", f"stages.simclr.channels_last={str(fast).lower()}",
            f"stages.simclr.precision={'auto' if fast else 'fp32'}", f"stages.simclr.compile={str(fast).lower()}",
            "stages.simclr.checkpoint_every=1000", f"stages.simclr.method={method}", f"ray.num_workers={workers}",
            f"ray.resources_per_worker={{CPU: {cpus}}}"]
    if method == "moco":
        sets += ["stages.simclr.settings.memory_bank_size=4096", "stages.simclr.settings.momentum=0.99",
                 "stages.simclr.settings.symmetric=false"]
    cmd = fresh_run_command(ROOT / "bench" / "speed.yaml", out, sets)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return float(summary["stages"]["simclr"]["metrics"]["images_per_sec"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--stem-stride", type=int, default=2)
    parser.add_argument("--method", choices=["simclr", "moco"], default="simclr")
    add_results_argument(parser)
    args = parser.parse_args()
    if args.method == "moco":
        return moco_main(args)
    WORK.mkdir(parents=True, exist_ok=True)
    n = args.batch * (args.steps + 1)
    data = images(max(n, 2 * args.batch))
    torch.manual_seed(0)

    lightly = lightly_loop(data, args.batch, args.steps, args.stem_stride)
    ours, bare = method_steps(data, args.batch, args.steps, args.stem_stride, channels_last=False)
    ours_cl, bare_cl = method_steps(data, args.batch, args.steps, args.stem_stride, channels_last=True)
    epochs = 2
    ray_fp32 = ray_stage(len(data), args.batch, epochs, args.stem_stride, fast=False)
    ray_fast = ray_stage(len(data), args.batch, epochs, args.stem_stride, fast=True)
    ray1_fp32 = ray_stage(len(data), args.batch, epochs, args.stem_stride, fast=False, workers=1)
    ray1_fast = ray_stage(len(data), args.batch, epochs, args.stem_stride, fast=True, workers=1)
    rows = [
        ("lightly example loop (PIL + DataLoader), fp32", lightly),
        ("sslpipe SimCLR stage, Ray Train 2 workers, fp32", {"mean": ray_fp32}),
        ("sslpipe SimCLR stage, Ray Train 2 workers, fast option", {"mean": ray_fast}),
        ("sslpipe SimCLR stage, Ray Train 1 worker (all cores), fp32", {"mean": ray1_fp32}),
        ("sslpipe SimCLR stage, Ray Train 1 worker (all cores), fast option", {"mean": ray1_fast}),
        ("sslpipe SimCLR method step in-process (one fixed batch), fp32", ours),
        ("bare fwd+bwd on ready views (one fixed batch), fp32", bare),
        ("sslpipe SimCLR method step in-process (one fixed batch), channels_last", ours_cl),
        ("bare fwd+bwd on ready views (one fixed batch), channels_last", bare_cl),
    ]
    lines = [
        "## SimCLR training speed (bench/speed.py)",
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/speed.py --steps {args.steps} --batch {args.batch} --stem-stride {args.stem_stride}`; "
        f"resnet18 (small stem, stride {args.stem_stride}), 32 px, batch {args.batch} images (2 views each), Fashion-MNIST, "
        f"images/s = images (not views) per second, as two statistics: loop mean = images / total time of the timed "
        f"steps (lightly and in-process rows: the {args.steps} steps after the first, which starts the DataLoader "
        "workers or warms up; Ray rows: their last epoch, as the stage reports it), median step = images / median "
        "step time (lightly and in-process rows only). Ratios below compare loop mean with loop mean and median "
        "step with median step, never one with the other.",
        "",
        "| loop | loop mean images/s | median step images/s |",
        "|---|---|---|",
    ] + [f"| {name} | {cell(v, 'mean')} | {cell(v, 'median')} |" for name, v in rows] + [
        "",
        f"- loop mean / loop mean, ours (Ray, fp32) / lightly loop: **{ray_fp32 / lightly['mean']:.2f}x** with 2 "
        f"workers, **{ray1_fp32 / lightly['mean']:.2f}x** with 1 worker",
        f"- loop mean / loop mean, ours (Ray, fast option: channels_last + compile + native bf16 if any) / lightly "
        f"loop: **{ray_fast / lightly['mean']:.2f}x** with 2 workers, **{ray1_fast / lightly['mean']:.2f}x** with "
        "1 worker",
        f"- median step / median step, our in-process step (one fixed batch, augmentation included) / lightly's "
        f"step (DataLoader batch): **{ours['median'] / lightly['median']:.2f}x** (fp32), "
        f"**{ours_cl['median'] / lightly['median']:.2f}x** (channels_last)",
        f"- median step / median step, our step time / bare fwd+bwd step time: "
        f"**{bare['median'] / ours['median']:.3f}x** (fp32), **{bare_cl['median'] / ours_cl['median']:.3f}x** "
        "(channels_last)",
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
        "last epoch) and median step (images / median step time; lightly only). The ratios are loop mean / loop mean.",
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
        f"(fast option: channels_last + compile + native bf16 if any); 1 worker: **{ours1 / lightly['mean']:.2f}x** (fp32), "
        f"**{ours1_fast / lightly['mean']:.2f}x** (fast option). "
        "Both one-sided (`symmetric: false`, as lightly's example); our default symmetric loss does twice the "
        "encoder passes per image.",
        "",
    ]
    print("\n".join(lines))
    write_section(lines[0], "\n".join(lines[1:]), args.results)


if __name__ == "__main__":
    main()
