"""A short real run of Barlow Twins and VICReg (slow): each recipe's small variant, with a tiny
ResNet in place of ResNet-18, pretrains a few hundred steps on the embedded Fashion-MNIST shards
through the real engine, and

1. the loss falls: the mean of the last 3 logged windows is 3% below the peak of the first two
   thirds (SimSiam's loss is negative: -1 is perfect agreement, so "below" means more negative);
2. the embeddings do not collapse: the logged per-dimension std of the normalised embedding
   stays above a quarter of the healthy 1/sqrt(dim) (collapse -> 0);
3. the encoder learned: two augmented views of the same held-out image find each other more
   often than at initialisation, on 3 of 4 draws and by 1.25x on their sum (tests/realrun.py).

What the runs change in the recipes, to cost ~55-60 CPU-seconds each on one thread (retrieval
draws included): tests/realrun.py's tiny ResNet (~1/19 of ResNet-18's step time), 20-px crops
of scale 0.2-1, no warmup, 256-wide heads, scaling none, and per recipe below: VICReg 300 steps of batch
16 at lr 0.05 over one epoch's schedule (312 steps), Barlow Twins 156 steps of batch 64 at lr 0.1
over two epochs' (156 steps) on 28-px crops.
"""

from __future__ import annotations

import math

import pytest

from sslctl.recipes import load_recipe
from tests.realrun import TINY_RESNET, learned, short_run

pytestmark = pytest.mark.slow


COMMON = [
    f"encoder.name={TINY_RESNET}",
    "optim.scaling=none",
    "schedule.warmup_epochs=0",
    "augment.crop_size=20",
    "augment.crop_scale=[0.2, 1.0]",
    "head.projector_hidden=[256, 256]",
    "head.projector_dim=256",
]
RUNS = {  # recipe: (steps, overrides)
    "vicreg": (300, ["optim.batch_size=16", "schedule.epochs=1", "optim.lr=0.05"]),
    # 28-px crops: at 20 px the run's retrieval gain was seed- and CPU-dependent (seed 0 failed,
    # x1.14; at 28 px seeds 0-2 gave x1.6-2.0)
    "barlow_twins": (156, ["optim.batch_size=64", "schedule.epochs=2", "optim.lr=0.1", "augment.crop_size=28"]),
}


@pytest.mark.parametrize("recipe", list(RUNS))
def test_short_run_learns_without_collapse(recipe, mini_shards, tmp_path, one_thread):
    steps, overrides = RUNS[recipe]
    cfg = load_recipe(recipe, variant="small", overrides=COMMON + overrides)
    rows, at_init, trained = short_run(mini_shards, cfg, tmp_path / recipe, steps)
    rows = [r for r in rows if "loss" in r]  # a window every 10 steps and at each epoch's end
    assert rows[-1]["step"] == steps
    losses = [r["loss"] for r in rows]
    peak, late = max(losses[: 2 * len(losses) // 3]), sum(losses[-3:]) / 3
    assert late < peak - 0.03 * abs(peak), losses

    dim = int(cfg["head"]["projector_dim"])
    assert rows[-1]["z_std"] > 0.25 / math.sqrt(dim), rows[-1]

    print(f"{recipe}: loss {losses[0]:.3f} first, {peak:.3f} peak, {late:.3f} last; z_std {rows[-1]['z_std']:.4f}; "
          f"view retrieval {sum(at_init) / 4:.3f} at init -> {sum(trained) / 4:.3f} ({at_init} -> {trained})")
    assert learned(at_init, trained), (at_init, trained)
