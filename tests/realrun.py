"""Shared helpers for the short real-run tests (every method's "it learns, it does not collapse").

A short run pretrains a recipe's small variant on the embedded Fashion-MNIST shards through the
real engine. What it should have learned is checked on held-out (test) images: two augmented
views of the same image retrieve each other (top-1 among all the views of n images) more often
than with the encoder at initialisation. kNN accuracy is no use at this length: a random
ResNet-18 already reaches ~83% on Fashion-MNIST.
"""

from __future__ import annotations

import copy
import json
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from sslctl.augment import build_views, normalization
from sslctl.data import iter_shard, load_manifest, split_shards
from sslctl.encoder_io import load_encoder


@torch.no_grad()
def view_retrieval(backbone: torch.nn.Module, shards: Path, cfg: dict, n: int = 256, seed: int = 0) -> float:
    """Fraction of the 2n views of n test images whose nearest other view (cosine of pooled
    features, eval mode) is the other view of the same image. The recipe's own augmentation,
    drawn with a fixed seed, so two encoders are compared on the same views. A one-view recipe
    (CPC) draws its view twice."""
    manifest = load_manifest(shards)
    make_views = build_views(cfg["augment"], *normalization(cfg["augment"], manifest))
    torch.manual_seed(seed)
    pairs = []
    for _, image, _ in islice(iter_shard(split_shards(manifest, "test")[0], rgb=True), n):
        views = make_views(image)
        pairs.append(views[:2] if len(views) >= 2 else [views[0], make_views(image)[0]])
    x = torch.stack([p[0] for p in pairs] + [p[1] for p in pairs]).contiguous(memory_format=torch.channels_last)
    # fp32 (at initialisation the views' features differ by less than bf16 resolves), in
    # channels_last on a copy: 1.3x faster on the CPU, the same retrievals
    net = copy.deepcopy(backbone).eval().to(memory_format=torch.channels_last)
    f = F.normalize(torch.cat([net(chunk) for chunk in x.split(256)]).float(), dim=1)
    sims = f @ f.T
    sims.fill_diagonal_(-2.0)
    partner = torch.cat([torch.arange(len(pairs)) + len(pairs), torch.arange(len(pairs))])
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


def short_run(shards: Path, cfg: dict, out: Path, steps: int) -> tuple[list[dict], list[float], list[float]]:
    """Pretrain `steps` steps of the resolved recipe `cfg` through the real engine (CPU, seed 0);
    its metrics rows and the held-out view retrieval (4 draws) at initialisation and after."""
    from sslctl.methods import build_method
    from sslctl.train import pretrain

    torch.manual_seed(0)  # the engine's initialisation for seed 0
    at_init = retrieval_draws(build_method(cfg).backbone, shards, cfg)
    run = pretrain(shards, cfg, out, device="cpu", seed=0, workers=1, max_steps=steps, log_every=10)
    return metrics(run), at_init, retrieval_draws(trained_backbone(run), shards, cfg)
