"""`--nproc N` / `--nnodes`: start the command's processes with torch's own launcher.

`sslctl pretrain --nproc 4 ...` is `torchrun --nproc-per-node 4 -m sslctl pretrain ...`: this
module calls `torch.distributed.run.run` (what the `torchrun` command runs) in the calling process,
which becomes torchrun's agent. Every child runs the same command line (stdin already resolved
to a path) and sees torchrun's environment (RANK, WORLD_SIZE, ...), so `under_launcher()` is true
there and the command runs instead of launching again.

Signals: the agent forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 to the children (which
checkpoint and exit, sslctl/train.py) and waits up to SHUTDOWN_TIMEOUT seconds before SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Sequence

from sslctl import console
from sslctl.errors import SslctlError, UserError
from sslctl.lifetime import end_with_parent

SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # what the agent forwards to its children
SHUTDOWN_TIMEOUT = 120  # seconds the children get to checkpoint after a signal


class LaunchFailed(SslctlError):
    """A child process failed: exit with its code (2 for a user mistake, 143 for SIGTERM...)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def under_launcher() -> bool:
    """True inside a process started by torchrun (or by `--nproc`)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ


def torchrun_args(
    nproc: int, nnodes: str, rdzv_endpoint: str | None, rdzv_id: str | None, command: Sequence[str]
) -> list[str]:
    """torchrun's command line for `python -m sslctl COMMAND...` on nproc processes per node."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: expected a positive number of processes per node")
    multi_node = nnodes not in ("1", "1:1")
    if multi_node and not rdzv_endpoint:
        raise UserError(
            f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, a host every node can reach "
            "(in a SLURM job: the first node of `scontrol show hostnames $SLURM_JOB_NODELIST`, see shell/slurm/pretrain.sbatch)"
        )
    import torch.distributed.run as torchrun

    args = ["--nproc-per-node", str(nproc), "--nnodes", nnodes]
    if rdzv_endpoint:
        job = rdzv_id or os.environ.get("SLURM_JOB_ID", "sslctl")
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", job]
    else:
        args += ["--standalone"]
    known = torchrun.get_args_parser()._option_string_actions  # older torch lacks the last two
    if "--signals-to-handle" in known:
        args += ["--signals-to-handle", SIGNALS]
    if "--shutdown-timeout" in known:
        args += ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
    return [*args, "--module", "sslctl", *command]


def _parse(args: list[str]):
    """torchrun's parsed arguments. The command after `sslctl` is set by hand: argparse would
    read its options as abbreviations of torchrun's own (`--nproc` for `--nproc-per-node`)."""
    import torch.distributed.run as torchrun

    split = args.index("--module") + 2
    parsed = torchrun.parse_args(args[:split])
    parsed.training_script_args = args[split:]
    return parsed


def launch(
    nproc: int,
    *,
    nnodes: str = "1",
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    stdin_path: str | None = None,
) -> bool:
    """Run this command line on `nproc` processes (x nnodes) with torch.distributed.run, or
    return False when there is nothing to launch (one process, or already under a launcher).

    Returns True after every child succeeded (rank 0 has printed the artifact path). Raises
    LaunchFailed with the failing child's exit code. stdin_path: the path the parent read from
    stdin; it replaces the command's '-' argument (or is appended when the path was omitted),
    since the children cannot read the parent's stdin."""
    if under_launcher():
        if "SSLCTL_LAUNCHED" in os.environ:  # a rank of `--nproc`: stop (checkpoint, exit) if the launcher dies
            end_with_parent(signal.SIGTERM)
        elif nproc > 1 or nnodes not in ("1", "1:1"):
            console.warn("--nproc/--nnodes are ignored inside torchrun: its own flags set the processes")
        return False
    if nproc == 1 and nnodes in ("1", "1:1"):
        return False
    command = list(sys.argv[1:])
    if stdin_path is not None:
        if "-" in command:
            command[command.index("-")] = stdin_path
        else:
            command.append(stdin_path)
    args = torchrun_args(nproc, nnodes, rdzv_endpoint, rdzv_id, command)
    os.environ["SSLCTL_LAUNCHED"] = "1"  # the children's --nproc is this one, already done
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1: share this node's cores instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.run(_parse(args))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -15 (killed) -> 143
        raise LaunchFailed(f"process {rank} of {err.name} exited with code {code} (its messages are above)", code) from None
    except SignalException as err:
        raise LaunchFailed(
            f"stopped by {signal.Signals(err.sigval).name}: the processes were told to checkpoint and exit; "
            "run the same command again to resume", 128 + int(err.sigval),
        ) from None
    return True
