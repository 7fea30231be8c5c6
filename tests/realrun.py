"""Shared helpers for the short real-run tests (every method's "it learns, it does not collapse").

A learning check (`learning_check`) pretrains a recipe's small variant on the embedded
Fashion-MNIST shards through the real engine, with a tiny ResNet (`TinyResNet`, torchvision's
ResNet class at a quarter of ResNet-18's width and half its depth) so a check costs tens of CPU
seconds, not minutes. What it should have learned is checked on held-out (test) images: two
augmented views of the same image retrieve each other (top-1 among all the views of n images)
more often than with the encoder at initialisation. kNN accuracy is no use at this length: a
random ResNet-18 already reaches ~83% on Fashion-MNIST.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from sslctl.augment import build_views, normalization
from sslctl.data import iter_shard, load_manifest, split_shards
from sslctl.encoder_io import load_encoder


class TinyResNet(torchvision.models.ResNet):
    """torchvision's ResNet with one BasicBlock per stage at widths 16-32-64-128 (ResNet-18: two
    per stage at 64-512) and the small stem (3x3 stride-1 conv, no max-pool): 0.44M parameters,
    ~1/19 of ResNet-18's step time at 28 px on one CPU thread. A recipe selects it by its import
    path (`encoder.name=tests.realrun:TinyResNet`, TINY_RESNET), in this process or in a CLI run
    started from the repository root, and its encoder.safetensors loads back (`load_encoder`)
    like any custom net's."""

    def __init__(self, width: int = 16, blocks: int = 1):
        super().__init__(BasicBlock, [blocks] * 4)
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1, self.maxpool = nn.BatchNorm2d(width), nn.Identity()
        for i in range(4):
            setattr(self, f"layer{i + 1}", self._make_layer(BasicBlock, width * 2**i, blocks, stride=2 if i else 1))
        self.fc = nn.Identity()
        self.feature_dim = 8 * width
        for m in self.modules():  # torchvision's ResNet initialisation, for the layers rebuilt above
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


TINY_RESNET = f"{__name__}:TinyResNet"

# What every learning check changes in a method's small recipe (the 2-core CPU's budget): the
# tiny ResNet, batch 16 at the lr given for it (scaling none), one epoch's schedule (312 steps
# of the 5,000 training images) without warmup, 28-px crops of scale 0.2-1 (8%-crops of a 28-px
# image hold too little to learn from in a few hundred steps).
CHEAP = [
    f"encoder.name={TINY_RESNET}",
    "optim.batch_size=16",
    "optim.scaling=none",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0",
    "augment.crop_size=28",
    "augment.crop_scale=[0.2, 1.0]",
]


@lru_cache(maxsize=32)
def _views(shards: str, augment: str, n: int, seed: int) -> tuple[torch.Tensor, int]:
    manifest = load_manifest(Path(shards))
    aug = json.loads(augment)
    make_views = build_views(aug, *normalization(aug, manifest))
    torch.manual_seed(seed)
    pairs = []
    for _, image, _ in islice(iter_shard(split_shards(manifest, "test")[0], rgb=True), n):
        views = make_views(image)
        pairs.append(views[:2] if len(views) >= 2 else [views[0], make_views(image)[0]])
    x = torch.stack([p[0] for p in pairs] + [p[1] for p in pairs]).contiguous(memory_format=torch.channels_last)
    return x, len(pairs)


@torch.no_grad()
def view_retrieval(backbone: torch.nn.Module, shards: Path, cfg: dict, n: int = 256, seed: int = 0) -> float:
    """Fraction of the 2n views of n test images whose nearest other view (cosine of pooled
    features, eval mode) is the other view of the same image. The recipe's own augmentation,
    drawn with a fixed seed (and kept for the session), so two encoders are compared on the same
    views. A one-view recipe (CPC) draws its view twice."""
    x, pairs = _views(str(shards), json.dumps(cfg["augment"], sort_keys=True), n, seed)
    # fp32 (at initialisation the views' features differ by less than bf16 resolves), in
    # channels_last on a copy: 1.3x faster on the CPU, the same retrievals
    net = copy.deepcopy(backbone).eval().to(memory_format=torch.channels_last)
    f = F.normalize(torch.cat([net(chunk) for chunk in x.split(256)]).float(), dim=1)
    sims = f @ f.T
    sims.fill_diagonal_(-2.0)
    partner = torch.cat([torch.arange(pairs) + pairs, torch.arange(pairs)])
    return sims.argmax(dim=1).eq(partner).float().mean().item()


def retrieval_draws(backbone: torch.nn.Module, shards: Path, cfg: dict, draws: int = 4) -> list[float]:
    """`view_retrieval` over several independent draws of the views: one draw of 256 images
    varies by a few points (4-8% at initialisation), more than a short run gains on it."""
    return [view_retrieval(backbone, shards, cfg, seed=seed) for seed in range(draws)]


