"""`sslctl knn`: weighted kNN accuracy of a features file (docs/spec/protocols.md E1); JSON lines on stdout."""

from __future__ import annotations

from typing import List, Optional

import typer

from sslctl.cli._bounds import above, at_least


def command(
    features: Optional[str] = typer.Argument(None, help="Features file from `sslctl embed`; '-' or omitted: read its path from stdin."),
    bank_split: str = typer.Option("train", "--bank-split", help="Split whose features are the neighbours."),
    eval_split: Optional[str] = typer.Option(None, "--eval-split", help="Split that is classified (default: test, else val)."),
    k: Optional[List[int]] = typer.Option(None, "--k", callback=at_least(1), help="Neighbours (repeatable) (default: 20 and 200)."),
    temperature: Optional[List[float]] = typer.Option(
        None, "--temperature", "-t", callback=above(0), help="Temperature (repeatable; pairs with --k in order, one value applies to all) (default: 0.07 and 0.1)."
    ),
    backend: str = typer.Option("auto", "--backend", help="auto (faiss on the CPU, torch on CUDA without faiss-gpu), faiss or torch; both exact."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (where the search runs)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table on stderr."),
) -> None:
    """Weighted kNN classification (E1): one JSON line per (k, T) on stdout, a table with
    top-1, top-5 and per-class accuracy on stderr.

    Each line: {"task": "knn", "protocol": "weighted-knn/cosine/k=20/T=0.07", "k",
    "temperature", "top1", "top5" (percent), "n_bank", "n_eval", "bank_split", "eval_split",
    "features", "features_sha256"}. The default pairs are k=20/T=0.07 and k=200/T=0.1, from
    one search. The eval split is --eval-split, else test, else val.

    Examples:

    \b
        sslctl knn runs/moco/features.safetensors
        sslctl embed runs/moco shards/ | sslctl knn --k 10 --k 20 -t 0.07
    """
    import json

    from sslctl import console
    from sslctl.artifacts import path_from_stdin_or_arg, sha256_file
    from sslctl.embed import load_split_pair, read_features_metadata
    from sslctl.evaluate.knn import DEFAULT_PAIRS, pair_up, weighted_knn
    from sslctl.devices import resolve_device
    from sslctl.evaluate.splits import pick_eval_split

    console.set_quiet(quiet)
    path = path_from_stdin_or_arg(features, "features file (from `sslctl embed`)")
    eval_split = pick_eval_split(eval_split, read_features_metadata(path)["splits"] or [], path)
    meta, (bank, bank_labels), (queries, query_labels) = load_split_pair(path, bank_split, eval_split)
    pairs = pair_up(k or [p[0] for p in DEFAULT_PAIRS], temperature or [p[1] for p in DEFAULT_PAIRS])
    dev = resolve_device(device)
    classes = meta.get("classes") or []
    num_classes = max(len(classes), int(max(bank_labels.max(), query_labels.max())) + 1)
    results = weighted_knn(
        bank.to(dev), bank_labels, queries.to(dev), query_labels, [p[0] for p in pairs], [p[1] for p in pairs],
        num_classes=num_classes, backend=backend,
    )
    digest = sha256_file(path)
    _table(results, classes, query_labels, num_classes, path, bank_split, eval_split)
    for r in results:
        line = {"task": "knn", **{key: r[key] for key in ("protocol", "k", "temperature", "top1", "top5", "n_bank", "n_eval")},
                "bank_split": bank_split, "eval_split": eval_split, "features": str(path.resolve()), "features_sha256": digest}
        print(json.dumps(line), flush=True)


def _table(results: list[dict], classes: list[str], labels, num_classes: int, path, bank_split: str, eval_split: str) -> None:
    import torch
    from rich.table import Table

    from sslctl import console

    if console.is_quiet():
        return
    r = results[0]
    table = Table(title=f"weighted kNN: {path} ({r['n_eval']} queries of split {eval_split}, bank {r['n_bank']} of split "
                        f"{bank_split}, {r['backend']})")
    table.add_column("class")
    table.add_column("n", justify="right")
    for r in results:
        table.add_column(f"k={r['k']} T={r['temperature']:g}", justify="right")
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    for c in range(num_classes):
        name = classes[c] if c < len(classes) else str(c)
        accs = [r["per_class_top1"][c] for r in results]
        table.add_row(name, str(counts[c]), *("-" if a is None else f"{a:.1f}" for a in accs))
    table.add_section()
    table.add_row("top-1", "", *(f"{r['top1']:.2f}" for r in results), style="bold")
    table.add_row("top-5", "", *(f"{r['top5']:.2f}" for r in results))
    console.console.print(table)
