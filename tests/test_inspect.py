"""`sslctl inspect`: each artifact kind described from its metadata; JSON line on stdout only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sslctl.encoder_io import save_encoder
from sslctl.encoders import build_backbone
from sslctl.inspect import describe
from sslctl.paths import RECIPES_DIR
from sslctl.shard import Options, shard
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def shards(tmp_path_factory, mini_idx) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "shards"
    shard(mini_idx, out, options=Options(max_count=2000, val_fraction=0.1), workers=2)
    return out


def test_shards_by_cli_and_by_pipe(shards):
    result = run_cli("inspect", str(shards))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1  # one JSON line, nothing else
    summary = json.loads(result.stdout)
    assert summary["kind"] == "shards"
    assert {k: v["count"] for k, v in summary["splits"].items()} == {"train": 4500, "val": 500, "test": 1000}
    assert summary["splits"]["train"]["shards"] == 3 and summary["num_classes"] == 10
    assert summary["channels"] == 1 and summary["image_size"] == [28, 28] and summary["skipped"] == 0
    assert "Ankle boot" in result.stderr and "val_fraction=0.1" in result.stderr  # the table, on stderr
    piped = run_cli("inspect", "--quiet", stdin=f"{shards / 'manifest.json'}\n")
    assert piped.returncode == 0 and json.loads(piped.stdout) == summary and piped.stderr == ""


def test_encoder_and_run_directory(tmp_path, mini_shards):
    backbone = build_backbone("resnet18", small_stem=True)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_encoder(run / "encoder.safetensors", backbone, small_stem=True, input_size=32, mean=[0.5], std=[0.25],
                 recipe="moco_v2", inputs={"shards": mini_shards / "manifest.json"})  # only hashed
    summary = describe(run / "encoder.safetensors").summary
    assert summary["kind"] == "encoder" and summary["arch"] == "resnet18" and summary["feature_dim"] == 512
    assert summary["parameters"] == sum(v.numel() for v in backbone.state_dict().values())

    shutil.copy(RECIPES_DIR / "moco_v2.toml", run / "recipe.toml")
    torch.save({"step": 3}, run / "checkpoints" / "last.pt")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.5}\n{"step": 3, "lo')
    result = run_cli("inspect", str(run))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["kind"] == "run" and summary["recipe"]["name"] == "moco_v2" and summary["recipe"]["method"] == "moco"
    assert summary["metrics"] == {"records": 2, "last": {"step": 2, "loss": 4.5}}  # the cut line is not counted
    assert summary["checkpoint"]["bytes"] == (run / "checkpoints" / "last.pt").stat().st_size
    assert summary["encoder"]["arch"] == "resnet18"


def test_features_file(tmp_path):
    path = tmp_path / "feats.safetensors"
    tensors = {"train.features": torch.randn(30, 8), "train.labels": torch.arange(30),
               "test.features": torch.randn(10, 8), "test.labels": torch.arange(10)}
    save_file(tensors, str(path), metadata={"format": "sslctl-features", "layer": "backbone",
                                            "classes": json.dumps(["a", "b"]), "provenance": json.dumps({"command": "x"})})
    summary = describe(path).summary
    assert summary["kind"] == "features" and summary["layer"] == "backbone" and summary["classes"] == ["a", "b"]
    assert summary["splits"] == {"train": {"n": 30, "dim": 8}, "test": {"n": 10, "dim": 8}}


def test_not_an_artifact_exits_2(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    for target, message in [
        (tmp_path / "missing", "no such file"),
        (tmp_path / "notes.txt", "not an sslctl artifact"),
        (tmp_path / "plain.safetensors", "not an sslctl artifact"),
        (tmp_path / "broken.safetensors", "not a readable safetensors file"),
        (tmp_path, "not an sslctl artifact"),
    ]:
        result = run_cli("inspect", str(target))
        assert result.returncode == 2 and message in result.stderr and result.stdout == "", target
