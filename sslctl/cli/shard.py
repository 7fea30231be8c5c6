from __future__ import annotations

from pathlib import Path

import typer

from sslctl.cli._bounds import at_least, within


def command(
    src: Path = typer.Argument(..., help="Image folder, idx/CIFAR files or folder, or a .csv/.tsv list of path[,label]."),
    out: Path = typer.Argument(..., help="Output directory for SPLIT-NNNNNN.tar shards and manifest.json."),
    source: str = typer.Option("auto", "--source", help="Force the source kind: auto, folder, images, idx, cifar, csv."),
    max_count: int = typer.Option(10_000, "--max-count", callback=at_least(1), help="At most this many images per shard."),
    max_size: str = typer.Option("512MB", "--max-size", help="At most this many bytes per shard (e.g. 256MB, 1G)."),
    val_fraction: float = typer.Option(0.0, "--val-fraction", callback=within(0, 1, include_high=False), help="Carve a stratified val split of this fraction out of train."),
    seed: int = typer.Option(0, "--seed", callback=at_least(0), help="Seed of the sample order (same input + flags = identical bytes)."),
    max_side: int | None = typer.Option(None, "--max-side", callback=at_least(1), help="Downscale images whose longer side exceeds this (re-encodes)."),
    format: str = typer.Option("keep", "--format", help="keep (original bytes; raw arrays -> png), png, jpg or webp."),
    max_pixels: int | None = typer.Option(None, "--max-pixels", callback=at_least(1), help="Skip images whose header claims more pixels (a decompression-bomb guard) [default: 100000000, or SSLCTL_MAX_PIXELS]."),
    workers: int | None = typer.Option(None, "--workers", callback=at_least(1), help="Processes for reading, verifying and encoding [default: all cores]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary (warnings still show)."),
) -> None:
    """Pack a dataset into WebDataset tar shards plus manifest.json; print the manifest path.

    The source is detected (--source forces a kind) and stderr says what SRC was read as, and
    why: class folders (CLASS/IMAGE files, optionally under train/ val/ test/), unlabelled
    images at any depth, MNIST/Fashion-MNIST idx files, CIFAR-10/100 python batches, or a
    CSV/TSV list of path[,label]. A tree that looks like class folders but has images
    elsewhere is refused, naming them: --source folder keeps the labels and leaves those out,
    --source images reads every image without labels.

    JPEG/PNG/WebP files keep their original bytes; raw arrays become lossless PNG. Every image
    is decoded once to verify it; corrupt files and images over --max-pixels are skipped,
    listed in the manifest and counted. Rerunning after an interruption
    keeps the finished shards (verified by sha256).

    Example:

    \b
        sslctl shard ~/data/fashion-mnist shards/fmnist --val-fraction 0.1
    """
    from sslctl import console
    from sslctl.shard import Options, parse_size, shard
    from sslctl.shardfmt import max_pixels as default_max_pixels

    console.set_quiet(quiet)
    options = Options(max_count=max_count, max_size=parse_size(max_size), val_fraction=val_fraction, seed=seed,
                      max_side=max_side, format=format, max_pixels=max_pixels or default_max_pixels())
    print(shard(src, out, source=source, options=options, workers=workers))
