"""The `sslctl` command: one typer app, one module per subcommand in this package.

Each module `sslctl/cli/<name>.py` defines `command(...)` (typer-annotated, with a docstring
that becomes `--help`, including an example) and optionally `NAME` (default: the module name
with '_' -> '-'). Command modules import torch and friends inside the function body so that
`sslctl --help` stays fast. A command parses flags, calls one library function, prints one line.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import traceback

import typer

from sslctl import __version__
from sslctl.errors import SslctlError, os_error_message, user_message

# Order in `sslctl --help`: the chain first, then the helpers.
ORDER = ["shard", "inspect", "pretrain", "recipes", "embed", "knn", "linear", "finetune", "distill", "plot"]

app = typer.Typer(
    name="sslctl",
    help="Self-supervised learning on images as composable stages: "
    "shard -> pretrain -> embed -> knn / linear. Every stage prints its artifact path on stdout.",
    no_args_is_help=True,
    # click's plain help: rich's option table squeezes each option's help into ~20 columns at 80
    # columns or in a pipe. Docstrings wrap by paragraph; a paragraph after a \b line is kept
    # verbatim (the examples).
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"sslctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


def _register() -> None:
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        app.command(getattr(module, "NAME", name.replace("_", "-")))(module.command)


_register()


def main(args: list[str] | None = None) -> None:
    """Entry point: user mistakes -> message + exit 2, run-time failures -> exit 1, Ctrl-C -> 130.

    A failure that is not sslctl's own is one line (an internal error, exit 1); SSLCTL_DEBUG=1
    prints its traceback first, for a bug report."""
    sys.exit(_run(args))


# typer < 0.26 raises click's exceptions, later versions those of the click it vendors (a click
# installed beside it is then not the one it raises): take the class from typer's own BadParameter.
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _run(args: list[str] | None) -> int:
    try:
        result = app(args=args, standalone_mode=False)
    except SslctlError as err:
        return _error(user_message(err), err.exit_code)
    except (KeyboardInterrupt, typer.Abort):  # Ctrl-C; typer.Abort is also EOF at a prompt
        return 130
    except typer.Exit as exit_:
        return exit_.exit_code
    except _CLICK_EXCEPTION as err:  # bad flag, missing argument: click's own message
        err.show()
        return err.exit_code
    except OSError as err:  # a path the user gave, or the machine (disk full): one line, no traceback
        return _error(*os_error_message(err))
    except Exception as err:
        debug = bool(os.environ.get("SSLCTL_DEBUG"))
        if debug:
            traceback.print_exc()
        how = "report it with the traceback above" if debug else "rerun with SSLCTL_DEBUG=1 for the traceback to report"
        return _error(f"internal error: {type(err).__name__}: {err} (a bug in sslctl; {how})", 1)
    # without standalone mode typer returns a typer.Exit's code (recent versions turn Ctrl-C into
    # Exit(130)); a command itself returns None
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _error(message: str, code: int) -> int:
    typer.secho(f"error: {message}", fg="red", err=True)
    return code