def learned(at_init: list[float], trained: list[float], factor: float = 1.25) -> bool:
    """The trained encoder wins on (nearly) every draw and by `factor` on their sum."""
    wins = sum(t > i for t, i in zip(trained, at_init))
    return wins >= len(at_init) - 1 and sum(trained) > factor * sum(at_init)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def trained_backbone(run: Path) -> torch.nn.Module:
    return load_encoder(run / "encoder.safetensors")[0]


def short_run(shards: Path, cfg: dict, out: Path, steps: int, seed: int = 0) -> tuple[list[dict], list[float], list[float]]:
    """Pretrain `steps` steps of the resolved recipe `cfg` through the real engine (CPU); its
    metrics rows and the held-out view retrieval (4 draws) at initialisation and after."""
    from sslctl.methods import build_method
    from sslctl.train import pretrain

    torch.manual_seed(seed)  # the engine's initialisation for this seed
    at_init = retrieval_draws(build_method(cfg).backbone, shards, cfg)
    # no loader process: the same batches (the order is a function of the seed), 15% less CPU
    # than one worker (the views' pickling); the loader's workers are tested on their own
    run = pretrain(shards, cfg, out, device="cpu", seed=seed, workers=0, max_steps=steps, log_every=10)
    return metrics(run), at_init, retrieval_draws(trained_backbone(run), shards, cfg)


@dataclass
class LearningCheck:
    """What a short run gave: its metrics rows with a loss, the held-out view retrieval (4 draws)
    at initialisation and after, and the collapse floor of its embedding std."""

    recipe: str
    steps: int
    rows: list[dict]
    at_init: list[float]
    trained: list[float]
    z_floor: float

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows]

    @property
    def loss_falls(self) -> bool:
        """The mean of the last 3 logged windows is 3% below the peak of the first two thirds (in
        absolute terms: SimSiam's loss is negative, -1 is perfect agreement)."""
        losses = self.losses
        peak = max(losses[: 2 * len(losses) // 3])
        return sum(losses[-3:]) / 3 < peak - 0.03 * abs(peak)

    @property
    def spread(self) -> bool:
        return self.rows[-1]["z_std"] > self.z_floor

    @property
    def learned(self) -> bool:
        return learned(self.at_init, self.trained)

    def __str__(self) -> str:
        init, trained = sum(self.at_init) / 4, sum(self.trained) / 4
        return (f"{self.recipe}: loss {self.losses[0]:.3f} first, {max(self.losses[: 2 * len(self.losses) // 3]):.3f} "
                f"peak, {sum(self.losses[-3:]) / 3:.3f} last; z_std {self.rows[-1]['z_std']:.4f} (floor {self.z_floor:.4f}); "
                f"view retrieval {init:.3f} at init -> {trained:.3f}, x{trained / init:.2f} ({self.at_init} -> {self.trained})")


def run_learning_check(recipe: str, shards: Path, out: Path, *overrides: str, steps: int = 300, seed: int = 0,
                       z_floor: float = 0.25) -> LearningCheck:
    """`learning_check`'s run, without its asserts."""
    from sslctl.recipes import load_recipe

    cfg = load_recipe(recipe, variant="small", overrides=[*CHEAP, *overrides])
    rows, at_init, trained = short_run(shards, cfg, out, steps, seed)
    rows = [r for r in rows if "loss" in r]  # a window every 10 steps and at each epoch's end
    check = LearningCheck(recipe, steps, rows, at_init, trained, z_floor / math.sqrt(int(cfg["head"]["projector_dim"])))
    print(check)
    return check


def learning_check(recipe: str, shards: Path, out: Path, *overrides: str, steps: int = 300, seed: int = 0,
                   z_floor: float = 0.25) -> LearningCheck:
    """The cheap learning check of one method: `recipe`'s small variant with CHEAP and then
    `overrides` (the method's own lr, queue, epochs, ...), `steps` steps of 16 on `shards` (the
    embedded 5,000 training images: `mini_shards`), seed `seed`. Asserts that

    1. the run took its `steps` steps and the loss falls: the mean of the last 3 logged windows
       (10 steps each) is 3% below the peak of the first two thirds (MoCo's and AdCo's loss first
       RISES while the queue / bank fills with real keys instead of random vectors, so "early" is
       a peak, not the first window);
    2. the embeddings do not collapse: the last logged per-dimension std of the normalised
       embedding is above `z_floor` / sqrt(dim) (healthy ~ 1/sqrt(dim), collapse -> 0);
    3. the encoder learned: views of 256 held-out test images retrieve each other better than at
       initialisation on 3 of 4 draws and by 1.25x on their sum (`learned`).

    Returns the LearningCheck for the method's own asserts. Cost: ~0.1 CPU-s per step of 16 on
    one thread plus ~5 CPU-s of retrieval (docs/testing.md has each method's figure)."""
    check = run_learning_check(recipe, shards, out, *overrides, steps=steps, seed=seed, z_floor=z_floor)
    assert check.rows[-1]["step"] == steps, check.rows[-1]
    assert check.loss_falls, check.losses
    assert check.spread, check.rows[-1]
    assert check.learned, (check.at_init, check.trained)
    return check
