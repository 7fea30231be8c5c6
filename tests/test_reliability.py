"""Faults and hostile files: what a killed process leaves behind is cleaned up, what would run
code is refused in words that never suggest loading it anyway, and no worker outlives its stage."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslctl import checkpoint as ckpt
from sslctl.errors import UserError
from sslctl.paths import EMBEDDED_DATASET
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
