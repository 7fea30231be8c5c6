"""BYOL: Bootstrap Your Own Latent (Grill et al. 2020). docs/spec/methods.md §3; recipes/byol.toml.

    online: p = r(g(f(v)))     encoder f, projector g, predictor r ([head] projector_*, predictor_*)
    target: z' = g'(f'(v))     a copy of f, g (requires_grad False), run in TRAIN mode under
                               no_grad, so its BN uses batch statistics like the online network's
    loss = (2 - 2 cos(p(v1), z'(v2))) + (2 - 2 cos(p(v2), z'(v1)))    both directions SUMMED
    after the optimizer step: xi <- tau xi + (1 - tau) theta, parameters only, with
    tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 at global step k of K (rising to 1).

Each view goes through the networks as its own batch, as in the official code (BN statistics
per view). The views differ by recipe: view 1 always blurred, view 2 blurred at p 0.1 and
solarized at p 0.2 ([augment.view1] / [augment.view2]).

Deviations: the target starts as a copy of the online network (the official code draws it with
another RNG key and notes it makes no difference); cross-replica BN is `method.sync_bn`, used with
several processes (CUDA or CPU); the online linear classifier is left out (no labels in pretraining).
"""

from __future__ import annotations

import torch
from torch import nn

from sslctl.encoders import build_encoder
from sslctl.heads import from_config
from sslctl.losses.contrastive import regression_loss
from sslctl.methods.base import Method, Progress, expect, similarity_of
from sslctl.optim import cosine_tau
from sslctl.siamese import embedding_std, ema_update, momentum_copy, use_sync_bn


class BYOL(Method):
    defaults = {"method": {"sync_bn": False}}

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        expect(cfg, "loss", "name", ("regression",))
        similarity_of(cfg, ("cosine",))  # regression_loss, 2 - 2 cos(p, z'), takes the cosine itself
        self.base_tau = float(cfg["method"]["base_tau"])
        self.backbone = build_encoder(cfg["encoder"])
        self.projector = from_config(self.backbone.feature_dim, cfg["head"], "projector")
        self.predictor = from_config(int(cfg["head"]["projector_dim"]), cfg["head"], "predictor")
        for name in ("backbone", "projector", "predictor"):
            setattr(self, name, use_sync_bn(getattr(self, name), bool(cfg["method"]["sync_bn"])))
        self.target = momentum_copy(nn.Sequential(self.backbone, self.projector))

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1, t2 = self.target(x1), self.target(x2)
        loss = regression_loss(p1, t2) + regression_loss(p2, t1)
        return {"loss": loss, "z_std": embedding_std(z1)}

    def after_optimizer_step(self, progress: Progress) -> None:
        tau = cosine_tau(self.base_tau, progress.step, progress.total_steps)
        ema_update(self.target.parameters(), self.online_parameters(), tau)


METHOD = BYOL
