"""SwAV: Swapping Assignments between Views (Caron et al. 2020). Numbers: docs/spec/methods.md §4.

The five parts:
  1. augmentation: multi-crop, 2 large crops (views 0, 1) + `extra_crops` small ones ([augment]).
  2. encoder: any backbone; crops of one resolution go through it as one batch.
  3. representation: projector MLP -> L2-normalise -> prototypes C (Linear, no bias, K rows).
  4. similarity: scores s = C z̄ (cosine, as both z̄ and the rows of C are unit vectors).
  5. loss: swapped prediction at temperature τ: every other crop predicts the Sinkhorn code
     (ε, 3 iterations, all-reduced sums) of each crop in `crops_for_assign`.
Outside backprop: prototypes renormalised before every forward; their gradient dropped for the
first `freeze_prototypes_epochs`; from `queue_start_epoch` a per-rank queue of past embeddings
(z̄, not scores) per assigned crop, prepended to the Sinkhorn input once full.
"""

from __future__ import annotations

from itertools import groupby

import torch
import torch.nn.functional as F
from torch import nn

from sslctl import console, heads
from sslctl.distributed import world_size
from sslctl.encoders import build_encoder
from sslctl.losses.clustering import sinkhorn, swapped_prediction
from sslctl.losses.contrastive import fp32
from sslctl.methods.base import Method, Progress, expect, similarity_of
from sslctl.siamese import embedding_std, use_sync_bn


class SwAV(Method):
    defaults = {"method": {"sync_bn": False}}

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        aug, head, method = cfg["augment"], cfg["head"], cfg["method"]
        expect(cfg, "loss", "name", ("swapped_prediction",))
        self.similarity = similarity_of(cfg, ("cosine",))
        self.backbone = build_encoder(cfg["encoder"])
        self.projector = heads.from_config(self.backbone.feature_dim, head)
        sync = bool(method["sync_bn"])  # SwAV syncs BN over the global batch (§4f)
        self.backbone, self.projector = use_sync_bn(self.backbone, sync), use_sync_bn(self.projector, sync)
        dim = int(head["projector_dim"])
        self.prototypes = nn.Linear(dim, int(head["prototypes"]), bias=False)
        self.n_views = int(aug.get("views", 2)) + int(aug.get("extra_crops", 0))
        self.crops_for_assign = [int(a) for a in method["crops_for_assign"]]
        self.temperature = float(cfg["loss"]["temperature"])
        self.epsilon = float(method["epsilon"])
        self.sinkhorn_iters = int(method["sinkhorn_iters"])
        self.freeze_prototypes_epochs = float(method["freeze_prototypes_epochs"])
        self.queue_start_epoch = int(method["queue_start_epoch"])
        # The queue must hold whole global batches (official: length -= length % (B * W)).
        length = int(method["queue_size"])
        length -= length % int(cfg["optim"]["batch_size"])
        self.register_buffer("queue", torch.zeros(len(self.crops_for_assign), length // world_size(), dim))
        self._queue_on = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of another number of processes holds queue shards of another length:
        # start with an empty queue (it is used again once refilled) rather than fail the resume.
        key = prefix + "queue"
        if key in state_dict and state_dict[key].shape != self.queue.shape:
            console.warn(f"the SwAV queue was saved as {tuple(state_dict[key].shape)} per process, this run needs "
                         f"{tuple(self.queue.shape)} (another number of processes): it starts empty")
            state_dict[key] = torch.zeros_like(self.queue)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def before_forward(self, progress: Progress) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        self._queue_on = self.queue.shape[1] > 0 and progress.epoch >= self.queue_start_epoch

    def before_optimizer_step(self, progress: Progress) -> None:
        # Frozen prototypes in the first epoch(s) keep them from chasing an untrained encoder.
        if progress.step < round(self.freeze_prototypes_epochs * progress.steps_per_epoch):
            self.prototypes.weight.grad = None

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        bs = views[0].shape[0]
        # One backbone pass per resolution (the 2 large crops together, then the small ones).
        h = torch.cat([self.backbone(torch.cat(list(same))) for _, same in groupby(views, key=lambda v: v.shape[-2:])])
        p = self.projector(h)
        # Scores and codes in fp32: at temperature 0.1, bf16's rounding of s in [-1, 1] would move logits by ~0.05.
        with fp32(h.device):
            z = self.similarity(p.float())
            scores = self.prototypes(z).split(bs)
            codes = {a: self._codes(i, z[a * bs : (a + 1) * bs].detach(), scores[a].detach())
                     for i, a in enumerate(self.crops_for_assign)}
        loss = swapped_prediction(list(scores), codes, self.temperature)
        return {"loss": loss, "z_std": embedding_std(z[:bs])}

    @torch.no_grad()
    def _codes(self, i: int, z: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Sinkhorn codes of one assigned crop's batch, with queue `i` in front once it is full."""
        if self._queue_on:
            queue, bs = self.queue[i], z.shape[0]
            if queue[-1].any():  # full: the zero-initialised last row has been reached
                scores = torch.cat([queue @ self.prototypes.weight.t(), scores])
            queue[bs:] = queue[:-bs].clone()  # shift down, newest embeddings on top
            queue[:bs] = z
        return sinkhorn(scores, self.epsilon, self.sinkhorn_iters)[-z.shape[0] :]


METHOD = SwAV
