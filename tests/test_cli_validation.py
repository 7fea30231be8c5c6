"""Every numeric flag of every command is bounded: a value out of range is exit 2 with a line
naming the flag, the value and what it must be, before any work starts (real subprocesses)."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

from sslctl.cli import app
from tests.conftest import run_cli
from tests.evalkit import make_shards, write_features


def _commands():
    for info in app.registered_commands:
        yield info.name, info.callback


def _numeric(annotation) -> bool:
    """int / float flags, alone, optional or repeatable (bool is not a number here)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (list, typing.Union) or args:
        return any(_numeric(a) for a in args if a is not type(None))
    return annotation in (int, float)


def test_every_numeric_option_of_every_command_is_bounded():
    unbounded = []
    for name, callback in _commands():
        hints = typing.get_type_hints(callback)
        for param in inspect.signature(callback).parameters.values():
            info = param.default
            if _numeric(hints[param.name]) and info.min is None and info.max is None and info.callback is None:
                unbounded.append(f"sslctl {name} {info.param_decls[0] if info.param_decls else param.name}")
    assert not unbounded, f"numeric flags without bounds: {unbounded}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("validate"), n_train=40, n_test=20, max_count=40)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("feats") / "f.safetensors", {
        "train": (torch.randn(60, 8), torch.arange(60) % 3), "test": (torch.randn(30, 8), torch.arange(30) % 3)})


def assert_bad_flag(res, flag: str, value: str) -> None:
    """Exit 2, nothing on stdout, no traceback, one error line naming the flag and the value."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    error = [line for line in res.stderr.splitlines() if line.lower().startswith("error")]
    assert len(error) == 1 and flag in error[0] and value in error[0], res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("flag, value", [
    ("--batch-size", "0"), ("--batch-size", "-5"), ("--workers", "-1"), ("--epochs", "0"), ("--epochs", "-1"),
    ("--max-steps", "0"), ("--checkpoint-every", "0"), ("--log-every", "0"), ("--nproc", "0"),
])
def test_pretrain_flags(shards, tmp_path, flag, value):
    res = run_cli("pretrain", str(shards), "--recipe", "moco_v2", "--out", str(tmp_path / "run"), "--workers", "0",
                  "--max-steps", "1", "--batch-size", "16", flag, value, timeout=300)  # the last value counts
    assert_bad_flag(res, flag, value)
    assert not (tmp_path / "run" / "encoder.safetensors").exists()


@pytest.mark.parametrize("args, flag, value", [
    (["linear", "{features}", "--epochs", "-1"], "--epochs", "-1"),
    (["knn", "{features}", "--k", "0"], "--k", "0"),
    (["knn", "{features}", "--k", "20", "--temperature", "0"], "--temperature", "0"),
    (["embed", "resnet18", "{shards}", "--weights", "random", "--batch-size", "0", "--out", "{tmp}/f.safetensors"],
     "--batch-size", "0"),
    (["shard", "{shards}", "{tmp}/out", "--max-count", "0"], "--max-count", "0"),
    (["shard", "{shards}", "{tmp}/out", "--val-fraction", "1.5"], "--val-fraction", "1.5"),
    (["finetune", "{tmp}/run", "{shards}", "--out", "{tmp}/ft", "--epochs", "0"], "--epochs", "0"),
    (["distill", "{tmp}/ft", "{shards}", "--out", "{tmp}/st", "--temperature", "-1"], "--temperature", "-1"),
    (["distill", "{tmp}/ft", "{shards}", "--out", "{tmp}/st", "--alpha", "2"], "--alpha", "2"),
    (["linear", "{features}", "--protocol", "augment", "--shards", "{shards}", "--lr", "nan"], "--lr", "nan"),
])
def test_other_commands_flags(features, shards, tmp_path, args, flag, value):
    filled = [a.format(features=features, shards=shards, tmp=tmp_path) for a in args]
    assert_bad_flag(run_cli(*filled, timeout=300), flag, value)


def test_a_recipe_value_out_of_range_from_the_command_line(shards, tmp_path):
    res = run_cli("pretrain", str(shards), "--recipe", "moco_v2", "--out", str(tmp_path / "run"), "--workers", "0",
                  "--max-steps", "1", "--batch-size", "16", "--set", "optim.lr=-0.1", timeout=300)
    assert_bad_flag(res, "optim.lr", "-0.1")
    assert not (tmp_path / "run").exists()
