"""A built wheel carries everything sslctl reads from its own files: the recipes and the embedded
dataset. Builds real wheels (`pip install .`'s path and `python -m build`'s sdist -> wheel path),
installs one into a temp dir and runs sslctl from it, away from the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from sslctl.recipes import load_recipe
from tests.conftest import run_bounded

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("setuptools")

# What the installed copy must do; prints one JSON line for the test to check.
PROBE = """
import json, sslctl, sslctl.paths as paths
from sslctl.recipes import list_recipes, load_recipe
from sslctl.sources import open_source
cfg = load_recipe("moco_v2", variant="small")
source = open_source(paths.EMBEDDED_DATASET)
print(json.dumps({
    "module": sslctl.__file__, "recipes_dir": str(paths.RECIPES_DIR),
    "dataset": str(paths.EMBEDDED_DATASET), "recipes": [name for name, _ in list_recipes()],
    "moco_v2_small": cfg,
    "splits": {name: len(items) for name, items in source.splits.items()}, "kind": source.kind,
}))
"""


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = run_bounded(args, cwd=cwd, timeout=300, env=env)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done


def _source_copy(dest: Path) -> Path:
    """The working tree's build inputs, copied so no stale build/ or egg-info leaks into the wheel."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("sslctl", "recipes"):
        shutil.copytree(REPO / name, dest / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    return dest


def _pip_wheel(src: Path, out: Path) -> Path:
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", str(out), str(src)], cwd=out.parent)
    (wheel,) = out.glob("sslctl-*.whl")
    return wheel


def _checkout_files() -> set[str]:
    """Every file the wheel must hold, as wheel paths: modules, embedded data, recipes."""
    modules = [p for p in (REPO / "sslctl").rglob("*.py") if "__pycache__" not in p.parts]
    data = [p for p in (REPO / "sslctl" / "_data").rglob("*") if p.is_file()]
    return {p.relative_to(REPO).as_posix() for p in modules + data} | {
        f"sslctl/_recipes/{p.name}" for p in (REPO / "recipes").glob("*.toml")}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return _source_copy(tmp_path_factory.mktemp("packaging") / "src")


@pytest.fixture(scope="module")
def direct_wheel(source) -> Path:
    """The wheel built from the tree as `pip install .` does."""
    return _pip_wheel(source, source.parent / "direct")


@pytest.fixture(scope="module")
def wheels(source, direct_wheel) -> tuple[Path, Path]:
    """(direct_wheel, the wheel built from the sdist). Only the test that compares them builds the
    second: under xdist the two tests of this module may run in two workers, each building its own."""
    root = source.parent
    # python -m build's path: sdist first, then the wheel from the unpacked sdist.
    (root / "sdist").mkdir()
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(root / 'sdist')!r})"], cwd=source)
    (sdist,) = (root / "sdist").glob("sslctl-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "unpacked", filter="data")
    (unpacked,) = (root / "unpacked").iterdir()
    return direct_wheel, _pip_wheel(unpacked, root / "from-sdist")


def _wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n for n in z.namelist() if ".dist-info/" not in n}


def test_wheel_holds_every_module_recipe_and_data_file(wheels):
    direct, from_sdist = wheels
    expected = _checkout_files()
    assert {"sslctl/_recipes/moco_v2.toml", "sslctl/_data/fashion-mnist-mini/train-images-idx3-ubyte.gz",
            "sslctl/_data/eurosat-mini/LICENSE", "sslctl/_data/eurosat-mini/train/Forest/Forest_1004.webp"} <= expected
    for wheel in (direct, from_sdist):
        missing = expected - _wheel_files(wheel)
        # A missing sslctl/<sub>/*.py means the subpackage is not in pyproject's packages list.
        assert not missing, f"{wheel.name} lacks {sorted(missing)} (see [tool.setuptools] packages in pyproject.toml)"
    assert _wheel_files(direct) == _wheel_files(from_sdist)
    with zipfile.ZipFile(direct) as z:  # the recipes are the top-level files, byte for byte
        assert z.read("sslctl/_recipes/moco_v2.toml") == (REPO / "recipes" / "moco_v2.toml").read_bytes()


def test_installed_wheel_finds_recipes_and_embedded_dataset(direct_wheel, tmp_path):
    target, cwd = tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
          "--disable-pip-version-check", "-q", "--target", str(target), str(direct_wheel)], cwd=cwd)
    # Dependencies come from this interpreter's site-packages; sslctl must come from `target`
    # (PYTHONPATH precedes the editable install's finder, checked through __file__ below).
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = json.loads(_run([sys.executable, "-c", PROBE], cwd=cwd, env=env).stdout)

    for key in ("module", "recipes_dir", "dataset"):
        assert Path(out[key]).is_relative_to(target), f"{key} {out[key]} is not in the installed copy {target}"
    assert out["recipes"] == sorted(p.stem for p in (REPO / "recipes").glob("*.toml"))
    assert "moco_v2" in out["recipes"]
    assert out["moco_v2_small"] == json.loads(json.dumps(load_recipe("moco_v2", variant="small")))
    assert out["moco_v2_small"]["recipe"]["variant"] == "small"
    assert out["kind"] == "idx" and out["splits"] == {"train": 5000, "test": 1000}

    # The command line too: `sslctl recipes` lists them, `sslctl recipes NAME` prints the TOML.
    listing = _run([sys.executable, "-m", "sslctl", "recipes"], cwd=cwd, env=env).stdout
    assert [line.split()[0] for line in listing.splitlines()] == out["recipes"]
    shown = _run([sys.executable, "-m", "sslctl", "recipes", "moco_v2", "--variant", "small"], cwd=cwd, env=env).stdout
    assert 'name = "moco_v2"' in shown and 'variant = "small"' in shown
