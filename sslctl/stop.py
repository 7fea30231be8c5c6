"""Stopping a training run between steps: signals, a fetch cut short by one, and every rank
agreeing on the step to stop at."""

from __future__ import annotations

import signal
from typing import Any, Callable, Iterator

import torch

from sslctl.errors import SslctlError


class Interrupted(SslctlError):
    """SIGTERM / SIGINT: the checkpoint is saved; exit 128 + signal number so a batch system requeues."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """SIGTERM / SIGUSR1 (a batch system's warning) / SIGINT set `signum`; the loop finishes the
    step, saves and exits. A second SIGINT (Ctrl-C) aborts at once (the last checkpoint stays);
    a repeated SIGTERM/SIGUSR1 is ignored, since a cluster may deliver the same warning twice
    (to the job and through torchrun)."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
                pass
        return self

    def handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def name(self) -> str:
        """The signal's name; SIGTERM when it reached another rank only (what torchrun sends)."""
        return signal.Signals(self.signum or signal.SIGTERM).name

    def interrupted(self, message: str) -> Interrupted:
        return Interrupted(self.signum or signal.SIGTERM, f"stopped by {self.name()} {message}")


def agree(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when it is true on any (a signal or a bad loss stops all at one step)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def next_views(batches: Iterator[list[torch.Tensor]], signals: StopSignals) -> list[torch.Tensor] | None:
    """The next batch; None at the end of the data, or when the fetch failed after a stop signal:
    Ctrl-C and torchrun's SIGTERM also reach the loader's workers, so such a failure is the
    signal, not a data error (the caller's `agree` then stops the run)."""
    try:
        return next(batches)
    except StopIteration:
        return None
    except Exception:
        if signals.signum is None:
            raise
        return None


def until_agreed_stop(batches: Iterator[list[torch.Tensor]], signals: StopSignals, agree_fn: Callable[[bool], bool],
                      message: str) -> Iterator[list[torch.Tensor]]:
    """The batches until the data ends or a stop signal, agreed by every rank, raises
    `signals.interrupted(message)` at the next batch (a pass that cannot be saved half-done)."""
    while True:
        views = next_views(batches, signals)
        if agree_fn(signals.signum is not None):
            raise signals.interrupted(message)
        if views is None:
            return
        yield views
