"""`sslctl plot`: an embedding map of a features file, or the training curves of a run; prints the image path."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sslctl.cli._bounds import at_least


def command(
    path: Optional[str] = typer.Argument(
        None, help="Features file (-> 2-D map) or run directory / metrics.jsonl (-> curves); '-' or omitted: read it from stdin."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Image file: .png, .pdf or .svg."),
    method: str = typer.Option("pca", "--method", help="Map: pca, tsne (needs scikit-learn) or umap (needs umap-learn)."),
    split: Optional[str] = typer.Option(None, "--split", help="Map: the split to draw (default: test, else val, else the first)."),
    max_points: int = typer.Option(5000, "--max-points", callback=at_least(1), help="Map: draw at most this many points (a seeded random subset)."),
    seed: int = typer.Option(0, "--seed", callback=at_least(0), help="Map: seed of the subset and of t-SNE / UMAP."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Nothing on stderr but warnings and errors."),
) -> None:
    """Draw a picture: a features file gives a 2-D map of one split coloured by class (on the
    L2-normalised features); a run directory gives loss, lr and kNN-monitor curves from
    metrics.jsonl. Prints the image path.

    Examples:

    \b
        sslctl plot runs/moco/features.safetensors --out map.png --method tsne
        sslctl plot runs/moco --out curves.png
    """
    from sslctl import console
    from sslctl.artifacts import path_from_stdin_or_arg
    from sslctl.plot import plot

    console.set_quiet(quiet)
    source = path_from_stdin_or_arg(path, "features file or run directory")
    print(plot(source, out, method=method, split=split, max_points=max_points, seed=seed))
