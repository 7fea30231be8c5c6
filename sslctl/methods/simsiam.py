"""SimSiam: Exploring Simple Siamese Representation Learning (Chen & He 2021). recipes/simsiam.toml.

    z = g(f(v))     encoder f, projector g ([head] projector_*): 3 layers, BN after each, the last
                    one without affine parameters
    p = h(z)        predictor h ([head] predictor_*): the bottleneck Linear(D, D/4)-BN-ReLU-Linear
    loss = D(p1, z2) / 2 + D(p2, z1) / 2,   D(p, z) = -cos(p, stopgrad(z))   (Algorithm 1)

One network for both views, no momentum encoder, no negatives: the stop-gradient on z (inside
`negative_cosine`) is what prevents collapse. Each view goes through the networks as its own
batch, as in the official code (BN statistics per view). The optimiser is SGD; with
`method.fix_pred_lr` (the code's --fix-pred-lr) the predictor is a parameter group of its own at
the fixed peak lr, the rest follows the cosine schedule.

Deviations: cross-replica BN is `method.sync_bn` (the code converts every BN to SyncBN when
distributed); the projector's last Linear has no bias (the code keeps a frozen one, which the
BN right after it cancels); the hidden Linears' biases are dropped where BN follows, as in the
code; the recipes' `encoder.zero_init_residual` does what the code's zero_init_residual=True does.
"""

from __future__ import annotations

import torch

from sslctl.errors import UserError
from sslctl.heads import from_config
from sslctl.losses.noncontrastive import negative_cosine
from sslctl.methods.base import Method, expect
from sslctl.optim import ParamGroup
from sslctl.siamese import embedding_std, encoder_and_projector, use_sync_bn


class SimSiam(Method):
    defaults = {"method": {"sync_bn": False, "fix_pred_lr": False}}

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        expect(cfg, "loss", "name", ("negative_cosine",))
        expect(cfg, "loss", "similarity", ("cosine",))
        head = cfg["head"]
        if int(head["predictor_dim"]) != int(head["projector_dim"]):
            raise UserError(f"recipe head.predictor_dim = {head['predictor_dim']} must equal head.projector_dim = "
                            f"{head['projector_dim']}: SimSiam compares each view's prediction with the other's projection")
        self.backbone, self.projector = encoder_and_projector(cfg)
        self.predictor = use_sync_bn(from_config(int(head["projector_dim"]), head, "predictor"), bool(cfg["method"]["sync_bn"]))
        self.fix_pred_lr = bool(cfg["method"]["fix_pred_lr"])

    def param_groups(self) -> list[ParamGroup]:
        if not self.fix_pred_lr:
            return super().param_groups()
        return self.param_groups_apart(lambda name: name.startswith("predictor."), fixed_lr=True)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
        return {"loss": loss, "z_std": embedding_std(z1)}


METHOD = SimSiam
