"""The device's attainable peak arithmetic rate: the best of a few large square matmuls.

    python bench/peak_flops.py [--device cpu|cuda] [--size 4096] [--repeats 5]

compare.py divides each training step's counted FLOPs per second by this fp32 number ("fraction
of peak"). bf16 is reported beside it: on CPUs with AVX512-BF16/AMX and on GPUs it is the ceiling
a bf16-autocast step can approach. On CUDA the fp32 figure is measured with TF32 off (true fp32).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, size: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of `repeats` size x size x size matmuls (2 n^3 FLOPs each), after one warm-up."""
    device = torch.device(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        torch.mm(a, b)
        _sync(device)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - t)
        return 2.0 * size**3 / best
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def measure(device: str = "cpu", size: int | None = None, repeats: int = 5) -> dict:
    """{"fp32": FLOP/s, "bf16": FLOP/s, "size", "threads", "device"} for one device."""
    from sslctl.devices import default_amp

    size = size or (8192 if torch.device(device).type == "cuda" else 4096)
    # Without native bf16 (a CPU with AVX2 only) sslctl trains in fp32 and a bf16 matmul is
    # emulated at ~1 GFLOP/s: one small one tells that rate without minutes of waiting.
    native_bf16 = default_amp(torch.device(device))
    return {
        "device": device,
        "size": size,
        "threads": torch.get_num_threads(),
        "native_bf16": native_bf16,
        "fp32": peak_flops(device, torch.float32, size, repeats),
        "bf16": peak_flops(device, torch.bfloat16, size if native_bf16 else 1024, repeats if native_bf16 else 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    result = measure(args.device, args.size, args.repeats)
    print(json.dumps(result))
    print(f"fp32 {result['fp32'] / 1e9:,.1f} GFLOP/s, bf16 {result['bf16'] / 1e9:,.1f} GFLOP/s "
          f"({result['size']}^3 matmul, {result['threads']} threads, {args.device})")


if __name__ == "__main__":
    main()
