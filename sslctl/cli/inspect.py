from __future__ import annotations

import typer


def command(
    path: str = typer.Argument(None, help="Shards directory or manifest.json, run directory, encoder or features "
                               ".safetensors; '-' or omitted: read the path from stdin."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the JSON summary line, no table."),
) -> None:
    """Describe an sslctl artifact: a table on stderr, a one-line JSON summary on stdout.

    Shards: splits, counts, classes, image size, mean/std, skipped inputs, provenance. Run
    directories, encoders and features files: their metadata (no weights are loaded).

    Example:

    \b
        sslctl shard data/ shards/ | sslctl inspect
    """
    import json

    from sslctl import console
    from sslctl.artifacts import path_from_stdin_or_arg
    from sslctl.inspect import describe, render

    console.set_quiet(quiet)
    target = path_from_stdin_or_arg(path, "artifact path")
    desc = describe(target)
    if not quiet:
        render(desc, target)
    print(json.dumps(desc.summary))
