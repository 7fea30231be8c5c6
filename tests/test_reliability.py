"""Faults and hostile files: what a killed process leaves behind is cleaned up, what would run
code is refused in words that never suggest loading it anyway, and no worker outlives its stage."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file

from sslctl import checkpoint as ckpt
from sslctl.errors import UserError
from sslctl.paths import EMBEDDED_DATASET
from tests.conftest import cli_on_forked_ranks, run_bounded
from tests.realrun import TINY_RESNET

TINY = [f"encoder.name={TINY_RESNET}", "augment.crop_size=16", "optim.batch_size=16", "method.queue_size=64",
        "method.bn_splits=2"]


def test_a_checkpoint_that_would_run_code_is_refused_without_advice_to_load_it_anyway(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": ckpt.FORMAT, "step": 3, "model": Payload()}, tmp_path / "last.pt")
    with pytest.raises(UserError) as err:
        ckpt.load(tmp_path / "last.pt")
    message = str(err.value)
    assert "not an sslctl checkpoint" in message and "system" in message  # names what it refused
    assert "weights_only" not in message and "False" not in message  # torch's advice to turn the check off
    assert not marker.exists()


def test_a_resume_removes_what_a_killed_checkpoint_save_left_behind(tiny_shards, tmp_path):
    from sslctl.recipes import load_recipe
    from sslctl.train import pretrain

    cfg = load_recipe("moco_v2", variant="small", overrides=TINY)
    run = pretrain(tiny_shards(), cfg, tmp_path / "run", max_steps=2, workers=0, seed=0)
    # what atomic_path leaves when the process dies inside torch.save (kill -9)
    stale = [run / "checkpoints" / ".last.pt.k3x9q1z0.tmp", run / ".encoder.safetensors.a8b7c6d5.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    pretrain(tiny_shards(), cfg, run, max_steps=3, workers=0, seed=0)
    assert not any(path.exists() for path in stale)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found.update(int(p) for p in task.read_text().split())
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] not in "ZX"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the guard is Linux's PR_SET_PDEATHSIG")
def test_shard_pool_workers_end_with_a_killed_shard(tmp_path):
    """kill -9 of `sslctl shard --workers 2` mid-run: its pool workers end with it (they ran on
    for over a minute, holding the input open)."""
    proc = subprocess.Popen([sys.executable, "-m", "sslctl", "shard", str(EMBEDDED_DATASET), str(tmp_path / "out"),
                             "--workers", "2", "--format", "webp", "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(workers := _children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(workers) >= 2, f"the pool never started: {proc.stderr.read().decode() if proc.poll() is not None else ''}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers)), "pool workers outlived the killed shard"
    finally:  # the test's own clean-up: the whole process group, workers included
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# ------------------------------------------------------------------ fault injection, many times in a row

EXACT = ("step", "epoch", "loss", "lr", "z_std")  # what a resumed run must reproduce (not timings)
STEPS = 30  # 5 epochs of 6 steps of 16 (tiny_shards' 96 images)
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _pretrain_args(shards: Path, out: Path) -> list[str]:
    overrides = [x for o in TINY for x in ("--set", o)]
    return ["pretrain", str(shards), "--recipe", "moco_v2", "--out", str(out), "--max-steps", str(STEPS), "--log-every", "1",
            "--checkpoint-every", "3", "--seed", "3", "--workers", "1", *overrides]


def _pretrain_cmd(shards: Path, out: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "sslctl", *_pretrain_args(shards, out), *(["--nproc", str(nproc)] if nproc > 1 else [])]


def _rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k in EXACT} for line in lines if '"loss"' in line]


def _wait_for_the_lock(run: Path, timeout: float = 60) -> None:
    """Until no process holds RUN/.lock: a killed launcher's ranks end on their own (they get
    SIGTERM when it dies, checkpoint and exit)."""
    import fcntl

    deadline = time.monotonic() + timeout
    with open(run / ".lock", "a+") as handle:
        while True:
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as sslctl.run_lock
                return
            except OSError:
                assert time.monotonic() < deadline, f"{run}: still locked {timeout:.0f} s after the kill"
                time.sleep(0.05)


def _check_artifacts(run: Path) -> int:
    """After any kill: the checkpoint and the encoder (if any) load, every finished metrics
    line parses; the step a rerun resumes from."""
    from sslctl.encoder_io import load_encoder

    if (run / ".lock").exists():
        _wait_for_the_lock(run)
    step = ckpt.load(run / "checkpoints" / "last.pt")["step"] if (run / "checkpoints" / "last.pt").exists() else 0
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().split("\n")[:-1]:  # a torn last line has no newline yet
            json.loads(line)
    if (run / "encoder.safetensors").exists():  # written at each epoch's end
        load_encoder(run / "encoder.safetensors")
    return step


def _signal_at(cmd: list, progress: re.Pattern, target: int, sig: int, rng) -> int:
    """Start `cmd` in its own process group; once its stderr reports `progress` at `target`
    (and a random few milliseconds more: between steps, inside one, or inside a save), signal
    the whole group, as a batch system signals a job. Its exit code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **ENV})
    reached = threading.Event()

    def watch() -> None:
        for line in proc.stderr:
            if (m := progress.search(line)) and int(m[1]) >= target:
                reached.set()
        reached.set()  # ended before it got there

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert reached.wait(timeout=120), f"no progress to {target} within 120 s"
        time.sleep(rng.uniform(0, 0.05))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("nproc, kills", [(1, 3), (2, 2)])
