"""Linear probes (docs/spec/protocols.md E2 and E3).

E2, `linear_probe` (precomputed features): standardise with the train split's mean and std,
fit multinomial logistic regression (one linear layer, cross-entropy + wd/2 |W|^2, bias not
decayed) with full-batch L-BFGS (at most 100 iterations, or until converged). The problem is
convex, so the step size is the line search's business (strong Wolfe, initial step lr = 1): only
the weight decay is chosen, on a stratified held-out 10% of train, strongest first, each fit
warm-started from the previous one; then the probe is refit on all of train with that value
(warm-started from its held-out fit) and the eval split is scored once, at the end.

E3, `augmented_probe` (frozen encoder, augmentation on the fly): MoCo's protocol — backbone in
eval mode and frozen, a linear layer initialised N(0, 0.01), SGD momentum 0.9, lr 30, wd 0,
100 epochs with x0.1 at 60% and 80%, batch 256, RandomResizedCrop + flip (small images:
random crop 32 with padding 4 + flip), evaluation resize + center crop. The backbone's weights
are checked unchanged after training.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslctl import console
from sslctl.errors import RunError, UserError
from sslctl.evaluate.splits import pick_eval_split

WD_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # strongest first: ties go to the simpler model
E2_ITERS = 100


def protocol_precomputed(iters: int) -> str:
    return f"linear/precomputed/standardized/lbfgs/iters={iters}/wd-grid-on-10%-train"


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor standardised with the train rows' per-dimension mean and std."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): `fraction` of each class held out (at least one row of
    every class that has two or more), chosen by a seeded shuffle."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        n_held = max(1, round(fraction * len(rows))) if len(rows) >= 2 else 0
        held.append(rows[:n_held])
        fit.append(rows[n_held:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float, iters: int = E2_ITERS, lr: float = 1.0,
    init: nn.Linear | None = None,
) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS from zero weights (or from `init`,
    a warm start), for at most `iters` iterations; it stops earlier once the largest gradient
    entry is below 1e-5 (converged well past what the accuracy can see)."""
    layer = nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        layer.weight.copy_(init.weight if init is not None else torch.zeros_like(layer.weight))
        layer.bias.copy_(init.bias if init is not None else torch.zeros_like(layer.bias))
    opt = torch.optim.LBFGS(layer.parameters(), lr=lr, max_iter=iters, history_size=20,
                            tolerance_grad=1e-5, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + 0.5 * wd * layer.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    if not torch.isfinite(layer.weight).all():
        raise RunError(f"the linear probe diverged (non-finite weights at wd={wd}); check the features for NaN/inf")
    return layer


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-5) in percent."""
    best = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = best == labels[:, None]
    n = len(labels)
    return 100.0 * int(hits[:, 0].sum()) / n, 100.0 * int(hits.any(dim=1).sum()) / n


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor,
    *,
    num_classes: int | None = None,
    wds: Sequence[float] = WD_GRID,
    iters: int = E2_ITERS,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """E2 on precomputed features (on their device). Returns protocol, top1, top5, lr, wd,
    epochs (= L-BFGS iterations), the held-out accuracy of every wd, n_train, n_eval."""
    if train_x.shape[1] != eval_x.shape[1]:
        raise UserError(f"train features have {train_x.shape[1]} dimensions, eval features {eval_x.shape[1]}")
    num_classes = num_classes or int(max(train_y.max(), eval_y.max())) + 1
    train_x, eval_x = train_x.float(), eval_x.float()
    train_y, eval_y = train_y.to(train_x.device, torch.int64), eval_y.to(eval_x.device, torch.int64)

    fit, held = stratified_holdout(train_y.cpu(), val_fraction, seed)
    fit, held = fit.to(train_x.device), held.to(train_x.device)
    fit_x, held_x = standardize(train_x[fit], train_x[held])
    grid, fits, previous = {}, {}, None
    for wd in wds:  # strongest decay first, each fit warm-started from the last (a regularisation path)
        fits[wd] = previous = fit_logistic(fit_x, train_y[fit], num_classes, wd, iters, init=previous)
        with torch.no_grad():
            grid[wd] = accuracy(previous(held_x), train_y[held])[0]
        console.log(f"linear: wd={wd:g} held-out top-1 {grid[wd]:.2f}")
    best_wd = max(grid, key=lambda w: (grid[w], -list(wds).index(w)))  # first of the best in grid order

    all_x, eval_x = standardize(train_x, eval_x)
    layer = fit_logistic(all_x, train_y, num_classes, best_wd, iters, init=fits[best_wd])
    with torch.no_grad():
        top1, top5 = accuracy(layer(eval_x), eval_y)
    return {
        "protocol": protocol_precomputed(iters),
        "top1": top1,
        "top5": top5,
        "lr": 1.0,
        "wd": best_wd,
        "epochs": iters,
        "heldout_top1": {f"{w:g}": a for w, a in grid.items()},
        "n_train": int(train_x.shape[0]),
        "n_eval": int(eval_x.shape[0]),
    }


# ------------------------------------------------------------------------------------- E3


def augmented_transforms(input_size: int, mean, std):
    """(train transform, eval transform) per E3; small-image variant up to 64 px."""
    from torchvision.transforms import InterpolationMode, v2

    from sslctl.augment import eval_transform, to_rgb

    if input_size <= 64:  # CIFAR-style: resize to the input size, then crop with padding 4 + flip
        ops = [v2.Resize(input_size, antialias=True), v2.CenterCrop(input_size), v2.RandomCrop(input_size, padding=4)]
    else:
        ops = [v2.RandomResizedCrop(input_size, interpolation=InterpolationMode.BILINEAR, antialias=True)]
    pipeline = v2.Compose([*ops, v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    return (lambda x: pipeline(to_rgb(x))), eval_transform(input_size, mean, std)


def augmented_probe(
    encoder: str,
    shards: str,
    *,
    train_split: str = "train",
    eval_split: str | None = None,
    lr: float = 30.0,
    epochs: int = 100,
    batch_size: int = 256,
    device: str = "auto",
    workers: int | None = None,
    bf16: bool | None = None,
    seed: int = 0,
) -> dict:
    """E3: train a linear layer on the frozen encoder with augmentation; score eval_split (None:
    test, else val) once."""
    from sslctl.data import make_loader, open_dataset, split_shards
    from sslctl.embed import embed_shards, open_encoder, resolve_normalization
    from sslctl.devices import default_amp, resolve_device

    manifest = open_dataset(shards)  # sslctl shards, or any WebDataset with train and eval splits (indexed in memory)
    if not manifest.get("labelled"):
        raise UserError(f"{manifest['path']}: the shards have no labels; a linear probe needs labelled shards")
    eval_split = pick_eval_split(eval_split, list(manifest["splits"]), manifest["path"], holder="shards")
    console.log(f"linear (augment): trained on split {train_split}, scored on split {eval_split}")
    eval_tars = split_shards(manifest, eval_split)
    split_shards(manifest, train_split)  # UserError naming the manifest when missing
    enc = open_encoder(encoder)
    mean, std, _ = resolve_normalization("auto", enc, manifest)
    dev = resolve_device(device)
    bf16 = default_amp(dev) if bf16 is None else bf16
    backbone = enc.model.to(dev).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    num_classes = len(manifest.get("classes") or [])
    if not num_classes:
        raise UserError(f"{manifest['path']}: no class names in the manifest; a linear probe needs labelled shards")

    torch.manual_seed(seed)
    train_tf, eval_tf = augmented_transforms(enc.input_size, mean, std)
    loader = make_loader(manifest, train_split, batch_size=batch_size, transform=train_tf, workers=workers, seed=seed,
                         shuffle=True, drop_last=False, rgb=True, pin_memory=dev.type == "cuda")
    head = nn.Linear(backbone.feature_dim, num_classes).to(dev)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    milestones = [math.ceil(0.6 * epochs), math.ceil(0.8 * epochs)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            return backbone(x.to(dev, non_blocking=True)).float()

    for epoch in range(epochs):
        loader.set_epoch(epoch)
        total, n = 0.0, 0
        for images, labels in loader:
            h = features(images).clone()  # leave inference mode: the head needs autograd
            loss = F.cross_entropy(head(h), labels.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(labels), n + len(labels)
        console.log(f"linear (augment): epoch {epoch + 1}/{epochs} loss {total / max(n, 1):.4f} lr {opt.param_groups[0]['lr']:g}")
        sched.step()

    for key, value in backbone.state_dict().items():  # E3: the frozen backbone must not move
        if not torch.equal(value, before[key]):
            raise RunError(f"the backbone's {key} changed during the linear probe; it must stay frozen")
    logits, labels = [], []
    for _, feats, labs in embed_shards(backbone, eval_tars, transform=eval_tf, batch_size=batch_size, device=dev,
                                       bf16=bf16, channels_last=False, workers=workers or 0):
        with torch.no_grad():
            logits.append(head(feats.to(dev)).cpu())
        labels.append(labs)
    top1, top5 = accuracy(torch.cat(logits), torch.cat(labels))
    return {
        "protocol": f"linear/augment/{'crop32-pad4' if enc.input_size <= 64 else 'rrc'}+flip/sgd-lr={lr:g}/epochs={epochs}",
        "top1": top1,
        "top5": top5,
        "lr": lr,
        "wd": 0.0,
        "epochs": epochs,
        "n_train": len(loader.dataset),
        "n_eval": int(torch.cat(labels).numel()),
        "train_split": train_split,
        "eval_split": eval_split,
    }
