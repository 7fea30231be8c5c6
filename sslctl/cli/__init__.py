"""The `sslctl` command: one typer app, one module per subcommand in this package.

Each module `sslctl/cli/<name>.py` defines `command(...)` (typer-annotated, with a docstring
that becomes `--help`, including an example) and optionally `NAME` (default: the module name
with '_' -> '-'). Command modules import torch and friends inside the function body so that
`sslctl --help` stays fast. A command parses flags, calls one library function, prints one line.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from sslctl import __version__
from sslctl.errors import SslctlError

# Order in `sslctl --help`: the chain first, then the helpers.
ORDER = ["shard", "inspect", "pretrain", "recipes", "embed", "knn", "linear", "finetune", "distill", "plot"]

app = typer.Typer(
    name="sslctl",
    help="Self-supervised learning on images as composable stages: "
    "shard -> pretrain -> embed -> knn / linear. Every stage prints its artifact path on stdout.",
    no_args_is_help=True,
    rich_markup_mode="rich",
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


def main() -> None:
    """Entry point: run the app; user mistakes -> message + exit 2, run-time failures -> exit 1."""
    try:
        app(standalone_mode=False)
    except SslctlError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except Exception as err:  # click usage errors (bad flag, missing argument) -> exit 2
        try:
            import click
        except ImportError:  # typer >= 0.29 vendors click as typer._click
            from typer import _click as click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(130)
        raise
    sys.exit(0)
