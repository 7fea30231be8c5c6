"""docs/spec/protocols.md B4 (embed): `sslctl embed` images/s beside the model's forward pass alone on the
same batches. Target: embed >= 0.9x forward alone.

    python bench/bench_embed.py SHARDS                           # resnet18, small stem, 32 px, test split
    python bench/bench_embed.py SHARDS --split train --device cuda --workers 15
    python bench/bench_embed.py SHARDS --precision fp32 bf16 --layouts contiguous channels_last

embed   the whole stage in-process: sslctl.embed.embed (decode + eval transform in DataLoader
        workers, forward, per-shard parts, the features file written and hashed), wall clock.
forward the same images, decoded and transformed beforehand and already on the device in
        batches of the same size: only model(x) is timed (CUDA synchronised).
Both use the same random ResNet-18, bf16 autocast or not, and memory layout. A markdown table
goes to stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sslctl.augment import eval_transform  # noqa: E402
from sslctl.data import iter_shard, load_manifest, split_shards  # noqa: E402
from sslctl.embed import embed, open_encoder, resolve_normalization  # noqa: E402
from sslctl.devices import resolve_device  # noqa: E402


def forward_alone(model, batches, device, bf16: bool, repeats: int) -> float:
    """Median images/s of model(x) over all batches (already on the device)."""
    n = sum(len(b) for b in batches)
    rates = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model(batches[0])  # warm-up (cuDNN algorithm choice, oneDNN primitives)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for x in batches:
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--layouts", nargs="+", default=["channels_last"], choices=["contiguous", "channels_last"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = resolve_device(args.device)
    manifest = load_manifest(args.shards)
    enc = open_encoder(args.encoder, weights="random", small_stem=args.small_stem, input_size=args.input_size)
    mean, std, _ = resolve_normalization("auto", enc, manifest)
    transform = eval_transform(enc.input_size, mean, std)
    images = torch.stack([transform(img) for tar in split_shards(manifest, args.split) for _, img, _ in iter_shard(tar, rgb=True)])
    print(f"{len(images)} images of {args.split}, {args.encoder} small_stem={args.small_stem} at {args.input_size} px, "
          f"batch {args.batch_size}, {device}, torch {torch.__version__}, threads {torch.get_num_threads()}", file=sys.stderr)

    print("\n| precision | layout | embed (images/s) | forward alone (images/s) | embed / forward |")
    print("| --- | --- | ---: | ---: | ---: |")
    for precision in args.precision:
        for layout in args.layouts:
            bf16, channels_last = precision == "bf16", layout == "channels_last"
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = enc.model.to(device).eval().to(memory_format=fmt)
            batches = [images[s : s + args.batch_size].to(device).contiguous(memory_format=fmt)
                       for s in range(0, len(images), args.batch_size)]
            forward = forward_alone(model, batches, device, bf16, args.repeats)
            del batches
            rates = []
            with tempfile.TemporaryDirectory() as tmp:
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    embed(args.encoder, args.shards, splits=[args.split], out=Path(tmp) / "f.safetensors", weights="random",
                          small_stem=args.small_stem, input_size=args.input_size, batch_size=args.batch_size,
                          device=str(device), bf16=bf16, channels_last=channels_last, workers=args.workers)
                    rates.append(len(images) / (time.perf_counter() - start))
            stage = statistics.median(rates)
            print(f"| {precision} | {layout} | {stage:,.0f} | {forward:,.0f} | {stage / forward:.2f} |", flush=True)


if __name__ == "__main__":
    main()
