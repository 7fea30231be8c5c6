"""A short real run of MoCo v3 with a ViT (slow), checked as the founding methods'
(tests/realrun.py `learning_check`): the loss falls, the embeddings do not collapse, and two
augmented views of a held-out image find each other more often than at initialisation (3 of 4
draws and 1.25x on their sum). The VIT settings below replace realrun.CHEAP's tiny ResNet, batch
and crop size.

The model is timm's ViT-Tiny cut to 2 blocks of width 96 (3 heads) on 16-px crops with 4-px
patches (16 tokens), so that a run, the 2 x 4 retrieval draws included, stays near 40 CPU-seconds
on one thread: 156 steps of 32 images (one epoch of the 5,000 embedded training images), AdamW
at lr 1e-3 without warm-up, cosine to 0 over that epoch, heads narrowed to 256 hidden units and
64 outputs; stop_grad_conv1 and the sin-cos position embedding on, as the ViT recipe.
"""

from __future__ import annotations

import pytest

from tests.realrun import learning_check

pytestmark = pytest.mark.slow

STEPS = 156
VIT = [
    "encoder.name=timm:vit_tiny_patch16_224", "encoder.small_stem=false", "encoder.img_size=16", "encoder.patch_size=4",
    "encoder.depth=2", "encoder.embed_dim=96", "encoder.num_heads=3", "encoder.drop_path_rate=0.0",
    "augment.crop_size=16", "augment.crop_scale=[0.2, 1.0]",
    "optim.batch_size=32", "optim.scaling=none", "optim.name=adamw", "optim.lr=0.001",
    "schedule.epochs=1", "schedule.warmup_epochs=0",
]
RUNS = {
    "mocov3": [
        "optim.weight_decay=0.1", "optim.exclude_bn_bias=false", "method.stop_grad_conv1=true", "method.sincos_pos_embed=true",
        "head.projector_hidden=[256, 256]", "head.projector_dim=64", "head.predictor_hidden=[256]", "head.predictor_dim=64",
        "head.predictor_last_norm=true",
    ],
}


@pytest.mark.parametrize("recipe", list(RUNS))
def test_short_vit_run_learns_without_collapse(recipe, mini_shards, tmp_path, one_thread):
    pytest.importorskip("timm", reason="timm is not installed: pip install -e .[timm]")
    learning_check(recipe, mini_shards, tmp_path / recipe, *VIT, *RUNS[recipe], steps=STEPS)
