"""Parts shared by the two-branch methods (MoCo, AdCo, BYOL): the momentum copy and its EMA,
shuffle-BN for the key encoder (docs/spec/methods.md §0.6), SplitBatchNorm, and the collapse signal.

Kept out of sslctl/methods/ because every module there is a method (methods.available())."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sslctl import distributed as dist
from sslctl.losses.similarity import cosine


def momentum_copy(module: nn.Module) -> nn.Module:
    """An identical copy that only moves by EMA: initialised by copying, requires_grad False."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], momentum: float) -> None:
    """xi <- m * xi + (1 - m) * theta for parameters only: the target's BN running statistics
    come from its own forward passes (MoCo builder.py, BYOL's state handling)."""
    target, online = list(target), list(online)
    assert len(target) == len(online), "momentum pair with different parameter lists"
    torch._foreach_lerp_(target, online, 1.0 - momentum)


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from `num_splits` sub-batches (the MoCo CIFAR
    colab's emulation of per-GPU BN in one process, so shuffle-BN has something to shuffle).

    Sub-batch s is the s-th contiguous block of the batch, as rank s would hold it with
    `num_splits` processes. (The colab interleaves samples through a (N/s, sC, H, W) reshape;
    with a random batch order the two are the same in distribution, and a block of a
    channels_last batch stays channels_last, where the reshape copies every activation twice:
    -14% images/s for MoCo v2 on the CPU, docs/train.md.) Running statistics are the mean over
    sub-batches; evaluation is plain BN. The state_dict keys are BatchNorm2d's, so exported
    encoders stay loadable into torchvision models."""

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        s = self.num_splits
        if x.shape[0] % s:
            raise ValueError(f"SplitBatchNorm: batch {x.shape[0]} is not divisible by bn_splits {s}")
        # momentum 1 makes batch_norm write each block's own mean / unbiased variance into its row
        means, variances = self.running_mean.new_zeros(s, self.num_features), self.running_var.new_ones(s, self.num_features)
        out = torch.cat([
            F.batch_norm(block, means[i], variances[i], self.weight, self.bias, True, 1.0, self.eps)
            for i, block in enumerate(x.chunk(s))
        ])
        with torch.no_grad():
            self.running_mean.lerp_(means.mean(0), self.momentum)
            self.running_var.lerp_(variances.mean(0), self.momentum)
            self.num_batches_tracked.add_(1)
        return out


def use_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by a SplitBatchNorm holding the same
    parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            use_split_bn(child, num_splits)
    return module


@torch.no_grad()
def shuffled_keys(encoder: nn.Module, x: torch.Tensor, shuffle: bool = True, similarity=cosine) -> torch.Tensor:
    """Key features with shuffle-BN (docs/spec/methods.md §0.6), made into `similarity`'s form
    (L2-normalised), for the WHOLE global batch in rank order (N x D), so callers need no second gather.

    Several processes: gather the images, draw a permutation on rank 0 and broadcast it, encode
    this rank's slice of the permuted batch, gather and undo the permutation. One process: shuffle
    within the batch (meaningful with SplitBatchNorm in the encoder)."""
    if not shuffle:
        return dist.gather_no_grad(similarity(encoder(x)))
    x_all = dist.gather_no_grad(x)
    perm = dist.broadcast(torch.randperm(x_all.shape[0], device=x.device))
    mine = perm.view(dist.world_size(), -1)[dist.rank()]
    k = dist.gather_no_grad(similarity(encoder(x_all[mine])))
    return k[torch.argsort(perm)]


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse signal: the per-dimension std of the L2-normalised embeddings across the batch,
    averaged over dimensions. Healthy ~ 1/sqrt(D) (0.0625 at D=256, 0.088 at D=128); collapse -> 0."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def use_sync_bn(module: nn.Module, enabled: bool) -> nn.Module:
    """BN statistics over the global batch (SimCLR's global BN, BYOL's cross-replica BN) when
    `enabled` and several processes run (nccl or gloo, dist.convert_sync_batchnorm).
    Parameters are kept (same objects)."""
    return dist.convert_sync_batchnorm(module) if enabled else module
