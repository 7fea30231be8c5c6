"""The command-line flags of sslctl.run_options.RunOptions that every training stage takes
(`sslctl pretrain`, `finetune`, `distill`), spelled once, and the recipe shortcuts they share."""

from __future__ import annotations

from typing import List, Optional

import typer

from sslctl.cli._bounds import at_least

DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.")
RESUME = typer.Option("auto", "--resume", help="auto: continue the run directory's checkpoints/last.pt if present (same recipe required); never: refuse an existing run.")
SEED = typer.Option(0, "--seed", callback=at_least(0), help="Seed of initialisation, data order and augmentation.")
WORKERS = typer.Option(None, "--workers", callback=at_least(0), help="Data loader processes per process (default: its cores - 1, at most 16).")
MAX_STEPS = typer.Option(None, "--max-steps", callback=at_least(1), help="Stop after this many steps (the lr schedule still spans the recipe's epochs).")
BF16 = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (default: on for CUDA and for CPUs with native bf16, where it measured faster).")
CHANNELS_LAST = typer.Option(None, "--channels-last/--no-channels-last", help="channels_last memory format (default: on).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress lines (warnings and errors still show).")


def set_flag(what: str = "the recipe") -> Optional[List[str]]:
    return typer.Option(None, "--set", help=f"Override a key of {what}: section.key=value (repeatable), e.g. optim.lr=0.01.")


def epochs_flag(default: str = "") -> Optional[int]:
    return typer.Option(None, "--epochs", callback=at_least(1), help=f"Shortcut for --set schedule.epochs=N{default}.")


def batch_size_flag(default: str = "") -> Optional[int]:
    return typer.Option(None, "--batch-size", callback=at_least(1), help=f"Global batch (all processes together); shortcut for --set optim.batch_size=N{default}. The lr is rescaled by the recipe's rule.")


def recipe_overrides(set_: Optional[List[str]], epochs: Optional[int], batch_size: Optional[int]) -> list[str]:
    """--set items, then the --epochs and --batch-size shortcuts."""
    overrides = list(set_ or [])
    if epochs is not None:
        overrides.append(f"schedule.epochs={epochs}")
    if batch_size is not None:
        overrides.append(f"optim.batch_size={batch_size}")
    return overrides
