"""B4 (docs/spec/protocols.md): read + decode throughput of shards (sslctl.data.make_loader) beside
torchvision ImageFolder + PIL on the same images.

The same files two ways: a class folder of JPEGs (Fashion-MNIST train upscaled to --side px,
as in bench_shard.py) read by ImageFolder, and the shards `sslctl shard` made of that folder
(pass-through: the same JPEG bytes) read by make_loader. Both decode with PIL to RGB uint8
C x H x W tensors, batch 256, shuffled, the same DataLoader worker count, persistent workers.
One warm-up epoch, then the median of --repeats epochs (page cache warm for both).

    .venv/bin/python bench/bench_read.py
    .venv/bin/python bench/bench_read.py --jpegs 3000 --repeats 1 --workers 0 2   # a quick check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import PILToTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_shard import write_jpeg_folder  # noqa: E402
from sslctl import console  # noqa: E402
from sslctl.data import make_loader  # noqa: E402
from sslctl.shard import shard  # noqa: E402


def epoch_seconds(loader, repeats: int, set_epoch=None) -> tuple[float, int]:
    times, n = [], 0
    for epoch in range(repeats + 1):  # epoch 0 warms up workers and the page cache
        if set_epoch:
            set_epoch(epoch)
        t, n = time.perf_counter(), 0
        for images, _ in loader:
            n += len(images)
        if epoch:
            times.append(time.perf_counter() - t)
    return statistics.median(times), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jpegs", type=int, default=12_000)
    ap.add_argument("--side", type=int, default=96)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, len(os.sched_getaffinity(0))])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    console.set_quiet(True)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "jpegs", Path(tmp) / "shards"
        write_jpeg_folder(folder, args.jpegs, args.side)
        shard(folder, shards)
        for workers in args.workers:
            kw = dict(num_workers=workers, persistent_workers=workers > 0)
            folder_loader = DataLoader(ImageFolder(str(folder), transform=PILToTensor()), batch_size=args.batch,
                                       shuffle=True, drop_last=True, **kw)
            secs_folder, n_folder = epoch_seconds(folder_loader, args.repeats)
            shard_loader = make_loader(shards, "train", batch_size=args.batch, workers=workers, rgb=True)
            secs_shards, n_shards = epoch_seconds(shard_loader, args.repeats, shard_loader.set_epoch)
            assert n_folder == n_shards, (n_folder, n_shards)
            rows.append((workers, n_folder, n_folder / secs_folder, n_shards / secs_shards))
            del folder_loader, shard_loader

    print(f"\nread + decode: {args.jpegs} JPEGs of {args.side}x{args.side} -> RGB uint8 tensors, batch {args.batch}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end, median of {args.repeats} epochs\n")
    print("| DataLoader workers | images/epoch | ImageFolder + PIL (images/s) | sslctl shards (images/s) | shards / ImageFolder |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for workers, n, folder_rate, shard_rate in rows:
        print(f"| {workers} | {n:,} | {folder_rate:,.0f} | {shard_rate:,.0f} | {shard_rate / folder_rate:.2f}x |")


if __name__ == "__main__":
    main()
