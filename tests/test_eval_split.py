"""Which split knn and linear score: `test` when the data has one, else `val` (ImageNet-style data
ships train/val only), said in the table and the result line; an error names a split that exists
and the flag that selects it."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from sslctl.cli import main
from sslctl.data import load_manifest
from sslctl.paths import EMBEDDED_DATASET
from sslctl.shard import Options, shard
from sslctl.sources import read_idx
from tests.evalkit import write_features, write_idx


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def sslctl(monkeypatch, capsys, *args):
    """The real entry point, in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["sslctl", *map(str, args)])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def features(path, splits):
    torch.manual_seed(0)
    centres = torch.randn(3, 8) * 4  # three separable classes
    data = {}
    for name, n in splits.items():
        y = torch.arange(n) % 3
        data[name] = (centres[y] + torch.randn(n, 8), y)
    return write_features(path, data)


@pytest.mark.parametrize("command", ["knn", "linear"])
def test_without_a_test_split_val_is_scored_and_named(tmp_path, monkeypatch, capsys, command):
    feats = features(tmp_path / "f.safetensors", {"train": 240, "val": 30})
    code, out, err = sslctl(monkeypatch, capsys, command, feats)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines and all(line["eval_split"] == "val" and line["n_eval"] == 30 for line in lines)
    assert "split val" in err  # said on stderr too (the table's title, or linear's line)


@pytest.mark.parametrize("command", ["knn", "linear"])
def test_test_is_preferred_to_val(tmp_path, monkeypatch, capsys, command):
    feats = features(tmp_path / "f.safetensors", {"train": 240, "val": 30, "test": 15})
    code, out, err = sslctl(monkeypatch, capsys, command, feats)
    assert code == 0, err
    assert all(json.loads(line)["eval_split"] == "test" and json.loads(line)["n_eval"] == 15 for line in out.splitlines())


@pytest.mark.parametrize("command", ["knn", "linear"])
def test_an_asked_split_that_is_missing_suggests_one_that_exists(tmp_path, monkeypatch, capsys, command):
    feats = features(tmp_path / "f.safetensors", {"train": 240, "val": 30})
    code, out, err = sslctl(monkeypatch, capsys, command, feats, "--eval-split", "test")
    assert code == 2 and out == "" and "Traceback" not in err
    assert "no split 'test' (it has: train, val)" in err and "--eval-split val" in err, err


@pytest.mark.parametrize("command", ["knn", "linear"])
def test_no_held_out_split_at_all(tmp_path, monkeypatch, capsys, command):
    feats = features(tmp_path / "f.safetensors", {"train": 240})
    code, out, err = sslctl(monkeypatch, capsys, command, feats)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "no test or val split" in err and "--eval-split" in err and "--val-fraction" in err, err


def test_the_augmented_probe_scores_val_when_the_shards_have_no_test(tmp_path, monkeypatch, capsys):
    from sslctl.encoder_io import save_encoder
    from sslctl.encoders import build_backbone

    src = tmp_path / "idx"
    src.mkdir()
    for kind in ("images-idx3", "labels-idx1"):
        name = f"train-{kind}-ubyte.gz"
        write_idx(src / name, read_idx(EMBEDDED_DATASET / name)[:100])
    shards = shard(src, tmp_path / "shards", options=Options(val_fraction=0.3), workers=1).parent
    torch.manual_seed(0)
    encoder = save_encoder(tmp_path / "encoder.safetensors", build_backbone("resnet18"), small_stem=False,
                           input_size=32, mean=[0.28] * 3, std=[0.35] * 3, recipe="none")
    code, out, err = sslctl(monkeypatch, capsys, "linear", encoder, "--protocol", "augment", "--shards", shards,
                            "--epochs", "1", "--lr", "0.1", "--batch-size", "35", "--workers", "0")
    assert code == 0, err
    line = json.loads(out)
    n_val = load_manifest(shards)["splits"]["val"]["count"]
    assert line["eval_split"] == "val" and line["train_split"] == "train" and line["n_eval"] == n_val
    assert "split val" in err
