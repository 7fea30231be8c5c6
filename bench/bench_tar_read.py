"""Tar parsing cost: sslctl's reader (sslctl.shardfmt.read_samples) beside webdataset's
tarfile-based one (tar_file_iterator + group_by_keys), on the shards `sslctl shard` makes of
a folder of small JPEGs (as bench_read.py). CPU seconds of this process (one thread), the
median of --repeats passes over every sample; raw parsing, then parsing + decoding.

    .venv/bin/python bench/bench_tar_read.py
    .venv/bin/python bench/bench_tar_read.py --jpegs 3000 --repeats 3   # a quick check
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_shard import write_jpeg_folder  # noqa: E402
from sslctl import console  # noqa: E402
from sslctl.data import decode_tensor  # noqa: E402
from sslctl.shard import Options, shard  # noqa: E402
from sslctl.shardfmt import load_manifest, read_samples, split_shards  # noqa: E402


def sslctl_reader(tar: Path):
    return read_samples(tar)


def webdataset_reader(tar: Path):
    import webdataset as wds

    with open(tar, "rb") as f:
        files = ({**x, "__url__": str(tar)} for x in wds.tariterators.tar_file_iterator(f))
        yield from wds.tariterators.group_by_keys(files)


def cpu_seconds(reader, tars, decode: bool) -> tuple[float, int]:
    t, n = time.process_time(), 0
    for tar in tars:
        for sample in reader(tar):
            if decode:
                decode_tensor(sample, rgb=True)
            n += 1
    return time.process_time() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jpegs", type=int, default=12_000)
    ap.add_argument("--side", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    console.set_quiet(True)
    torch.set_num_threads(1)
    readers = {"sslctl.shardfmt.read_samples": sslctl_reader, "webdataset tar_file_iterator + group_by_keys": webdataset_reader}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_jpeg_folder(Path(tmp) / "jpegs", args.jpegs, args.side)
        tars = split_shards(load_manifest(shard(Path(tmp) / "jpegs", Path(tmp) / "shards", options=Options(max_count=1000))), "train")
        for decode in (False, True):
            times: dict[str, list[float]] = {name: [] for name in readers}
            for _ in range(args.repeats):  # interleaved, so machine load hits both alike
                for name, reader in readers.items():
                    secs, n = cpu_seconds(reader, tars, decode)
                    times[name].append(secs)
            rows += [(name, decode, n, statistics.median(t)) for name, t in times.items()]
    print(f"\n{args.jpegs} JPEGs of {args.side}x{args.side} in {len(tars)} shards, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, median of {args.repeats}, CPU seconds (one thread)\n")
    print("| reader | work | samples | CPU s | samples/s | us/sample |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, decode, n, secs in rows:
        print(f"| {name} | {'parse + decode' if decode else 'parse'} | {n:,} | {secs:.3f} | {n / secs:,.0f} | {1e6 * secs / n:.1f} |")


if __name__ == "__main__":
    main()