def test_pretrain_killed_at_random_points_again_and_again_ends_as_an_uninterrupted_run(tiny_shards, tmp_path, nproc, kills):
    """kill -9 and SIGTERM at random steps, `kills` times in a row (2 gloo ranks as well): after
    every kill the artifacts are whole, and the run finished at last has the losses and the
    encoder of a run that was never interrupted."""
    shards = tiny_shards()
    cli_on_forked_ranks(*_pretrain_args(shards, tmp_path / "reference"), nprocs=nproc)  # the same run, never interrupted
    rng = random.Random(nproc)
    run, resume_at = tmp_path / "run", 0
    for _ in range(kills):
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        code = _signal_at(_pretrain_cmd(shards, run, nproc), re.compile(r" step (\d+)/"), rng.randint(resume_at + 1, resume_at + 5),
                          sig, rng)
        assert code in (-sig, 128 + sig) or (nproc > 1 and code == 1), code  # torchrun: 1 when its ranks were killed
        resume_at = _check_artifacts(run)
    assert resume_at < STEPS
    finished = run_bounded(_pretrain_cmd(shards, run, nproc), env={**os.environ, **ENV})
    assert finished.returncode == 0, finished.stderr
    assert _rows(run) == _rows(tmp_path / "reference")
    a, b = load_file(str(tmp_path / "reference" / "encoder.safetensors")), load_file(str(run / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_embed_killed_at_random_points_again_and_again_ends_with_the_bytes_of_an_uninterrupted_one(tmp_path):
    from sslctl.artifacts import sha256_file
    from tests.evalkit import CHEAP_ENCODER, make_shards

    shards = make_shards(tmp_path / "shards", max_count=30)  # 300 images in 10 shards
    out = tmp_path / "f.safetensors"
    cmd = [sys.executable, "-m", "sslctl", "embed", *CHEAP_ENCODER, str(shards), "--out", str(out), "--batch-size", "5"]
    first = run_bounded(cmd, env={**os.environ, **ENV})
    assert first.returncode == 0, first.stderr
    uninterrupted = sha256_file(out)
    out.unlink()
    rng, parts, done = random.Random(0), tmp_path / "f.safetensors.parts", 0
    for _ in range(2):
        target = rng.randint(done + 1, done + 4)  # parts written by this run, counted from the directory
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **ENV})
        deadline = time.monotonic() + 120
        while len(list(parts.glob("*.safetensors"))) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, rng.choice([signal.SIGKILL, signal.SIGTERM]))
        assert proc.wait(timeout=60) != 0, "the embed finished before it was killed"
        assert not out.exists()  # never a half-written features file
        done = len(list(parts.glob("*.safetensors")))
    finished = run_bounded(cmd, env={**os.environ, **ENV})
    assert finished.returncode == 0, finished.stderr
    assert sha256_file(out) == uninterrupted
