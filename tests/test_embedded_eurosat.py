"""The embedded colour dataset, sslctl/_data/eurosat-mini (the main job's): it shards cleanly into
the splits and per-class counts its README documents, every image RGB at its documented size and
labelled with its class folder; the train and test images come from EuroSAT's own train.csv and
test.csv, never mixed. (That a wheel carries it: tests/test_packaging.py.)"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from sslctl.paths import EUROSAT_MINI
from tests.conftest import run_cli

CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake"]
PER_CLASS = {"train": 500, "test": 100}  # as sslctl/_data/eurosat-mini/README.md says
SIDE = 32
EUROSAT_TAR = Path(os.environ.get("SSLCTL_SHARED", Path(__file__).resolve().parents[2] / "shared")) / \
    "datasets" / "eurosat-rgb" / "eurosat-rgb.tar.gz"


def _files(split: str) -> list[str]:
    """The split's images as Class/Class_N (the EuroSAT file name without its extension)."""
    return sorted(p.relative_to(EUROSAT_MINI / split).with_suffix("").as_posix()
                  for p in (EUROSAT_MINI / split).rglob("*") if p.is_file())


def test_eurosat_mini_shards_into_its_documented_splits(tmp_path):
    out = tmp_path / "shards"
    done = run_cli("shard", str(EUROSAT_MINI), str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / "manifest.json")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "folder" and manifest["labelled"] is True
    assert manifest["classes"] == CLASSES and manifest["channels"] == 3 and manifest["image_size"] == [SIDE, SIDE]
    assert manifest["skipped"] == [] and list(manifest["splits"]) == ["train", "test"]

    for split, per_class in PER_CLASS.items():
        labels, modes, sizes = Counter(), Counter(), Counter()
        for shard in manifest["splits"][split]["shards"]:
            with tarfile.open(out / shard["name"]) as tar:  # read back without sslctl's reader
                for member in tar:
                    data = tar.extractfile(member).read()
                    if member.name.endswith(".cls"):
                        labels[int(data)] += 1
                    else:
                        with Image.open(io.BytesIO(data)) as img:
                            modes[img.mode] += 1
                            sizes[img.size] += 1
        assert labels == {c: per_class for c in range(len(CLASSES))}, split
        assert modes == {"RGB": per_class * len(CLASSES)} and sizes == {(SIDE, SIDE): per_class * len(CLASSES)}
        assert manifest["splits"][split]["count"] == per_class * len(CLASSES)


def test_eurosat_mini_carries_its_licence_and_provenance():
    licence = (EUROSAT_MINI / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Copyright (c) 2023 Patrick Helber" in licence
    readme = (EUROSAT_MINI / "README.md").read_text()
    assert "bench/make_eurosat_mini.py" in readme and "https://github.com/phelber/EuroSAT" in readme
    assert {p.name for p in EUROSAT_MINI.iterdir()} == {"LICENSE", "README.md", "train", "test"}


def test_eurosat_mini_train_and_test_come_from_eurosats_own_splits():
    train, test = _files("train"), _files("test")
    assert not set(train) & set(test)
    if not EUROSAT_TAR.is_file():
        pytest.skip(f"EuroSAT RGB not found at {EUROSAT_TAR} (set SSLCTL_SHARED or check out ../shared)")
    lists = {}
    with tarfile.open(EUROSAT_TAR, "r|gz") as tar:  # the split lists sit at the archive's end
        for member in tar:
            name = Path(member.name).name
            if name in ("train.csv", "test.csv"):
                rows = csv.DictReader(io.StringIO(tar.extractfile(member).read().decode("utf-8")))
                lists[name] = {str(Path(r["Filename"]).with_suffix("")) for r in rows}
    assert set(train) <= lists["train.csv"] and set(test) <= lists["test.csv"]
