"""Shared fixtures: the embedded dataset (always here) and full Fashion-MNIST (../shared, may be absent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sslctl.paths import EMBEDDED_DATASET

if os.environ.get("PYTEST_XDIST_WORKER"):
    # shell/test.sh runs one pytest worker per core: one thread each (and in the processes the
    # tests start) keeps the cores from being oversubscribed, where a step runs 10-50x slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_FMNIST = Path(os.environ.get("SSLCTL_SHARED", REPO.parent / "shared")) / "datasets" / "fashion-mnist"


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests (real training runs, minutes each) first, in collection order otherwise.
    shell/test.sh hands tests to the workers one at a time as they free up (--dist load
    --maxschedchunk 1), so the long runs spread over the workers and the seconds-long tests fill
    the gaps at the end, instead of one worker finishing a long run alone while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def one_thread():
    """Real runs on this shared 2-core machine: one intra-op thread is many times faster than
    two threads fighting other processes for the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mini_idx() -> Path:
    """The embedded 5,000 + 1,000 Fashion-MNIST subset (idx files)."""
    return EMBEDDED_DATASET


@pytest.fixture(scope="session")
def fmnist_idx() -> Path:
    """Full Fashion-MNIST (60k + 10k) from ../shared/datasets; skipped with a reason when absent."""
    if not (SHARED_FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"full Fashion-MNIST not found at {SHARED_FMNIST} (set SSLCTL_SHARED or check out ../shared)")
    return SHARED_FMNIST


def run_cli(*args: str, stdin: str | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m sslctl ARGS` in a real subprocess; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "sslctl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def mini_shards(tmp_path_factory) -> Path:
    """The embedded 5,000 + 1,000 Fashion-MNIST subset as shards (`sslctl shard`), once per session."""
    out = tmp_path_factory.mktemp("mini-shards") / "shards"
    done = run_cli("shard", str(EMBEDDED_DATASET), str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    return out
