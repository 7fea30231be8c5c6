"""CPC v2: Contrastive Predictive Coding (Hénaff et al. 2019/2020), as ported in lightning-bolts.
docs/spec/methods.md §7; recipes/cpc_v2.toml.

The five parts (Falcon & Cho):
  1. augmentation: ONE view per image ([augment] views = 1): flip, translate or crop, jitter, gray.
  2. encoder: the image cut into a 7x7 grid of overlapping patches, each encoded by a LayerNorm
     ResNet, giving Z: B x c x 7 x 7 (`cpc_resnet`, sslctl/nets/cpc.py, `forward_grid`).
  3. representation extraction: a masked (autoregressive) context network over Z, so the context
     at row r has seen rows <= r only; predictions = 0.1 * 1x1 conv of the context, targets =
     1x1 conv of Z, both `target_dim` (64) channels ([head]).
  4. similarity: dot product of a prediction with a target.
  5. loss: for each row offset j in [loss] offsets, the prediction at (r, c) must pick out the
     target at (r + j, c) of the same image among all B*7*7 targets (`losses.local.cpc_nce`),
     weighted by offset_weights (bolts' loop counts offset j (j - 1) times; offsets from 2 on).
Nothing happens outside backprop. `global_negatives` gathers the targets over ranks with
gradient (bolts uses the local patches only, the default).
"""

from __future__ import annotations

import torch
from torch import nn

from sslctl import distributed as dist
from sslctl.errors import UserError
from sslctl.losses.local import cpc_nce
from sslctl.methods.base import Method, expect, similarity_of
from sslctl.encoders import build_encoder
from sslctl.nets.cpc import MaskedContext
from sslctl.siamese import embedding_std


class CPC(Method):
    n_views = 1

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        head, method, loss = cfg["head"], cfg["method"], cfg["loss"]
        expect(cfg, "loss", "name", ("info_nce",))
        self.similarity = similarity_of(cfg, ("dot",))
        self.offsets = [int(j) for j in loss["offsets"]]
        self.offset_weights = [float(w) for w in loss["offset_weights"]]
        if len(self.offsets) != len(self.offset_weights) or not self.offsets:
            raise UserError(
                f"recipe loss.offsets {self.offsets} and loss.offset_weights {self.offset_weights} "
                "must be non-empty lists of the same length (one weight per row offset)"
            )
        self.global_negatives = bool(method["global_negatives"])
        self.pred_scale = float(head["pred_scale"])
        self.backbone = build_encoder(cfg["encoder"])
        if not hasattr(self.backbone, "forward_grid"):
            raise UserError(
                f"recipe encoder.name = {cfg['encoder']['name']!r}: CPC needs a patch-grid encoder "
                "(one with forward_grid), e.g. encoder.name = \"cpc_resnet\""
            )
        c, dim = self.backbone.feature_dim, int(head["target_dim"])
        self.context = MaskedContext(c, int(head["context_hidden"]), int(head["context_blocks"]))
        self.target = nn.Conv2d(c, dim, 1)
        self.predict = nn.Conv2d(c, dim, 1)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        (x,) = views
        z = self.backbone.forward_grid(x)  # B x c x 7 x 7
        targets = self.similarity(self.target(z))
        preds = self.similarity(self.predict(self.context(z))) * self.pred_scale
        first = 0
        if self.global_negatives:
            first = dist.rank() * targets.shape[0]
            targets = dist.gather_with_grad(targets)
        loss = cpc_nce(preds, targets, self.offsets, self.offset_weights, first=first)
        # collapse signal on the per-patch targets (Z itself is post-ReLU, all-positive, so its
        # normalised rows look alike even when healthy)
        patch_targets = targets[first : first + z.shape[0]].permute(0, 2, 3, 1).flatten(0, 2)
        return {"loss": loss, "z_std": embedding_std(patch_targets)}


METHOD = CPC
