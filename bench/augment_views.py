"""Augmentation throughput: per-sample views (DataLoader-worker path) vs one batched call.

    python bench/augment_views.py [--images 1024] [--batch 256] [--threads 1] [--repeats 3]

For each recipe's view set (small variant on 28-px Fashion-MNIST, 1 and 3 channels; the
ImageNet-size recipe on 3 x 256 x 256 images) it times:
  per-sample   sslctl.augment.build_views on each image (what one DataLoader worker does),
  batched cpu  sslctl.augment_batch.BatchViews on the uint8 batch, `--threads` torch threads,
  batched cuda the same on the GPU (when there is one), uint8 batch copied over first.
Prints a markdown table of images/s (median of --repeats) on stdout. Numbers in docs/recipes.md.

    python bench/augment_views.py --sizes 32,64,96,128,160

instead times MoCo v2's small-variant views (crop min(size, 128)) on random square RGB batches
of each size, batched vs per-sample on the CPU: where `pretrain --views auto` stops batching
(sslctl.data.BATCH_VIEWS_MAX_PIXELS; numbers in docs/performance.md).
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import time

import numpy as np
import torch

from sslctl.augment import build_views
from sslctl.augment_batch import BatchViews
from sslctl.paths import EMBEDDED_DATASET
from sslctl.recipes import load_recipe

MEAN, STD = (0.3, 0.3, 0.3), (0.35, 0.35, 0.35)


def fmnist(n: int) -> torch.Tensor:
    with gzip.open(EMBEDDED_DATASET / "train-images-idx3-ubyte.gz") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    x = torch.from_numpy(data[: n * 784].copy()).view(n, 1, 28, 28)
    return x


def timed(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up (allocations, cuDNN / kernels)
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--recipes", default="moco_v2,swav,byol")
    ap.add_argument("--sizes", default="", help="comma list of square image sizes: the batched/per-sample crossover")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.sizes:
        return crossover([int(v) for v in args.sizes.split(",")], args)
    gray = fmnist(args.images)
    colour = torch.cat([gray, (gray.float() * 0.6).to(torch.uint8), (gray.float() * 0.3 + 40).to(torch.uint8)], 1)
    big = torch.randint(0, 256, (args.batch, 3, 256, 256), dtype=torch.uint8)
    cuda = torch.cuda.is_available()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"torch {torch.__version__}, {cpu}, {args.threads} CPU thread(s), batch {args.batch}" + (f", GPU {torch.cuda.get_device_name()}" if cuda else ""))
    print()
    print("| recipe (variant) | input | views | per-sample img/s | batched CPU img/s | batched CUDA img/s |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for name in args.recipes.split(","):
        try:
            small, full = load_recipe(name, variant="small"), load_recipe(name, variant="none")
        except Exception as err:  # a recipe not written yet
            print(f"| {name} | skipped: {err} | | | | |")
            continue
        for cfg, images, label in [(small, gray, "28 px gray"), (small, colour, "28 px RGB"), (full, big, "256 px RGB")]:
            aug = cfg["augment"]
            per_sample, batched = build_views(aug, MEAN, STD), BatchViews(aug, MEAN, STD)
            n = min(len(images), 16 if label.startswith("256") else 512)
            sample_s = timed(lambda: [per_sample(x) for x in images[:n]], args.repeats) / n
            batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
            cpu_s = timed(lambda: [batched(b) for b in batches], args.repeats) / len(images)
            gpu = "-"
            if cuda:
                dev = [b.cuda() for b in batches]
                gpu_s = timed(lambda: [batched(b) for b in dev], args.repeats, torch.cuda.synchronize) / len(images)
                gpu = f"{1 / gpu_s:,.0f}"
            sizes = "+".join(str(v.shape[-1]) for v in per_sample(images[0]))
            print(f"| {name} ({cfg['recipe']['variant']}) | {label} | {sizes} | {1 / sample_s:,.0f} | {1 / cpu_s:,.0f} | {gpu} |", flush=True)


def crossover(sizes: list[int], args) -> None:
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), batch 64, MoCo v2 small-variant views")
    print()
    print("| image px | crop px | per-sample img/s | batched img/s | batched / per-sample |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for size in sizes:
        crop = min(size, 128)
        aug = load_recipe("moco_v2", variant="small", overrides=[f"augment.crop_size={crop}"])["augment"]
        per_sample, batched = build_views(aug, MEAN, STD), BatchViews(aug, MEAN, STD)
        images = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8)
        sample_s = timed(lambda: [per_sample(x) for x in images], args.repeats) / len(images)
        batch_s = timed(lambda: batched(images), args.repeats) / len(images)
        print(f"| {size} | {crop} | {1 / sample_s:,.0f} | {1 / batch_s:,.0f} | {sample_s / batch_s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
