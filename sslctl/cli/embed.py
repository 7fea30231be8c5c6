"""`sslctl embed`: frozen encoder + shards -> features file; prints FEATS on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sslctl.cli import _run_flags as flags
from sslctl.cli._bounds import at_least


def command(
    encoder: str = typer.Argument(
        ..., help="Run directory, encoder.safetensors, or a torchvision model name with --weights random; "
        "'-': read the path from stdin (`sslctl pretrain ... | sslctl embed - SHARDS`)."
    ),
    shards: Optional[str] = typer.Argument(
        None, help="The data: a shards directory or its manifest.json (what `sslctl shard` printed), or any WebDataset: "
        "a directory of .tar shards, a pattern (data/test-{000000..000009}.tar), URLs (http(s)://, s3://, gs://, "
        "pipe:CMD; '::' joins several). Omit it to give each split its own source with --split NAME=SPEC."
    ),
    split: Optional[List[str]] = typer.Option(
        None, "--split", help="Split to embed (repeatable; default: every split of the data), or NAME=SPEC: split NAME read "
        "from its own source (--split train=URL_PATTERN --split test=URL_PATTERN, instead of SHARDS)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Features file (default: RUN/features.safetensors, with -projector / -random suffixes; "
        "for a model name ./features-NAME-random.safetensors)."
    ),
    layer: str = typer.Option("backbone", "--layer", help="backbone (pooled encoder output, docs/spec/protocols.md E1) or projector (needs a run directory)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="random: a seeded random initialisation of the architecture (the floor)."),
    small_stem: Optional[bool] = typer.Option(None, "--small-stem/--no-small-stem", help="For a model name: the 3x3 stride-1 CIFAR stem (default: off)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", callback=at_least(1), help="Resize + center crop to N px (default: the encoder's; model name: 32 with --small-stem, else 224)."),
    normalize: str = typer.Option("auto", "--normalize", help="auto (the encoder's own, else the shards' mean/std), encoder, manifest or imagenet."),
    batch_size: int = typer.Option(256, "--batch-size", callback=at_least(1), help="Images per forward pass."),
    device: str = flags.DEVICE,
    dtype: str = typer.Option("float32", "--dtype", help="Storage dtype of the features: float32 or float16."),
    bf16: Optional[bool] = flags.BF16,
    channels_last: Optional[bool] = flags.CHANNELS_LAST,
    workers: Optional[int] = typer.Option(None, "--workers", callback=at_least(0), help="Decoding processes; each takes whole shards (default: cores - 1)."),
    seed: int = typer.Option(0, "--seed", callback=at_least(0), help="Seed of --weights random."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress (warnings and errors still show)."),
    nproc: int = typer.Option(1, "--nproc", callback=at_least(1), help="Processes per node, started by torch.distributed.run (torchrun); they share the shards."),
    nnodes: str = typer.Option("1", "--nnodes", help="Nodes, as torchrun's --nnodes; more than one needs --rdzv-endpoint."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous, reachable from every node (torchrun's)."),
    rdzv_id: Optional[str] = typer.Option(None, "--rdzv-id", help="Job id shared by the nodes (default: $SLURM_JOB_ID, else sslctl)."),
    label_key: Optional[str] = typer.Option(None, "--label-key", help="Shards without a manifest: the member that holds a sample's label, EXT (default cls) or EXT:FIELD of a JSON member (json:label)."),
) -> None:
    """Embed shards with a frozen encoder (eval mode, evaluation transform); print FEATS.

    FEATS is one safetensors file with SPLIT.features (N x D) and SPLIT.labels per split, rows
    in the shards' order. An interrupted run continues where it stopped (rerun the command).
    Shards without a manifest are indexed once into FEATS's directory (data-index-*.json);
    unreadable images are skipped with a warning and have no row.

    Examples:

    \b
        sslctl embed runs/moco shards/fmnist | sslctl knn
        sslctl embed resnet18 shards/fmnist --weights random --small-stem \\
          --out floor.safetensors
        # 4 processes share the shards; the same FEATS:
        sslctl embed runs/moco shards/imagenet --nproc 4
        # each split from its own source:
        sslctl embed runs/moco --split 'train=s3://bkt/train-{0000..0099}.tar' \\
          --split 'test=s3://bkt/test-{0000..0009}.tar'
    """
    from sslctl import console, distributed
    from sslctl.artifacts import path_from_stdin_or_arg
    from sslctl.embed import embed
    from sslctl.errors import UserError
    from sslctl.launch import launch

    console.set_quiet(quiet)
    sources = dict(s.split("=", 1) for s in split or [] if "=" in s)
    if sources:
        if shards is not None or len(sources) != len(split):
            raise UserError("--split NAME=SPEC gives every split its own source: then pass no SHARDS and no bare --split NAME")
        shards, split = sources, None
    elif shards is None:
        raise UserError("no data given: pass SHARDS, or --split NAME=SPEC for each split")
    from_stdin = None
    if encoder == "-":
        encoder = from_stdin = str(path_from_stdin_or_arg(None, "encoder (a run directory from `sslctl pretrain`)"))
    if launch(nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, stdin_path=from_stdin):
        return  # the processes ran; rank 0 printed FEATS
    feats = embed(
        encoder, shards, splits=split, out=out, layer=layer, weights=weights, small_stem=small_stem,
        input_size=input_size, normalize=normalize, batch_size=batch_size, device=device, dtype=dtype, bf16=bf16,
        channels_last=channels_last, workers=workers, seed=seed, label_key=label_key,
    )
    if distributed.is_main():  # under torchrun, one line from rank 0 only
        print(feats)
