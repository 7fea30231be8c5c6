"""Everything meant for a person goes to stderr; stdout carries only artifact paths / result lines."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.text import Text
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False, soft_wrap=True)  # no hard wraps: paths stay copyable in logs
_quiet = bool(os.environ.get("SSLCTL_QUIET"))


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def log(message: str) -> None:
    """One line for a person, on stderr (suppressed by --quiet)."""
    if not _quiet:
        console.print(message)


def warn(message: str) -> None:
    """Warnings are shown even with --quiet."""
    console.print(f"[yellow]warning:[/yellow] {message}")


class _RateColumn(ProgressColumn):
    """Throughput in `unit`/s, from rich's own speed estimate."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} {self.unit}/s", style="cyan")


def progress(unit: str = "images") -> Progress:
    """A rich progress bar with throughput and ETA on stderr; silent with --quiet or when stderr
    is not a terminal (batch logs stay clean).

    Use: `with progress() as p: task = p.add_task("shard train", total=n); p.advance(task, k)`.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=_quiet or not sys.stderr.isatty(),
    )
