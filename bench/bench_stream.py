"""B4-stream: read + decode throughput of the same shards on local disk and streamed over HTTP.

The shards `sslctl shard` makes of a class folder of JPEGs (Fashion-MNIST train upscaled to
--side px, as in bench_read.py), read by sslctl.data.make_loader two ways: from the shards
directory (its manifest) and as a foreign brace pattern of URLs served by `python -m
http.server` in a subprocess on 127.0.0.1 (the index pass that counts the samples is timed
apart). Batch 256, shuffled, RGB uint8 tensors, persistent workers; per worker count one
warm-up epoch each, then --repeats epochs alternating local / HTTP (back to back, so machine
load hits both alike); the median epoch. Target: HTTP >= 0.8x local.

    .venv/bin/python bench/bench_stream.py --record NAME     # writes bench/results/b4-stream-...-NAME.json
    .venv/bin/python bench/bench_stream.py --jpegs 3000 --repeats 1 --workers 2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_shard import write_jpeg_folder  # noqa: E402
from sslctl import console  # noqa: E402
from sslctl.data import make_loader  # noqa: E402
from sslctl.datasets import open_dataset  # noqa: E402
from sslctl.shard import Options, shard  # noqa: E402
from sslctl.shardfmt import load_manifest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def serve(directory: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(directory),
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the HTTP server did not start")


def one_epoch(loader, epoch: int) -> tuple[float, int]:
    loader.set_epoch(epoch)
    t, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jpegs", type=int, default=12_000)
    ap.add_argument("--side", type=int, default=96)
    ap.add_argument("--per-shard", type=int, default=1000, help="images per shard (--max-count)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, len(os.sched_getaffinity(0))])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--record", help="write the results to bench/results/b4-stream-DATE-RECORD.json")
    args = ap.parse_args()
    console.set_quiet(True)
    torch.set_num_threads(1)
    load_before, rows = os.getloadavg(), []
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "jpegs", Path(tmp) / "shards"
        write_jpeg_folder(folder, args.jpegs, args.side)
        shard(folder, shards, options=Options(max_count=args.per_shard))
        local = load_manifest(shards)
        n = len(local["splits"]["train"]["shards"])
        server, port = serve(shards)
        try:
            t, cpu = time.perf_counter(), time.process_time()
            remote = open_dataset(f"http://127.0.0.1:{port}/train-{{000000..{n - 1:06d}}}.tar", index_dir=Path(tmp) / "index")
            index_s, index_cpu = time.perf_counter() - t, time.process_time() - cpu
            assert remote["splits"]["train"]["count"] == local["splits"]["train"]["count"]
            for workers in args.workers:
                loaders = {name: make_loader(d, "train", batch_size=args.batch, workers=workers, rgb=True, rank=0, world_size=1)
                           for name, d in (("local", local), ("http", remote))}
                times: dict[str, list[float]] = {"local": [], "http": []}
                for epoch in range(args.repeats + 1):  # epoch 0 warms up workers, page cache, connections
                    for name, loader in loaders.items():
                        secs, images = one_epoch(loader, epoch)
                        if epoch:
                            times[name].append(secs)
                assert all(loader.skipped() == {"shards": 0, "samples": 0} for loader in loaders.values())
                local_rate, http_rate = (images / statistics.median(times[k]) for k in ("local", "http"))
                rows.append({"workers": workers, "images": images, "local": local_rate, "http": http_rate})
                del loaders
        finally:
            server.kill()
    load_after = os.getloadavg()

    print(f"\nread + decode: {args.jpegs} JPEGs of {args.side}x{args.side} in {n} shards -> RGB uint8 tensors, batch "
          f"{args.batch}, {os.cpu_count()} cores, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after, "
          f"median of {args.repeats} epochs\nindex pass over HTTP (counts, labels, statistics of the first 1,000 images): "
          f"{index_s:.2f} s wall, {index_cpu:.2f} s CPU (main process)\n")
    print("| DataLoader workers | images/epoch | local disk (images/s) | HTTP 127.0.0.1 (images/s) | HTTP / local |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['workers']} | {r['images']:,} | {r['local']:,.0f} | {r['http']:,.0f} | {r['http'] / r['local']:.2f}x |")
    if args.record:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"b4-stream-{time.strftime('%Y%m%d-%H%M%S')}-{args.record}.json"
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS).stdout.strip()
        path.write_text(json.dumps({
            "protocol": "b4-stream", "label": args.record, "argv": sys.argv, "cores": os.cpu_count(),
            "load_average": {"before": load_before, "after": load_after}, "sslctl_commit": commit,
            "index": {"wall_s": index_s, "cpu_s": index_cpu}, "rows": rows,
        }, indent=1) + "\n")
        print(f"\nrecord: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
