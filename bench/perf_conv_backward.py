"""Per-layer convolution cost of the B1 ResNet-18 (small stem, 32 px) in fp32 / bf16, contiguous /
channels_last: forward, and backward (input + weight gradients), on the CPU.

    python bench/perf_conv_backward.py [--batch 128] [--repeats 3]

Why: profiling sslctl's SimCLR step (bench/perf_levers.py --profile) showed bf16 autocast with
channels_last making `aten::mkldnn_convolution` (forward) 2.8x faster than fp32 but
`aten::convolution_backward` 2.2x slower. This isolates which layers' backward pays.
Variants run interleaved per layer so load from other processes hits them alike; medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

# (in, out, kernel, stride, input side) of every distinct conv of the small-stem ResNet-18 at 32 px
LAYERS = [
    (3, 64, 3, 1, 32), (64, 64, 3, 1, 32), (64, 128, 3, 2, 32), (128, 128, 3, 1, 16), (64, 128, 1, 2, 32),
    (128, 256, 3, 2, 16), (256, 256, 3, 1, 8), (128, 256, 1, 2, 16), (256, 512, 3, 2, 8), (512, 512, 3, 1, 4),
    (256, 512, 1, 2, 8),
]
# how many times each occurs in one forward (the same shapes repeat inside a stage)
COUNT = [1, 4, 1, 3, 1, 1, 3, 1, 1, 3, 1]
VARIANTS = ("fp32", "fp32+cl", "bf16", "bf16+cl")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, load {__import__('os').getloadavg()[0]:.1f}")
    print()
    print("| conv (in-out, k, stride, side) | x/fwd | " + " | ".join(f"{v} fwd ms | {v} bwd ms" for v in VARIANTS) + " |")
    print("| --- | ---: |" + " ---: | ---: |" * len(VARIANTS))
    totals = {v: [0.0, 0.0] for v in VARIANTS}
    for (cin, cout, k, s, side), n in zip(LAYERS, COUNT):
        conv = nn.Conv2d(cin, cout, k, s, padding=k // 2, bias=False)
        runs = {}
        for v in VARIANTS:
            fmt = torch.channels_last if v.endswith("cl") else torch.contiguous_format
            m = nn.Conv2d(cin, cout, k, s, padding=k // 2, bias=False).to(memory_format=fmt)
            m.load_state_dict(conv.state_dict())
            x = torch.randn(args.batch, cin, side, side).contiguous(memory_format=fmt).requires_grad_(cin != 3)
            runs[v] = (m, x, v.startswith("bf16"))
        times = {v: ([], []) for v in VARIANTS}
        for rep in range(args.repeats + 1):
            for v, (m, x, bf16) in runs.items():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = None

                    def fwd():
                        nonlocal out
                        out = m(x)

                    tf = timed(fwd)
                grad = torch.ones_like(out)
                tb = timed(lambda: out.backward(grad))
                m.zero_grad(set_to_none=True)
                x.grad = None
                if rep:  # the first round warms oneDNN's primitive cache
                    times[v][0].append(tf)
                    times[v][1].append(tb)
        cells = []
        for v in VARIANTS:
            f, b = statistics.median(times[v][0]), statistics.median(times[v][1])
            totals[v][0] += n * f
            totals[v][1] += n * b
            cells.append(f"{1000 * f:.1f} | {1000 * b:.1f}")
        print(f"| {cin}-{cout}, {k}x{k}, s{s}, {side} px | {n} | " + " | ".join(cells) + " |", flush=True)
    print("| **all convs of one forward/backward** | | " + " | ".join(f"**{1000 * f:.0f}** | **{1000 * b:.0f}**" for f, b in totals.values()) + " |")


if __name__ == "__main__":
    main()
