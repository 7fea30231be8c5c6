"""Two kinds of failure, two exit codes (DESIGN.md §5).

Raise `UserError` for anything the user can fix (bad path, bad flag, bad recipe key, wrong
artifact): the CLI prints the message without a traceback and exits 2. Raise `RunError` for a
failure at run time (NaN loss, a crashed worker): exit 1. Messages name the file, the key, what
was expected and how to fix it. An OSError that reaches the CLI is one line too
(`os_error_message`): exit 2 where the path is the user's to fix (missing, a file in the way, no
permission, a link loop), exit 1 where the machine failed (disk full, an I/O error).
"""

import errno
import re


class SslctlError(Exception):
    exit_code = 1


# torch re-raises a DataLoader worker's exception with the worker's whole traceback as its message
_FROM_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback.*\nsslctl\.errors\.\w+: (.*)", re.S)


def user_message(err: SslctlError) -> str:
    """The message as sslctl wrote it, also when it was raised in a loader worker."""
    m = _FROM_WORKER.fullmatch(str(err))
    return m.group(1).rstrip() if m else str(err)


class UserError(SslctlError):
    """Bad usage or input: exit 2."""

    exit_code = 2


class RunError(SslctlError):
    """Failure at run time: exit 1."""

    exit_code = 1


# errno -> (exit code, how to fix it). 2: the path is the user's to fix; 1: the machine failed.
_OS_ERRORS = {
    errno.ENOENT: (2, "check the path"),
    errno.ENOTDIR: (2, "a part of this path is a file, not a folder; choose a path under a folder"),
    errno.EISDIR: (2, "this is a folder; give a file's path"),
    errno.EEXIST: (2, "something is already there; remove it or choose another path"),
    errno.EACCES: (2, "check its permissions (ls -ld) or choose another path"),
    errno.EPERM: (2, "check its permissions (ls -ld) or choose another path"),
    errno.ELOOP: (2, "a symbolic link loop; remove or fix the link"),
    errno.ENAMETOOLONG: (2, "shorten the path"),
    errno.EROFS: (2, "a read-only file system; write somewhere else"),
    errno.ENOSPC: (1, "free some space or write somewhere else, then rerun the command"),
    errno.EDQUOT: (1, "over the disk quota: free some space or write somewhere else, then rerun the command"),
    errno.EMFILE: (1, "too many open files: raise the limit (ulimit -n) or use fewer --workers"),
    errno.EIO: (1, "an input/output error of the device; check the disk or the network file system"),
}


def os_error_message(err: OSError) -> tuple[str, int]:
    """(one line naming the file, what failed and how to fix it; its exit code) for an OSError
    that reached the CLI: exit 2 where the path is the user's input, 1 for a fault of the machine."""
    code, hint = _OS_ERRORS.get(err.errno, (1, ""))
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    what = err.strerror or str(err)
    return f"{where + ': ' if where else ''}{what}{' (' + hint + ')' if hint else ''}", code
