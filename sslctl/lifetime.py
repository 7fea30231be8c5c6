"""A child process that ends with its parent, however the parent ends (a kill -9 too).

Linux's PR_SET_PDEATHSIG: the kernel sends the child `sig` when the thread that started it
exits. Without it, shard's pool workers ran on for a minute after a kill -9 of the stage, and
the ranks of `--nproc N` (torchrun starts each in its own session) trained on to the end after
their launcher was killed. Elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import signal
import sys


def end_with_parent(sig: int = signal.SIGKILL) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG
