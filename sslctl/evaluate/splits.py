"""Which split an evaluation scores: `--eval-split` when given, else `test` when the data has
one, else `val` (ImageNet and most public datasets ship train and val only)."""

from __future__ import annotations

from sslctl.errors import UserError

DEFAULT_EVAL_SPLITS = ("test", "val")

# How to get a held-out split the data lacks, by what holds the splits.
MAKE_SPLIT = {
    "features": "embed it (sslctl embed ENCODER SHARDS --split {split}); shards without one get a val split "
                "from `sslctl shard SRC OUT --val-fraction 0.1`",
    "shards": "shard the data with one (`sslctl shard SRC OUT --val-fraction 0.1` carves val out of train)",
}


def default_eval_split(available) -> str | None:
    """test, else val, else None."""
    return next((s for s in DEFAULT_EVAL_SPLITS if s in available), None)


def pick_eval_split(requested: str | None, available: list[str], where, holder: str = "features") -> str:
    """The split to score. UserError naming `where`, the splits it has, one that `--eval-split`
    could pick instead, and how to make the missing one (holder: "features" or "shards")."""
    have = ", ".join(available) or "none"
    make = MAKE_SPLIT[holder]
    if requested is None:
        chosen = default_eval_split(available)
        if chosen is None:
            raise UserError(f"{where}: no test or val split to score (it has: {have}); pass --eval-split SPLIT to "
                            f"score another, or {make.format(split='val')}")
        return chosen
    if requested not in available:
        other = default_eval_split(available) or next((s for s in available if s != "train"), None)
        instead = f"use --eval-split {other}, or " if other else ""
        raise UserError(f"{where}: no split {requested!r} (it has: {have}); {instead}{make.format(split=requested)}")
    return requested
