"""`sslctl pretrain`: train an encoder on shards by recipe; prints RUN_DIR on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sslctl.cli import _run_flags as flags
from sslctl.run_options import CHECKPOINT_EVERY, LOG_EVERY, RunOptions
from sslctl.cli._bounds import at_least


def command(
    shards: Optional[str] = typer.Argument(
        None, help="The data: a shards directory or its manifest.json (what `sslctl shard` printed), or any WebDataset: a "
        "directory of .tar shards, a pattern (data/train-{000000..000099}.tar), URLs (http(s)://, s3://, gs://, pipe:CMD; "
        "'::' joins several); '-' or omitted: read it from stdin. Without a manifest the shards are indexed once "
        "(sample counts, labels, mean/std of the first 1,000 images) into RUN_DIR/data-index-*.json; see docs/data.md."
    ),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe name (`sslctl recipes` lists them) or path to a .toml file."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: recipe.toml, checkpoints/last.pt, encoder.safetensors, metrics.jsonl."),
    variant: str = typer.Option("auto", "--variant", help="auto (the recipe's small variant for images <= 64 px), none, or a variant's name."),
    set_: Optional[List[str]] = flags.set_flag(),
    epochs: Optional[int] = flags.epochs_flag(),
    batch_size: Optional[int] = flags.batch_size_flag(),
    max_steps: Optional[int] = flags.MAX_STEPS,
    device: str = flags.DEVICE,
    resume: str = flags.RESUME,
    seed: int = flags.SEED,
    workers: Optional[int] = flags.WORKERS,
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the method's modules (slow start, faster steps on GPUs)."),
    checkpoint_every: int = typer.Option(CHECKPOINT_EVERY, "--checkpoint-every", callback=at_least(1), help="Write checkpoints/last.pt every N steps (and at every epoch end)."),
    log_every: int = typer.Option(LOG_EVERY, "--log-every", callback=at_least(1), help="Write a metrics.jsonl line and a progress line every N steps (and at every epoch end)."),
    monitor: Optional[str] = typer.Option(None, "--monitor", help="Online weighted-kNN monitor on this labelled split (bank: train split), written to metrics.jsonl."),
    monitor_every: int = typer.Option(1, "--monitor-every", callback=at_least(1), help="Run the --monitor every N epochs."),
    amp: Optional[bool] = flags.BF16,
    channels_last: Optional[bool] = flags.CHANNELS_LAST,
    views: str = typer.Option("auto", "--views", help="How the views are made, in the loader's workers: per-image (torchvision), batch (a whole uint8 batch at once), auto (batch for a batch of images of one shape up to 128x128 px, else per-image). Measured in docs/performance.md."),
    quiet: bool = flags.QUIET,
    nproc: int = typer.Option(1, "--nproc", callback=at_least(1), help="Processes per node, started by torch.distributed.run (torchrun); one per GPU."),
    nnodes: str = typer.Option("1", "--nnodes", help="Nodes (or MIN:MAX), as torchrun's --nnodes; more than one needs --rdzv-endpoint."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous, reachable from every node (torchrun's)."),
    rdzv_id: Optional[str] = typer.Option(None, "--rdzv-id", help="Job id shared by the nodes (default: $SLURM_JOB_ID, else sslctl)."),
    label_key: Optional[str] = typer.Option(None, "--label-key", help="Shards without a manifest: the member that holds a sample's label, EXT (default cls) or EXT:FIELD of a JSON member (json:label); only --monitor needs labels."),
) -> None:
    """Pretrain an encoder on the shards' train split with a recipe; print RUN_DIR.

    The recipe's optim.batch_size is the GLOBAL batch: under torchrun each process takes its
    share. Rerunning the same command resumes from RUN_DIR/checkpoints/last.pt (exactly, on
    the CPU); SIGTERM/SIGINT save a checkpoint and exit 143/130 so a batch system can requeue.
    Streamed shards (URLs) resume exactly too, by the sample counts in RUN_DIR's data index;
    a shard that breaks off is skipped, its samples replaced and counted in metrics.jsonl, and
    if remote shards change after indexing the run goes on but is no longer exactly repeatable.

    --views says how the two (or more) views of an image are made, in the loader's workers:
    per-image (torchvision), batch (a whole uint8 batch at once), or auto (batch for a batch of
    images of one shape up to 128x128 px, else per-image). Measured in docs/performance.md.

    Examples:

    \b
        sslctl shard ~/data/fashion-mnist shards/ |
          sslctl pretrain --recipe moco_v2 --out runs/moco --epochs 50
        torchrun --nproc-per-node 4 -m sslctl pretrain shards/ --recipe simclr \\
          --out runs/simclr --set optim.lr=0.5
        # the same, with torchrun started for you:
        sslctl pretrain shards/ --recipe simclr --out runs/simclr --nproc 4
        # any WebDataset, e.g. over HTTP:
        sslctl pretrain 'https://host/train-{000000..000099}.tar' \\
          --recipe simclr --out runs/web
    """
    from sslctl import console, distributed
    from sslctl.artifacts import path_from_stdin_or_arg
    from sslctl.data import open_dataset
    from sslctl.launch import launch
    from sslctl.recipes import load_recipe, recipe_path
    from sslctl.train import Engine

    console.set_quiet(quiet)
    options = RunOptions(  # checked before the recipe is read or processes start
        device=device, resume=resume, seed=seed, workers=workers, compile=compile_, checkpoint_every=checkpoint_every,
        log_every=log_every, monitor_split=monitor, monitor_every=monitor_every, max_steps=max_steps,
        channels_last=channels_last, amp=amp, recipe_file=str(recipe_path(recipe)), views=views,
    )
    shards_path = shards  # a URL stays a string (a Path would fold its //)
    if shards in (None, "-"):
        shards_path = str(path_from_stdin_or_arg(shards, "shards (a directory or manifest.json from `sslctl shard`)"))
    size = open_dataset(shards_path, index_dir=out, label_key=label_key).get("image_size")  # indexes foreign shards once
    overrides = flags.recipe_overrides(set_, epochs, batch_size)
    cfg = load_recipe(recipe, variant=variant, overrides=overrides, image_size=max(size) if size else None)
    from_stdin = str(shards_path) if shards in (None, "-") else None
    if launch(nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, stdin_path=from_stdin):
        return  # the processes ran; rank 0 printed RUN_DIR
    from sslctl.evaluate.knn import knn_monitor

    run_dir = Engine(shards_path, cfg, out, options, monitor=knn_monitor if monitor else None).run()
    if distributed.is_main():  # under torchrun, one line from rank 0 only
        print(run_dir)
