"""VICReg: Variance-Invariance-Covariance Regularization (Bardes, Ponce & LeCun 2022).
recipes/vicreg.toml.

    z = g(f(v))     encoder f, expander g ([head]): Linear-BN-ReLU x 2, then Linear(no bias),
                    8192 wide on ImageNet
    Z1, Z2 = the GLOBAL batch's z1, z2, gathered with gradient (the code's FullGatherLayer)
    loss = lambda s(Z1, Z2) + mu [v(Z1) + v(Z2)] / 2 + nu [c(Z1) + c(Z2)]      (paper eq. 6)
           s: mean squared distance; v: hinge on each dimension's std at 1; c: squared
           off-diagonal covariances / D (`vicreg_terms`)

No negatives, no stop-gradient, no normalisation of z: the variance term keeps every dimension
spread, the covariance term decorrelates them. Each view goes through the networks as its own
batch, as in the official code. LARS with 1-D parameters excluded from weight decay and
adaptation.

Deviations: the invariance term is computed on the gathered batch (the code takes it on each
process's own rows; the mean over processes and the gradient are the same); cross-replica BN is
`method.sync_bn`; the expander's hidden Linears have no bias (BN follows each).
"""

from __future__ import annotations

import torch

from sslctl import distributed as dist
from sslctl.losses.noncontrastive import vicreg_terms
from sslctl.methods.base import Method, expect
from sslctl.siamese import embedding_std, encoder_and_projector


class VICReg(Method):
    defaults = {"method": {"sync_bn": False}}

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        expect(cfg, "loss", "name", ("vicreg",))
        loss = cfg["loss"]
        self.sim_coeff, self.std_coeff, self.cov_coeff = (float(loss[k]) for k in ("sim_coeff", "std_coeff", "cov_coeff"))
        self.backbone, self.projector = encoder_and_projector(cfg)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        invariance, variance, covariance = vicreg_terms(dist.gather_with_grad(z1), dist.gather_with_grad(z2))
        loss = self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance
        return {"loss": loss, "invariance": invariance.detach(), "variance": variance.detach(),
                "covariance": covariance.detach(), "z_std": embedding_std(z1)}


METHOD = VICReg
