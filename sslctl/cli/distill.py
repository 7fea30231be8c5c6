"""`sslctl distill`: SimCLR v2's distillation of a fine-tuned teacher into a student; prints the student's RUN_DIR."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sslctl.cli import _run_flags as flags
from sslctl.cli._bounds import above, within


def command(
    teacher: Optional[str] = typer.Argument(None, help="Teacher: an `sslctl finetune` run directory; '-' or omitted: read its path from stdin."),
    shards: str = typer.Argument(..., help="Shards whose train split is the unlabelled data (its labels are not used)."),
    out: Path = typer.Option(..., "--out", "-o", help="The student's run directory (recipe.toml, checkpoints/, encoder.safetensors, metrics.jsonl)."),
    student: Optional[str] = typer.Option(None, "--student", help="Student backbone, any torchvision model name [default: the teacher's]."),
    temperature: float = typer.Option(1.0, "--temperature", callback=above(0), help="Softmax temperature t of both predictions; the loss is scaled by t^2."),
    alpha: float = typer.Option(1.0, "--alpha", callback=within(0, 1), help="Loss = alpha KD + (1 - alpha) CE on the teacher's labelled subset; 1: no labels."),
    eval_split: Optional[str] = typer.Option(None, "--eval-split", help="Split on which the student's top-1 is logged to metrics.jsonl (default: test, else val; skipped when absent)."),
    set_: Optional[List[str]] = flags.set_flag("the distillation recipe"),
    epochs: Optional[int] = flags.epochs_flag(" [default: 100]"),
    batch_size: Optional[int] = flags.batch_size_flag(" [default: 256]"),
    max_steps: Optional[int] = flags.MAX_STEPS,
    device: str = flags.DEVICE,
    resume: str = flags.RESUME,
    seed: int = flags.SEED,
    workers: Optional[int] = flags.WORKERS,
    amp: Optional[bool] = flags.BF16,
    quiet: bool = flags.QUIET,
) -> None:
    """Train a student (the teacher's backbone or a smaller one) from scratch on unlabelled images
    against a fine-tuned teacher's softened predictions; print the student's RUN_DIR.

    The student's run chains like any run (embed, knn, linear).

    Example:

    \b
        sslctl distill runs/simclr2-ft1 shards/ --student resnet18 \\
          --out runs/student-r18
    """
    from sslctl import console, distributed
    from sslctl.artifacts import path_from_stdin_or_arg
    from sslctl.data import load_manifest
    from sslctl.distill import distill
    from sslctl.evaluate.splits import default_eval_split

    console.set_quiet(quiet)
    teacher_path = path_from_stdin_or_arg(teacher, "teacher run directory (from `sslctl finetune`)")
    overrides = flags.recipe_overrides(set_, epochs, batch_size)
    eval_split = eval_split or default_eval_split(load_manifest(shards)["splits"])  # test, else val
    run_dir = distill(
        teacher_path, shards, out, student=student, temperature=temperature, alpha=alpha, eval_split=eval_split,
        overrides=overrides, device=device, resume=resume, seed=seed, workers=workers, max_steps=max_steps, amp=amp,
    )
    if distributed.is_main():
        print(run_dir)
