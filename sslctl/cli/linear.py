"""`sslctl linear`: linear probe (docs/spec/protocols.md E2 on a features file, E3 with augmentation); one JSON line."""

from __future__ import annotations

from typing import Optional

import typer

from sslctl.cli._bounds import above, at_least


def command(
    features: Optional[str] = typer.Argument(
        None, help="E2: features file from `sslctl embed` ('-' or omitted: read its path from stdin). "
        "E3 (--protocol augment): the run directory or encoder.safetensors."
    ),
    protocol: str = typer.Option("precomputed", "--protocol", help="precomputed (E2) or augment (E3: frozen encoder, augmentation on the fly; needs --shards)."),
    train_split: str = typer.Option("train", "--train-split", help="Split the probe is trained on."),
    eval_split: Optional[str] = typer.Option(None, "--eval-split", help="Split that is scored, once, at the end (default: test, else val)."),
    shards: Optional[str] = typer.Option(None, "--shards", help="E3: shards directory or manifest.json, or any WebDataset with both splits (a directory of train-*/test-* .tar shards)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", callback=at_least(1), help="E2: at most this many L-BFGS iterations (default 100); E3: epochs (default 100)."),
    lr: float = typer.Option(30.0, "--lr", callback=above(0), help="E3: SGD learning rate (MoCo 30, AdCo 10)."),
    batch_size: int = typer.Option(256, "--batch-size", callback=at_least(1), help="E3: batch size."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    workers: Optional[int] = typer.Option(None, "--workers", callback=at_least(0), help="E3: data loader processes."),
    seed: int = typer.Option(0, "--seed", callback=at_least(0), help="Seed of the held-out split (E2) or of the data order and initialisation (E3)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."),
) -> None:
    """Linear probe; one JSON line on stdout: {"task": "linear", "protocol", "top1", "top5"
    (percent), "lr", "wd", "epochs", "n_train", "n_eval", "train_split", "eval_split",
    "features" or "encoder", ...}.

    E2 (default): standardised features, multinomial logistic regression by full-batch L-BFGS,
    weight decay chosen on a stratified 10% of train, refit on all of train, eval split (test,
    else val) scored once at the end. E3: MoCo's augmented probe on the frozen encoder (slow:
    100 epochs of forward passes).

    Examples:

    \b
        sslctl linear runs/moco/features.safetensors
        sslctl linear runs/moco --protocol augment --shards shards/fmnist --lr 30
    """
    import json

    from sslctl import console
    from sslctl.artifacts import path_from_stdin_or_arg, sha256_file
    from sslctl.errors import UserError
    from sslctl.devices import resolve_device
    from sslctl.evaluate.splits import pick_eval_split

    console.set_quiet(quiet)
    if protocol == "augment":
        from sslctl.evaluate.linear import augmented_probe

        if features in (None, "-"):
            features = str(path_from_stdin_or_arg(features, "encoder (a run directory)"))
        if shards is None:
            raise UserError("--protocol augment needs --shards (the labelled shards to train and score on)")
        result = augmented_probe(features, shards, train_split=train_split, eval_split=eval_split, lr=lr,
                                 epochs=epochs or 100, batch_size=batch_size, device=device, workers=workers, seed=seed)
        print(json.dumps({"task": "linear", **result, "encoder": features, "shards": shards}), flush=True)
        return
    if protocol != "precomputed":
        raise UserError(f"--protocol {protocol}: expected precomputed (E2) or augment (E3)")

    from sslctl.embed import load_split_pair, read_features_metadata
    from sslctl.evaluate.linear import E2_ITERS, linear_probe

    path = path_from_stdin_or_arg(features, "features file (from `sslctl embed`)")
    eval_split = pick_eval_split(eval_split, read_features_metadata(path)["splits"] or [], path)
    console.log(f"linear: trained on split {train_split}, scored on split {eval_split}")
    meta, (train_x, train_y), (eval_x, eval_y) = load_split_pair(path, train_split, eval_split)
    dev = resolve_device(device)
    num_classes = max(len(meta.get("classes") or []), int(max(train_y.max(), eval_y.max())) + 1)
    result = linear_probe(train_x.to(dev), train_y, eval_x.to(dev), eval_y, num_classes=num_classes,
                          iters=epochs or E2_ITERS, seed=seed)
    line = {"task": "linear", **result, "train_split": train_split, "eval_split": eval_split,
            "features": str(path.resolve()), "features_sha256": sha256_file(path)}
    print(json.dumps(line), flush=True)
