"""Unix manners of the evaluation stages: paths through pipes (real subprocesses and a real
shell), one clean result on stdout, and every bad input of issue 4 -> a message naming the
file and what is missing, exit 2, no traceback."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest
import torch

from sslctl.cli import main
from sslctl.embed import embed
from tests.evalkit import CHEAP_ENCODER, make_shards, make_unlabelled_shards, write_features
from tests.conftest import run_bounded


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("pipes"), n_train=300, n_test=100, max_count=100)


@pytest.fixture(scope="module")
def features(shards, tmp_path_factory):
    return embed("resnet18", shards, weights="random", input_size=32, bf16=False, workers=0,
                 out=tmp_path_factory.mktemp("feats") / "f.safetensors")


def sslctl(monkeypatch, capsys, *args, stdin: str = ""):
    """The real entry point (sslctl.cli.main), in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["sslctl", *map(str, args)])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_embed_pipes_into_knn_linear_and_plot_in_a_shell(shards, tmp_path):
    script = f"""
        set -euo pipefail
        sslctl() {{ "{sys.executable}" -m sslctl "$@"; }}
        sslctl embed {' '.join(CHEAP_ENCODER)} {shards} --out {tmp_path}/f.safetensors \
            | tee {tmp_path}/path.txt | sslctl knn --k 20 -t 0.07 > {tmp_path}/knn.jsonl
        sslctl linear --quiet < {tmp_path}/path.txt > {tmp_path}/linear.jsonl
        FEATS=$(cat {tmp_path}/path.txt)
        sslctl plot "$FEATS" --out {tmp_path}/map.png
    """
    res = run_bounded(["bash", "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    (knn,) = [json.loads(line) for line in (tmp_path / "knn.jsonl").read_text().splitlines()]
    assert knn["task"] == "knn" and knn["protocol"] == "weighted-knn/cosine/k=20/T=0.07"
    assert knn["features"] == str(tmp_path / "f.safetensors") and len(knn["features_sha256"]) == 64
    assert 30.0 < knn["top1"] <= 100.0 and knn["n_bank"] == 300 and knn["n_eval"] == 100
    (linear,) = [json.loads(line) for line in (tmp_path / "linear.jsonl").read_text().splitlines()]
    assert linear["task"] == "linear" and linear["protocol"].startswith("linear/precomputed/")
    assert res.stdout == f"{tmp_path / 'map.png'}\n"  # plot prints only its path
    assert "weighted kNN" in res.stderr  # the table went to stderr


def test_knn_default_output_is_one_json_line_per_pair(features, monkeypatch, capsys):
    code, out, err = sslctl(monkeypatch, capsys, "knn", "-", stdin=f"{features}\n")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(r["k"], r["temperature"]) for r in lines] == [(20, 0.07), (200, 0.1)]
    assert {"task", "protocol", "k", "temperature", "top1", "top5", "n_bank", "n_eval", "features", "features_sha256"} <= set(lines[0])
    assert "top-5" in err and "Ankle boot" not in out


def expect_user_error(monkeypatch, capsys, *args, stdin="", names=(), says=()):
    code, out, err = sslctl(monkeypatch, capsys, *args, stdin=stdin)
    assert code == 2, (out, err)
    assert out == ""  # nothing a script could mistake for a result
    assert "Traceback" not in err
    for text in (*map(str, names), *says):
        assert text in err, (text, err)
    return err


def test_features_without_the_asked_split(features, monkeypatch, capsys):
    for command in ("knn", "linear"):
        expect_user_error(monkeypatch, capsys, command, features, "--eval-split", "val",
                          names=[features], says=["no split 'val'", "train, test"])


def test_mismatched_dimensions_between_splits(tmp_path, monkeypatch, capsys):
    feats = write_features(tmp_path / "bad.safetensors", {
        "train": (torch.randn(30, 8), torch.arange(30) % 3), "test": (torch.randn(10, 4), torch.arange(10) % 3)})
    for command in ("knn", "linear"):
        expect_user_error(monkeypatch, capsys, command, feats, names=[feats], says=["8 dimensions", "4"])


def test_files_sslctl_did_not_write(tmp_path, shards, monkeypatch, capsys):
    from safetensors.torch import save_file

    foreign = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    expect_user_error(monkeypatch, capsys, "embed", foreign, shards, names=[foreign], says=["not an sslctl encoder"])
    expect_user_error(monkeypatch, capsys, "knn", foreign, names=[foreign], says=["not an sslctl features file"])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    expect_user_error(monkeypatch, capsys, "knn", garbage, names=[garbage], says=["not a readable safetensors file"])
    expect_user_error(monkeypatch, capsys, "embed", garbage, shards, names=[garbage], says=["not a readable safetensors file"])
    expect_user_error(monkeypatch, capsys, "knn", tmp_path / "missing.safetensors", names=[tmp_path / "missing.safetensors"])


def test_a_checkpoint_sslctl_did_not_write(tmp_path, shards, monkeypatch, capsys):
    from sslctl.encoder_io import save_encoder
    from sslctl.encoders import build_backbone
    from sslctl.recipes import load_recipe, recipe_to_toml

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = load_recipe("moco_v2", variant="small")
    (run / "recipe.toml").write_text(recipe_to_toml(cfg))
    save_encoder(run / "encoder.safetensors", build_backbone("resnet18", small_stem=True), small_stem=True, input_size=32,
                 mean=[0.5] * 3, std=[0.25] * 3, recipe="moco_v2")
    ckpt = run / "checkpoints" / "last.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, ckpt)  # a torch file, but not sslctl's
    expect_user_error(monkeypatch, capsys, "embed", run, shards, "--layer", "projector", names=[ckpt], says=["not an sslctl checkpoint"])
    ckpt.write_bytes(b"\x00garbage")
    expect_user_error(monkeypatch, capsys, "embed", run, shards, "--layer", "projector", names=[ckpt], says=["cannot read the checkpoint"])
    ckpt.unlink()
    expect_user_error(monkeypatch, capsys, "embed", run, shards, "--layer", "projector", names=[ckpt], says=["is missing"])


def test_shards_without_labels(tmp_path, monkeypatch, capsys):
    unlabelled = make_unlabelled_shards(tmp_path, n=30)
    feats = embed("resnet18", unlabelled, weights="random", input_size=32, bf16=False, workers=0, out=tmp_path / "u.safetensors")
    for command in ("knn", "linear"):
        expect_user_error(monkeypatch, capsys, command, feats, "--bank-split" if command == "knn" else "--train-split", "train",
                          "--eval-split", "train", names=[feats], says=["no labels"])
    expect_user_error(monkeypatch, capsys, "linear", "resnet18", "--protocol", "augment", "--shards", unlabelled,
                      names=[unlabelled / "manifest.json"], says=["no labels"])


def test_missing_inputs_on_stdin_and_arguments(tmp_path, shards, monkeypatch, capsys):
    expect_user_error(monkeypatch, capsys, "knn", stdin="", says=["stdin was empty"])
    expect_user_error(monkeypatch, capsys, "embed", tmp_path / "no-run", shards, names=[tmp_path / "no-run"])
    expect_user_error(monkeypatch, capsys, "embed", "resnet18", tmp_path, "--weights", "random", names=[tmp_path / "manifest.json"])
    expect_user_error(monkeypatch, capsys, "embed", "resnet18", shards, says=["--weights random"])
    expect_user_error(monkeypatch, capsys, "embed", "resnet19", shards, "--weights", "random", says=["did you mean"])


@pytest.mark.slow
def test_pipeline_script_runs_end_to_end_and_skips_finished_steps(tmp_path):
    """shell/pipeline.sh on a 400 + 200 image subset, a 12-step MoCo v2 run of the tests' TinyResNet
    (PRETRAIN_ARGS); then a rerun after losing one artifact redoes that step only."""
    from pathlib import Path

    from tests.evalkit import idx_subset
    from tests.realrun import TINY_RESNET  # the tiny ResNet: the script is the subject, not the network

    script = Path(__file__).resolve().parents[1] / "shell" / "pipeline.sh"
    images, work = idx_subset(tmp_path / "idx", 400, 200), tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSLCTL": f"{sys.executable} -m sslctl", "EMBED_ARGS": "--workers 0",
           "PRETRAIN_ARGS": "--epochs 1 --batch-size 32 --set augment.crop_size=16 --set method.queue_size=64 "
                            f"--set method.bn_splits=2 --set encoder.name={TINY_RESNET} --workers 0"}
    first = run_bounded(["bash", str(script), str(images), str(work)], env=env)
    assert first.returncode == 0, first.stderr
    table = first.stdout.splitlines()
    assert table[0].startswith("| encoder | kNN top-1 k=20/T=0.07 | kNN top-1 k=200/T=0.1 | linear top-1 |")
    assert table[2].startswith("| moco_v2 (trained) |") and table[3].startswith("| random init (floor) |")
    assert (work / "results.md").read_text() == first.stdout

    (work / "linear-floor.jsonl").unlink()
    again = run_bounded(["bash", str(script), str(images), str(work)], env=env)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("exists, skipped") == 7 and "linear (floor) ..." in again.stderr
    assert again.stdout == first.stdout  # the same inputs give the same table
