"""Real inputs for the evaluation tests (embed, knn, linear, plot, pipes): small idx subsets of
the embedded Fashion-MNIST packed by `sslctl shard`, and features files written by the real
`sslctl embed` code."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from sslctl.paths import EMBEDDED_DATASET
from sslctl.shard import Options, shard
from sslctl.sources import read_idx

# A random ResNet-18 at 32 px with the ImageNet stem: about 25x cheaper than the small stem,
# so a few hundred images embed in seconds on a shared 2-core machine.
CHEAP_ENCODER = ["resnet18", "--weights", "random", "--input-size", "32", "--no-bf16", "--workers", "0"]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def idx_subset(root: Path, n_train: int, n_test: int) -> Path:
    """The first n_train / n_test images of the embedded set as idx files in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            write_idx(root / name, read_idx(EMBEDDED_DATASET / name)[:n])
    return root


def make_shards(root: Path, n_train: int = 200, n_test: int = 100, max_count: int = 50) -> Path:
    """idx subset -> `sslctl shard` -> the shards directory."""
    src = idx_subset(root / "idx", n_train, n_test)
    return shard(src, root / "shards", options=Options(max_count=max_count), workers=1).parent


def make_unlabelled_shards(root: Path, n: int = 40) -> Path:
    """A folder of unlabelled PNGs -> `sslctl shard` (the usual pretraining input)."""
    from PIL import Image

    src = root / "images"
    src.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(read_idx(EMBEDDED_DATASET / "t10k-images-idx3-ubyte.gz")[:n]):
        Image.fromarray(image).save(src / f"{i:03d}.png")
    return shard(src, root / "unlabelled", workers=1).parent


def write_features(path: Path, splits: dict, metadata: dict | None = None) -> Path:
    """A hand-made features file: {split: (features, labels)} with sslctl's metadata, or other
    metadata to imitate a file sslctl did not write."""
    tensors = {}
    for split, (x, y) in splits.items():
        tensors[f"{split}.features"], tensors[f"{split}.labels"] = x.contiguous(), y.contiguous()
    meta = metadata if metadata is not None else {
        "format": "sslctl-features", "version": "1", "layer": "backbone", "splits": json.dumps(list(splits)),
        "encoder": "{}", "shards": "{}", "classes": "null", "normalization": "{}", "provenance": "{}",
        "input_size": "32", "bf16": "false",
    }
    save_file(tensors, str(path), metadata=meta)
    return path
