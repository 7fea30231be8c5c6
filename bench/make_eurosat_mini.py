"""Rebuild sslctl/_data/eurosat-mini (the embedded colour dataset) from an extracted EuroSAT RGB.

    .venv/bin/python bench/make_eurosat_mini.py /work/data/EuroSAT            # the shipped subset
    .venv/bin/python bench/make_eurosat_mini.py EUROSAT --out /tmp/x --side 64 --format jpg   # a candidate

EUROSAT is the folder `tar xzf ../shared/datasets/eurosat-rgb/eurosat-rgb.tar.gz` makes:
<Class>/<Class>_N.jpg (64x64) with the split lists train.csv / test.csv and label_map.json.
Train images come from train.csv only, test images from test.csv only. For each class in
label_map.json order, `numpy.random.default_rng(seed).choice(that class's rows, n, replace=False)`
(one generator for the whole run: train classes first, then test), rows sorted by file name;
each image is resized to --side px (PIL bicubic; 64 keeps the size) and encoded as --format
(keep: the source file's bytes, at 64 px).
The output is OUT/{train,test}/<Class>/<Class>_N.<ext> (the source file's name); existing
OUT/train and OUT/test are replaced, the LICENSE and README.md beside them are left as they are.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "sslctl" / "_data" / "eurosat-mini"
FORMATS = {"webp": ("WEBP", {"method": 6}), "jpg": ("JPEG", {"optimize": True}), "png": ("PNG", {"optimize": True})}


def draw(eurosat: Path, split: str, per_class: int, rng: np.random.Generator, classes: list[str]) -> list[str]:
    """per_class file names (Class/Class_N.jpg) of each class from SPLIT.csv, seeded."""
    with open(eurosat / f"{split}.csv", newline="") as f:
        rows = [r["Filename"] for r in csv.DictReader(f)]
    chosen = []
    for name in classes:
        of_class = sorted(r for r in rows if r.split("/")[0] == name)
        if len(of_class) < per_class:
            raise SystemExit(f"{eurosat / f'{split}.csv'}: class {name} has {len(of_class)} rows, fewer than {per_class}")
        picked = rng.choice(len(of_class), per_class, replace=False)
        chosen += sorted(of_class[i] for i in picked)
    return chosen


def encode(src: Path, side: int, fmt: str, quality: int) -> bytes:
    if fmt == "keep":
        return src.read_bytes()
    img = Image.open(src).convert("RGB")
    if img.size != (side, side):
        img = img.resize((side, side), Image.BICUBIC)
    kind, options = FORMATS[fmt]
    buf = io.BytesIO()
    img.save(buf, kind, **options, **({} if fmt == "png" else {"quality": quality}))
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("eurosat", type=Path, help="extracted EuroSAT RGB folder (with train.csv, test.csv, label_map.json)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--side", type=int, default=32)
    p.add_argument("--format", choices=[*sorted(FORMATS), "keep"], default="webp")
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    label_map = json.loads((args.eurosat / "label_map.json").read_text())
    classes = sorted(label_map, key=label_map.get)
    rng = np.random.default_rng(args.seed)
    picks = {split: draw(args.eurosat, split, n, rng, classes)
             for split, n in (("train", args.train_per_class), ("test", args.test_per_class))}

    for split in picks:  # the LICENSE and README beside them are kept files, not rebuilt
        shutil.rmtree(args.out / split, ignore_errors=True)
    total = 0
    for split, files in picks.items():
        for rel in files:
            dest = args.out / split / (rel if args.format == "keep" else Path(rel).with_suffix("." + args.format))
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data := encode(args.eurosat / rel, args.side, args.format, args.quality))
            total += len(data)
    n = sum(map(len, picks.values()))
    print(f"{args.out}: {n} images, {total / 2**20:.2f} MiB of image bytes ({total / n:.0f} B each)")


if __name__ == "__main__":
    main()
