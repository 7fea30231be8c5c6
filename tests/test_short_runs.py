"""A short real run per founding recipe (slow): `learning_check` (tests/realrun.py) pretrains the
recipe's small variant with a tiny ResNet on the embedded Fashion-MNIST shards for 300 steps of
16 through the real engine, and asserts that the loss falls, that the embeddings do not collapse,
and that views of held-out images retrieve each other better than at initialisation. kNN
accuracy is no use here: a random ResNet-18 already reaches ~83% on Fashion-MNIST.

Per recipe, beyond realrun.CHEAP (the tiny ResNet, batch 16 at the lr given, one epoch's
schedule without warmup, 28-px crops of scale 0.2-1):
- MoCo / AdCo: a queue / bank of 8 batches keeps the random-negatives phase short (random
  negatives reward pulling every image to one point, which a short run cannot undo), 2 BN splits
  of 8 images (8 splits of 2 would be noise), and the symmetric loss, which the MoCo colab found
  to act like twice the epochs. MoCo v2 lr 0.01 (~3x the linear-scaling value 0.03 x 16/256):
  its MLP head (no BN) starts with every image's embedding in a narrow cone, which a higher lr
  did not spread in a short run with ResNet-18. MoCo v1 / AdCo lr 0.02.
- SimCLR: CIFAR SimCLR's effective lr 2.0 (1.0 x 512/256) with LARS. BYOL: LARS lr 0.5 and a
  target momentum from 0.97 (0.996's target barely moves in 300 steps: x1.20 of init, seed 0).
One intra-op thread: on a shared 2-core machine two threads fighting another process for the
cores ran 10x slower, and one thread makes the figures independent of the core count. Measured
figures per recipe and seed, and the check failing on broken methods: docs/testing.md.
"""

from __future__ import annotations

import pytest
import torchvision

from tests.realrun import TinyResNet, learning_check, run_learning_check

pytestmark = pytest.mark.slow

RUNS = {
    "simclr": ["optim.lr=2.0"],
    "moco_v2": ["optim.lr=0.01", "method.queue_size=128", "method.bn_splits=2", "method.symmetric=true"],
    "moco_v1": ["optim.lr=0.02", "method.queue_size=128", "method.bn_splits=2", "method.symmetric=true"],
    "adco": ["optim.lr=0.02", "method.bank_size=128", "method.bn_splits=2", "method.symmetric=true"],
    "byol": ["optim.lr=0.5", "method.base_tau=0.97"],
}


@pytest.mark.parametrize("recipe", list(RUNS))
def test_short_run_learns_without_collapse(recipe, mini_shards, tmp_path, one_thread):
    learning_check(recipe, mini_shards, tmp_path / recipe, *RUNS[recipe])


def test_the_check_fails_when_the_encoder_gets_no_gradient(mini_shards, tmp_path, one_thread, monkeypatch):
    """SimCLR with the loss's gradient cut at the encoder's output: the projector still learns on
    the random features (the loss falls) and the embeddings keep their spread, but the encoder
    does not learn, and the retrieval check says so."""
    monkeypatch.setattr(TinyResNet, "forward", lambda self, x: torchvision.models.ResNet.forward(self, x).detach())
    check = run_learning_check("simclr", mini_shards, tmp_path / "simclr", *RUNS["simclr"])
    assert check.loss_falls and check.spread and not check.learned, str(check)
