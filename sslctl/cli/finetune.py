"""`sslctl finetune`: SimCLR v2's fine-tuning on a labelled subset; prints the new RUN_DIR on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sslctl.cli import _run_flags as flags
from sslctl.cli._bounds import at_least


def command(
    run: Optional[str] = typer.Argument(None, help="Pretrain run directory; '-' or omitted: read its path from stdin."),
    shards: str = typer.Argument(..., help="Labelled shards directory (or its manifest.json), usually the ones RUN was pretrained on."),
    out: Path = typer.Option(..., "--out", "-o", help="New run directory: labelled_keys.txt, labelled/, recipe.toml, checkpoints/, encoder.safetensors, metrics.jsonl."),
    labels: str = typer.Option("1%", "--labels", help="Labelled subset, stratified by class: a percentage (1%, 10%) or a total number of images (600)."),
    head_layers: int = typer.Option(1, "--head-layers", callback=at_least(0), help="Layers of the pretrained projection head kept under the classifier (SimCLR v2: 1; 0: encoder only)."),
    subset_seed: int = typer.Option(0, "--subset-seed", callback=at_least(0), help="Seed of the labelled subset (independent of --seed)."),
    split: str = typer.Option("train", "--split", help="Split the labelled subset is drawn from."),
    eval_split: Optional[str] = typer.Option(None, "--eval-split", help="Split on which the final classifier's top-1 is logged to metrics.jsonl (default: test, else val; skipped when absent)."),
    set_: Optional[List[str]] = flags.set_flag("the fine-tuning recipe"),
    epochs: Optional[int] = flags.epochs_flag(" [default: 60]"),
    batch_size: Optional[int] = flags.batch_size_flag(" [default: 1024, at most the subset]"),
    max_steps: Optional[int] = flags.MAX_STEPS,
    device: str = flags.DEVICE,
    resume: str = flags.RESUME,
    seed: int = flags.SEED,
    workers: Optional[int] = flags.WORKERS,
    amp: Optional[bool] = flags.BF16,
    quiet: bool = flags.QUIET,
) -> None:
    """Fine-tune a pretrained encoder (and the first layer of its projection head) with a new
    zero-initialised linear classifier on a stratified labelled subset; print the new RUN_DIR.

    SimCLR v2's settings (LARS, lr 0.005 x sqrt(batch), wd 0, no warmup, 60 epochs). The chosen
    keys go to RUN_DIR/labelled_keys.txt. The result chains like a pretrain run (embed, knn,
    linear) and is the teacher of `sslctl distill`.

    Example:

    \b
        sslctl finetune runs/simclr2 shards/ --labels 1% --out runs/simclr2-ft1 |
          sslctl distill - shards/ --out runs/student
    """
    from sslctl import console, distributed
    from sslctl.artifacts import path_from_stdin_or_arg
    from sslctl.data import load_manifest
    from sslctl.finetune import finetune
    from sslctl.evaluate.splits import default_eval_split

    console.set_quiet(quiet)
    run_path = path_from_stdin_or_arg(run, "pretrain run directory")
    overrides = flags.recipe_overrides(set_, epochs, batch_size)
    eval_split = eval_split or default_eval_split(load_manifest(shards)["splits"])  # test, else val
    run_dir = finetune(
        run_path, shards, out, labels=labels, head_layers=head_layers, subset_seed=subset_seed, split=split,
        eval_split=eval_split, overrides=overrides, device=device, resume=resume, seed=seed, workers=workers,
        max_steps=max_steps, amp=amp,
    )
    if distributed.is_main():
        print(run_dir)
