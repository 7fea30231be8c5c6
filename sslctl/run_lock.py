"""One writer per run directory: `hold_run_dir(out)` takes an exclusive lock on OUT/.lock for as
long as the process lives. It is a POSIX record lock (fcntl.lockf), held by this process alone:
the kernel drops it the moment the process dies, however it dies, so a killed run never blocks
its own resume. (An flock belongs to the open file, which the forked loader workers share: after a
kill -9 it stayed held until they noticed and exited, seconds later.) A second process on the
same directory is refused with exit 2 naming the holder, instead of interleaving metrics and
checkpoints. Nothing else in the process may open and close OUT/.lock: closing any descriptor of
the file drops a POSIX lock."""

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
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EAGAIN / EACCES: held by another process
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
