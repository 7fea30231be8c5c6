"""One writer per run directory: `hold_run_dir(out)` takes an exclusive lock on OUT/.lock for as
long as the process lives (fcntl.flock: the kernel drops it when the process dies, however it
dies, so a killed run never blocks its own resume). A second process on the same directory is
refused with exit 2 naming the holder, instead of interleaving metrics and checkpoints."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from sslctl.errors import UserError

LOCK_NAME = ".lock"


def hold_run_dir(out: Path) -> IO:
    """Lock `out` (created if missing) and return the open lock file: keep it referenced while
    the run writes there; closing it (or exiting) releases the lock."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{out}: the run directory is in use by {holder}; wait for that run to end (or stop it), "
                        "or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"sslctl pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
