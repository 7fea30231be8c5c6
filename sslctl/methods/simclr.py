"""SimCLR (Chen et al. 2020; v2: Chen et al. 2020b). docs/spec/methods.md §2; recipes/simclr.toml.

    h = f(v1 ; v2)   both views in ONE backbone batch, so BN sees 2B images (as tf2/run.py);
                     method.fused_views = false: f(v1), f(v2), BN per view (as lightly's example)
    z = normalise(g(h))   g = [head] projector: SimCLR's ProjectionHead, Linear-BN-ReLU per
                          middle layer, last Linear without bias followed by BN without shift
    loss = NT-Xent(z1, z2, t) with the other 2N-1 views of the GLOBAL batch as candidates,
           gathered WITH gradient (docs/spec/methods.md §0.6), positive at global index rank*B + n.

The loss is the TF code's: the two directions summed, averaged over pairs (twice the paper's
1/(2N) form; irrelevant under LARS, which is scale-invariant). SimCLR v2 is only a recipe
change: `head.projector_hidden = [2048, 2048]` (3 layers), `augment.jitter_brightness =
"multiplicative"`; fine-tuning from the first head layer is an embed option, not training.

Deviations: the last BN has neither shift nor scale (heads.mlp's last_norm), where the TF code
keeps a scale; cross-replica BN (SyncBN) is `method.sync_bn`, used with several processes
(nn.SyncBatchNorm on CUDA, distributed.GlooSyncBatchNorm on the CPU); the online linear
classifier on stop_gradient(h) is left out (pretraining sees no labels; the kNN monitor plays
its role).
"""

from __future__ import annotations

import torch

from sslctl import distributed as dist
from sslctl.encoders import build_encoder
from sslctl.heads import from_config
from sslctl.losses.contrastive import nt_xent
from sslctl.methods.base import Method, expect, similarity_of
from sslctl.siamese import embedding_std, use_sync_bn


class SimCLR(Method):
    defaults = {"method": {"fused_views": True, "sync_bn": False}}

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        expect(cfg, "loss", "name", ("nt_xent",))
        self.similarity = similarity_of(cfg, ("cosine",))
        self.temperature = float(cfg["loss"]["temperature"])
        self.gather = bool(cfg["method"]["gather"])
        self.backbone = build_encoder(cfg["encoder"])
        self.projector = from_config(self.backbone.feature_dim, cfg["head"])
        self.fused_views = bool(cfg["method"]["fused_views"])
        sync = bool(cfg["method"]["sync_bn"])
        self.backbone, self.projector = use_sync_bn(self.backbone, sync), use_sync_bn(self.projector, sync)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x1, x2 = views
        if self.fused_views:
            z1, z2 = self.similarity(self.projector(self.backbone(torch.cat([x1, x2])))).chunk(2)
        else:
            z1, z2 = (self.similarity(self.projector(self.backbone(x))) for x in (x1, x2))
        if self.gather:
            loss = nt_xent(z1, z2, self.temperature, z1_all=dist.gather_with_grad(z1),
                           z2_all=dist.gather_with_grad(z2), rank=dist.rank())
        else:  # ablation: each process contrasts only its own 2B views
            loss = nt_xent(z1, z2, self.temperature)
        return {"loss": loss, "z_std": embedding_std(z1)}


METHOD = SimCLR
