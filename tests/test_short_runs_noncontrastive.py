"""A short real run of each method without negatives (slow): Barlow Twins, VICReg, SimSiam and
DINO, each checked by `learning_check` (tests/realrun.py) as the founding methods are: the loss
falls, the embeddings do not collapse, and views of held-out images retrieve each other better
than at initialisation (3 of 4 draws, 1.25x on their sum).

Per recipe, beyond realrun.CHEAP (the tiny ResNet, 28-px crops of scale 0.2-1, no warmup, scaling
none), with heads narrowed to 256 hidden units:
- VICReg: 300 steps of 16 at lr 0.05 over one epoch's schedule, 20-px crops.
- Barlow Twins, SimSiam: 156 steps of 64 over two epochs' schedule (156 steps). At batch 16
  Barlow Twins' retrieval stayed at 0.5-1.0x of initialisation; SimSiam reached 1.13-1.33x at its
  linear-scaling lr (0.5 x 64/256) and 1.59x at lr 0.3.
- DINO: 156 steps of 64 over three epochs' schedule (it stops at two thirds of it: the lr and
  the teacher's momentum do not reach their ends), lr 0.6, BN in the head's MLP (the official
  use_bn_in_head; without it every image starts on one point of the sphere and the teacher
  collapses to one prototype within 40 steps), 256 prototypes on a 64-wide bottleneck, teacher
  momentum from 0.99 (0.9995 barely moves the teacher in 156 steps), the teacher's temperature at
  its warm-up value 0.04, prototypes trained from the first step. Over two epochs with 1,024
  prototypes, seed 0 reached x1.54 on one CPU and failed on another (x1.10, x1.24 in fp32).
Measured figures per seed: docs/methods.md.
"""

from __future__ import annotations

import pytest

from tests.realrun import learning_check

pytestmark = pytest.mark.slow

HEADS = ["head.projector_hidden=[256, 256]", "head.projector_dim=256"]
TWO_EPOCHS_OF_64 = ["optim.batch_size=64", "schedule.epochs=2"]
RUNS = {  # recipe: (steps, overrides)
    "vicreg": (300, [*HEADS, "augment.crop_size=20", "optim.lr=0.05"]),
    "barlow_twins": (156, [*HEADS, *TWO_EPOCHS_OF_64, "optim.lr=0.1"]),
    "simsiam": (156, [*HEADS, *TWO_EPOCHS_OF_64, "optim.lr=0.3", "head.predictor_hidden=[64]", "head.predictor_dim=256"]),
    "dino": (156, ["head.projector_hidden=[256, 256]", "head.projector_dim=64", "head.projector_norm=true",
                   "head.prototypes=256", "optim.batch_size=64", "schedule.epochs=3", "optim.lr=0.6",
                   "method.base_momentum=0.99", "method.freeze_last_layer_epochs=0",
                   "loss.warmup_teacher_temperature_epochs=1"]),
}


@pytest.mark.parametrize("recipe", list(RUNS))
def test_short_run_learns_without_collapse(recipe, mini_shards, tmp_path, one_thread):
    steps, overrides = RUNS[recipe]
    learning_check(recipe, mini_shards, tmp_path / recipe, *overrides, steps=steps)
