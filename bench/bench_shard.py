"""B4 (docs/spec/protocols.md): `sslctl shard` throughput beside `tar` of the same files.

Two workloads:
  1. full Fashion-MNIST, idx source (70,000 raw 28x28 arrays -> lossless PNG in the shards);
  2. a folder of >= 10k real JPEGs (Fashion-MNIST train images, upscaled to --side px, class
     folders), sharded as pass-through (original bytes), beside `tar cf` of the same folder.

Each timing is the median of --repeats runs from a warm page cache (the files were just written
or read), output into a fresh directory. Prints a markdown table on stdout.

    .venv/bin/python bench/bench_shard.py                       # full sizes
    .venv/bin/python bench/bench_shard.py --jpegs 2000 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sslctl import console  # noqa: E402
from sslctl.shard import Options, shard  # noqa: E402
from sslctl.sources import read_idx  # noqa: E402

FMNIST = Path(os.environ.get("SSLCTL_SHARED", REPO.parent / "shared")) / "datasets" / "fashion-mnist"


def write_jpeg_folder(root: Path, n: int, side: int) -> int:
    """n JPEGs (quality 90) in class folders, from Fashion-MNIST train (the embedded subset if
    the full set is absent, cycled). Returns the folder's total bytes."""
    src = FMNIST if (FMNIST / "train-images-idx3-ubyte.gz").exists() else REPO / "sslctl/_data/fashion-mnist-mini"
    images = read_idx(src / "train-images-idx3-ubyte.gz")
    labels = read_idx(src / "train-labels-idx1-ubyte.gz")
    for c in range(10):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(n):
        j = i % len(images)
        path = root / f"class_{labels[j]}" / f"{i:06d}.jpg"
        img = Image.fromarray(images[j])
        if side != 28:
            img = img.resize((side, side), Image.BILINEAR)
        img.convert("RGB").save(path, quality=90)
        total += path.stat().st_size
    return total


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (tar, pool workers): less sensitive
    to a shared machine's load than wall time."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) over `repeats` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), _cpu()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(_cpu() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jpegs", type=int, default=12_000)
    ap.add_argument("--side", type=int, default=96, help="JPEG side in pixels (STL-10-like by default)")
    ap.add_argument("--workers", type=int, default=None, help="shard --workers [all cores]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-idx", action="store_true")
    args = ap.parse_args()
    console.set_quiet(True)
    workers = args.workers or len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def fresh(name: str) -> Path:
            out = tmp / name
            shutil.rmtree(out, ignore_errors=True)
            return out

        if not args.skip_idx and (FMNIST / "train-images-idx3-ubyte.gz").exists():
            secs = timed(lambda: shard(FMNIST, fresh("idx"), options=Options(), workers=workers), args.repeats)
            rows.append(("shard, Fashion-MNIST idx -> PNG", 70_000, *secs, "-"))

        folder = tmp / "jpegs"
        size = write_jpeg_folder(folder, args.jpegs, args.side)
        tar = timed(lambda: subprocess.run(["tar", "cf", str(fresh("plain.tar")), "-C", str(folder), "."], check=True),
                    args.repeats)
        jpg = timed(lambda: shard(folder, fresh("jpg"), options=Options(), workers=workers), args.repeats)
        rows.append((f"`tar cf` of the JPEG folder ({size / 2**20:.0f} MB)", args.jpegs, *tar, "1.00x"))
        rows.append(("shard, JPEG folder (pass-through)", args.jpegs, *jpg, f"{tar[0] / jpg[0]:.2f}x"))

    load = os.getloadavg()[0]
    print(f"\nshard throughput: {args.jpegs} JPEGs of {args.side}x{args.side}, --workers {workers}, "
          f"{os.cpu_count()} cores, load average {load:.1f} at the end, median of {args.repeats}\n")
    print("| workload | images | wall s | images/s | CPU s | speed vs tar (wall) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, n, secs, cpu, ratio in rows:
        print(f"| {name} | {n:,} | {secs:.2f} | {n / secs:,.0f} | {cpu:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
