"""Bounds of the numeric flags, shared by every command: `typer.Option(..., callback=at_least(1))`.

A value out of bounds is click's usage error, exit 2, before any work starts: "Invalid value for
'--batch-size': 0: expected an integer >= 1". Callbacks rather than typer's min=/max=: they also
refuse NaN and inf, open intervals (> 0) and every element of a repeatable flag, the same way
on every typer version the package admits. tests/test_cli_validation.py fails for a numeric
flag that has none.
"""

from __future__ import annotations

import math
from typing import Callable

import typer


def _bound(ok: Callable[[float], bool], expected: str) -> Callable:
    def check(value):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not (math.isfinite(v) and ok(v)):
                raise typer.BadParameter(f"{v}: expected {expected}")
        return value

    return check


def at_least(low: int) -> Callable:
    """Whole numbers >= low: counts (1) and indices, seeds, worker counts (0)."""
    return _bound(lambda v: v >= low, f"an integer >= {low}")


def above(low: float) -> Callable:
    """Numbers > low (a learning rate, a temperature: > 0)."""
    return _bound(lambda v: v > low, f"a number > {low:g}")


def within(low: float, high: float, *, include_high: bool = True) -> Callable:
    """Numbers in [low, high] (or [low, high)): fractions and weights."""
    if include_high:
        return _bound(lambda v: low <= v <= high, f"a number in [{low:g}, {high:g}]")
    return _bound(lambda v: low <= v < high, f"a number in [{low:g}, {high:g})")
