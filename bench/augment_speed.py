"""Throughput of the batched SimCLRAugment vs lightly's per-image SimCLRTransform (single process).

Why: to quote how much the batched augmentation saves over the PIL path, and how it compares with the
backbone step it feeds (resnet18 forward+backward on a 256 x 3 x 32 x 32 batch). Counts are views/s:
SimCLRAugment makes one view per image per call, lightly's SimCLRTransform makes two.
PIL images are prepared outside the timed region (which flatters lightly slightly).

    .venv/bin/python bench/augment_speed.py [--batch 512] [--reps 5] [--threads N] [--no-resnet]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretext.transforms import SimCLRAugment, to_float  # noqa: E402


def _time(fn, reps: int) -> tuple[float, float]:
    """(best, median) seconds over reps after one warm-up call; best is least disturbed by shared cores."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-resnet", action="store_true", help="skip the resnet18 forward+backward reference")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    b, s = args.batch, args.size
    data = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8)
    # Other processes on a shared box distort these numbers badly (intra-op thread pools then spin on
    # descheduled cores), so the load average is printed with them.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, cpus={os.cpu_count()}, "
          f"load(1 min)={load:.2f}, batch {b} x 3 x {s} x {s}")

    aug = SimCLRAugment(input_size=s)
    x = to_float(data)
    with torch.no_grad():
        best, med = _time(lambda: aug(x), args.reps)
    ours = b / best
    print(f"SimCLRAugment (batched):        {ours:12,.0f} views/s  "
          f"({best * 1e3:7.1f} ms best, {med * 1e3:7.1f} ms median per {b} views)")

    from lightly.transforms import SimCLRTransform
    from torchvision.transforms.v2.functional import to_pil_image

    pil = [to_pil_image(img) for img in data]
    lt = SimCLRTransform(input_size=s)
    best_l, med_l = _time(lambda: [lt(im) for im in pil], max(1, args.reps // 2))
    theirs = 2 * b / best_l
    print(f"lightly SimCLRTransform (PIL):  {theirs:12,.0f} views/s  "
          f"({best_l * 1e3:7.1f} ms best, {med_l * 1e3:7.1f} ms median per {b} images = {2 * b} views)")
    print(f"speed-up (views/s): {ours / theirs:.1f}x")

    if not args.no_resnet:
        from torchvision.models import resnet18

        n = 256
        model = resnet18(num_classes=10)
        xb = x[:n]
        with torch.no_grad():
            best_a, _ = _time(lambda: aug(xb), args.reps)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(xb).sum().backward()

        best_r, med_r = _time(step, max(1, args.reps // 2))
        print(f"resnet18 fwd+bwd, {n} x 3 x {s} x {s}: {best_r * 1e3:7.1f} ms best ({med_r * 1e3:.1f} ms median); "
              f"SimCLRAugment on the same batch: {best_a * 1e3:.1f} ms = {100 * best_a / best_r:.1f}% of it")


if __name__ == "__main__":
    main()
