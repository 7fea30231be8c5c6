"""Shared fixtures: the embedded dataset (always here) and full Fashion-MNIST (../shared, may be absent)."""

from __future__ import annotations

import os
import signal
import resource
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
# The processes the tests start (CLI runs, torchrun's ranks) import the tests' own encoder
# (`tests.realrun:TinyResNet`) from the repository, wherever pytest was started.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
SHARED_FMNIST = Path(os.environ.get("SSLCTL_SHARED", REPO.parent / "shared")) / "datasets" / "fashion-mnist"


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests (real training runs, minutes each) first, in collection order otherwise.
    shell/test.sh hands tests to the workers one at a time as they free up (--dist load
    --maxschedchunk 1), so the long runs spread over the workers and the seconds-long tests fill
    the gaps at the end, instead of one worker finishing a long run alone while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (subprocesses, loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Record each test's CPU seconds: with two workers sharing two cores, a test's wall time
    (--durations) says how long it waited as much as what it cost; the suite's length is CPU."""
    start = _cpu_seconds()
    yield
    item.user_properties.append(("cpu_s", _cpu_seconds() - start))


def pytest_terminal_summary(terminalreporter) -> None:
    """The 15 tests that cost the most CPU (call phase), beside --durations' wall times."""
    costs = []
    for reports in terminalreporter.stats.values():
        for r in reports:
            cpu = dict(getattr(r, "user_properties", ())).get("cpu_s")
            if getattr(r, "when", None) == "call" and cpu is not None:
                costs.append((cpu, r.nodeid))
    if not costs:
        return
    costs.sort(reverse=True)
    terminalreporter.write_sep("=", f"most CPU (call phase; all {len(costs)} tests: {sum(c for c, _ in costs):.0f} s)")
    for cpu, nodeid in costs[:15]:
        terminalreporter.write_line(f"{cpu:8.2f}s cpu  {nodeid}")


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


def run_bounded(cmd: list, *, timeout: float = 600, input: str | None = None, env: dict | None = None,
                **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True), bounded: the command runs in its own
    process group, and at the timeout the whole group is killed and the test fails. (subprocess.run
    kills only the child and then waits for EOF on pipes that its children, loader workers or
    torchrun's ranks, may hold forever.) stdin is empty unless `input` is given, never the suite's."""
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"no exit within {timeout:.0f} s, killed: {' '.join(map(str, cmd))}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_cli(*args: str, stdin: str | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m sslctl ARGS` in a real subprocess (bounded: `run_bounded`)."""
    return run_bounded([sys.executable, "-m", "sslctl", *args], input=stdin, timeout=timeout,
                       env={**os.environ, **(env or {})})


def fork_ranks(fn, *args, nprocs: int = 2) -> None:
    """fn(rank, *args) in `nprocs` processes forked from this one, joined; a rank's failure fails
    the test. Forked, not spawned: a spawned rank imports torch, torchvision and sslctl again
    (~5 CPU-s each). This process holds no process group and one intra-op thread, as fork needs."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="fork")


def _cli_rank(rank: int, nprocs: int, port: int, args: list[str]) -> None:
    if nprocs > 1:  # the environment torchrun gives its ranks
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from sslctl.cli import main

    try:
        main(args)
    except SystemExit as exit_:
        if exit_.code:
            raise RuntimeError(f"sslctl {' '.join(args)}: exit {exit_.code} on rank {rank}") from None


def cli_on_forked_ranks(*args: str, nprocs: int = 1) -> None:
    """`sslctl ARGS` as `nprocs` torchrun ranks (or one plain process) forked from this one: the
    reference run a test compares an interrupted one with, without paying the imports of the
    launcher and of each rank again. Its output goes to the test's captured stdout / stderr."""
    fork_ranks(_cli_rank, nprocs, free_port(), list(args), nprocs=nprocs)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """`tiny_shards(n_train=96, n_test=48, max_count=40)`: the first n_train / n_test images of the
    embedded Fashion-MNIST as class folders (train/classK/*.png, test/...) through `sslctl shard`,
    made once per session for each size. The default is 96 + 48 images in uneven shards (40, 40,
    16 and 40, 8): 6 steps per epoch at batch 16, so a run crosses epoch boundaries in seconds,
    and 2 ranks x 2 loader workers meet a split with fewer shards than readers."""
    from PIL import Image

    from sslctl.sources import read_idx

    made: dict[tuple[int, int, int], Path] = {}

    def make(n_train: int = 96, n_test: int = 48, max_count: int = 40) -> Path:
        key = (n_train, n_test, max_count)
        if key not in made:
            root = tmp_path_factory.mktemp(f"tiny-{n_train}-{n_test}-{max_count}")
            for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
                images = read_idx(EMBEDDED_DATASET / f"{prefix}-images-idx3-ubyte.gz")[:n]
                labels = read_idx(EMBEDDED_DATASET / f"{prefix}-labels-idx1-ubyte.gz")[:n]
                for i, (image, label) in enumerate(zip(images, labels)):
                    folder = root / "images" / split / f"class{label}"
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(folder / f"{i:04d}.png")
            done = run_cli("shard", str(root / "images"), str(root / "shards"), "--max-count", str(max_count), "--quiet")
            assert done.returncode == 0, done.stderr
            made[key] = root / "shards"
        return made[key]

    return make


@pytest.fixture(scope="session")
def mini_shards(tmp_path_factory) -> Path:
    """The embedded 5,000 + 1,000 Fashion-MNIST subset as shards (`sslctl shard`), once per session."""
    out = tmp_path_factory.mktemp("mini-shards") / "shards"
    done = run_cli("shard", str(EMBEDDED_DATASET), str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    return out
