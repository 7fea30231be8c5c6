"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction (Zbontar et al. 2021).
recipes/barlow_twins.toml.

    z = g(f(v))     encoder f, projector g ([head]): Linear-BN-ReLU x 2, then Linear(no bias),
                    8192 wide on ImageNet
    C = standardise(z1)^T standardise(z2) / N      each dimension standardised over the GLOBAL
                    batch of N images, C summed over the processes (`cross_correlation`)
    loss = scale * ( sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2 )       (paper eq. 1)

The invariance term pulls the two views' embeddings to correlation 1 per dimension, the
redundancy term decorrelates the dimensions. Each view goes through the networks as its own
batch, as in the official code. LARS with 1-D parameters (biases, BN) excluded from weight decay
and adaptation, at `optim.bias_lr_scale` x the weights' lr (0.0048 / 0.2).

Deviations: the official code all-reduces C with torch.distributed.all_reduce, which carries no
gradient across processes, so under DDP its gradient is 1/world_size of the global batch's; here
the sums are all-reduced with gradient, so N images on W processes train as on one; the
standardisation is computed in the loss instead of a BatchNorm1d module (same numbers, no
running statistics, which the code never uses); `loss.scale` (default 1) is solo-learn's
`scale_loss`, used by the small variant; cross-replica BN is `method.sync_bn`.
"""

from __future__ import annotations

import torch

from sslctl.losses.noncontrastive import barlow_twins_terms, cross_correlation
from sslctl.methods.base import Method, expect
from sslctl.siamese import embedding_std, encoder_and_projector


class BarlowTwins(Method):
    defaults = {"method": {"sync_bn": False}}

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        expect(cfg, "loss", "name", ("barlow_twins",))
        self.lambd, self.scale = float(cfg["loss"]["lambd"]), float(cfg["loss"]["scale"])
        self.backbone, self.projector = encoder_and_projector(cfg)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        invariance, redundancy = barlow_twins_terms(cross_correlation(z1, z2))
        loss = self.scale * (invariance + self.lambd * redundancy)
        return {"loss": loss, "invariance": invariance.detach(), "redundancy": redundancy.detach(),
                "z_std": embedding_std(z1)}


METHOD = BarlowTwins
