from __future__ import annotations

import typer


def command(
    path: str = typer.Argument(None, help="Shards directory or manifest.json, run directory, encoder or features "
                               ".safetensors, a data index (RUN/data-index-*.json), or any WebDataset (a directory of "
                               ".tar shards, a pattern, URLs: read once to count, nothing written); '-' or omitted: "
                               "read the path from stdin."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the JSON summary line, no table."),
    label_key: str = typer.Option(None, "--label-key", help="Shards without a manifest: the member that holds a sample's label, EXT (default cls) or EXT:FIELD of a JSON member (json:label)."),
) -> None:
    """Describe an sslctl artifact: a table on stderr, a one-line JSON summary on stdout.

    Shards: splits, counts, classes, image size, mean/std, skipped inputs, provenance. Run
    directories, encoders and features files: their metadata (no weights are loaded). Any
    other WebDataset (a directory of .tar shards, a pattern, URLs): the same, from one pass.

    Example:

    \b
        sslctl shard data/ shards/ | sslctl inspect
    """
    import json

    from sslctl import console
    from sslctl.artifacts import path_from_stdin_or_arg
    from sslctl.inspect import describe, render

    console.set_quiet(quiet)
    target = path if path not in (None, "-") else str(path_from_stdin_or_arg(path, "artifact path"))  # a URL stays a URL
    desc = describe(target, label_key=label_key)
    if not quiet:
        render(desc, target)
    print(json.dumps(desc.summary))
