"""Two kinds of failure, two exit codes (DESIGN.md §5).

Raise `UserError` for anything the user can fix (bad path, bad flag, bad recipe key, wrong
artifact): the CLI prints the message without a traceback and exits 2. Raise `RunError` for a
failure at run time (NaN loss, a crashed worker): exit 1. Messages name the file, the key, what
was expected and how to fix it.
"""


class SslctlError(Exception):
    exit_code = 1


class UserError(SslctlError):
    """Bad usage or input: exit 2."""

    exit_code = 2


class RunError(SslctlError):
    """Failure at run time: exit 1."""

    exit_code = 1
