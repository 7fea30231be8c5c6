"""The CLI's error handler (sslctl.cli.main) against the typer/click that is installed: real
`python -m sslctl` subprocesses. Usage errors are click's message and exit 2, Ctrl-C is 130, an
exception that is not sslctl's own is one line and exit 1 (SSLCTL_DEBUG=1 adds the traceback),
OSError is one line naming the file; never a Python traceback otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import run_bounded, run_cli

# A real subprocess through the real handler, with commands added to the real app that fail the
# ways no sslctl command should (so the handler's last resort is tested, not a command's bug).
FAULTS = textwrap.dedent("""
    import errno, sys, typer
    from sslctl.cli import app, main

    def nested():
        return 1 / 0

    @app.command("crash")
    def crash():
        nested()

    @app.command("disk-full")
    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/moco/checkpoints/last.pt")

    @app.command("abort")
    def abort():
        raise typer.Abort()

    @app.command("eof")
    def eof():
        raise EOFError()

    @app.command("interrupt")
    def interrupt():
        raise KeyboardInterrupt()

    @app.command("exit-3")
    def exit_3():
        raise typer.Exit(3)

    sys.argv = ["sslctl", *sys.argv[1:]]
    main()
""")


def run_faults(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_bounded([sys.executable, "-c", FAULTS, *args], timeout=120, env={**os.environ, **(env or {})})


def assert_one_error_line(res: subprocess.CompletedProcess, code: int, *says: str) -> str:
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for text in says:
        assert text in lines[0], (text, lines[0])
    assert res.stdout == ""
    return lines[0]


def test_usage_errors_are_clicks_message_and_exit_2():
    res = run_cli("knn", "--bad-flag")
    assert res.returncode == 2, res.stderr
    assert "No such option" in res.stderr and "--bad-flag" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("embed")
    assert res.returncode == 2, res.stderr
    assert "Missing argument" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("knn", "--k", "many")
    assert res.returncode == 2, res.stderr
    assert "Invalid value for '--k'" in res.stderr and "Traceback" not in res.stderr


def test_help_and_version_exit_0():
    assert run_cli("--help").returncode == 0
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("sslctl ")


def test_a_foreign_exception_is_one_line_and_exit_1():
    line = assert_one_error_line(run_faults("crash"), 1, "internal error", "ZeroDivisionError", "division by zero",
                                 "SSLCTL_DEBUG=1")
    assert "--batch-size" not in line  # no guess about a cause it cannot know


def test_sslctl_debug_shows_the_traceback_once():
    res = run_faults("crash", env={"SSLCTL_DEBUG": "1"})
    assert res.returncode == 1
    assert res.stderr.count("Traceback") == 1 and "in nested" in res.stderr  # the real frames
    assert "During handling of the above exception" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: internal error")


def test_an_environment_fault_names_the_file_and_exits_1():
    assert_one_error_line(run_faults("disk-full"), 1, "/data/runs/moco/checkpoints/last.pt", "No space left on device")


@pytest.mark.parametrize("command", ["abort", "eof", "interrupt"])
def test_abort_and_keyboard_interrupt_exit_130(command):
    res = run_faults(command)
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr


def test_exit_codes_of_typer_exit_pass_through():
    assert run_faults("exit-3").returncode == 3


def _wait_until_reading_stdin(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Block until `proc` sits in read(0, ...): then its imports are done and SIGINT lands in the
    command, not in Python's start-up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{proc.pid}/syscall") as f:
                fields = f.read().split()
        except OSError:  # no /proc/PID/syscall here: give the start-up time instead
            time.sleep(5)
            return
        if fields[:2] == ["0", "0x0"]:  # syscall 0 (read) on fd 0
            return
        time.sleep(0.1)
    raise AssertionError("the command never waited on stdin")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to know when the command waits on stdin")
def test_ctrl_c_while_a_command_waits_on_stdin_exits_130():
    proc = subprocess.Popen([sys.executable, "-m", "sslctl", "inspect"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_reading_stdin(proc)
        proc.send_signal(signal.SIGINT)
        # Wait before communicate() closes stdin: on a busy machine the child can wake to the EOF
        # before the signal and read an empty stdin (seen: exit 2 "stdin was empty")
        proc.wait(timeout=60)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and out == ""


def test_an_output_path_under_a_file_is_exit_2_naming_it(tmp_path):
    from tests.evalkit import make_shards

    shards = make_shards(tmp_path / "data", n_train=20, n_test=10, max_count=20)
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder is expected\n")
    for args in (["shard", str(tmp_path / "data" / "idx"), str(blocker / "shards")],
                 ["pretrain", str(shards), "--recipe", "moco_v2", "--out", str(blocker / "run"), "--batch-size", "8",
                  "--max-steps", "1", "--workers", "0"]):
        res = run_cli(*args, timeout=300)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "Traceback" not in res.stderr and str(blocker) in res.stderr and "not a folder" in res.stderr, res.stderr
        assert res.stdout == ""
