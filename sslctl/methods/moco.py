"""MoCo v1 / v2 (He et al. 2019; Chen et al. 2020): a queue of negatives and a momentum key
encoder. docs/spec/methods.md §1; recipes/moco_v1.toml and moco_v2.toml (v1: linear head, t 0.07;
v2: MLP head, t 0.2, aug+, cosine lr). Follows facebookresearch/moco builder.py:

    q = normalise(f_q(v1))                                  # query encoder, with gradient
    xi <- m xi + (1-m) theta                                # momentum update BEFORE the keys
    k = normalise(f_k(v2)) under no_grad, with shuffle-BN   # key encoder
    loss = CE([q.k, q.Queue] / t, 0)                        # the queue as it was before this batch
    enqueue(all ranks' k); ptr <- (ptr + N) mod K

Shuffle-BN across processes follows §0.6; in one process the batch is shuffled and every
BatchNorm2d of both encoders computes its statistics over `bn_splits` sub-batches
(SplitBatchNorm, as in the MoCo CIFAR colab). The symmetric option (colab) sums both directions
and enqueues both key batches, so K must be divisible by 2N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslctl import distributed as dist
from sslctl.encoders import build_encoder
from sslctl.errors import UserError
from sslctl.heads import from_config
from sslctl.losses.contrastive import info_nce
from sslctl.methods.base import Method, expect, similarity_of
from sslctl.siamese import embedding_std, ema_update, momentum_copy, shuffled_keys, use_split_bn


class QueryKeyMethod(Method):
    """The parts MoCo and AdCo share: query encoder f_q (backbone + projector), its momentum copy
    f_k (the key encoder), the momentum update and shuffle-BN. Subclasses add the negatives."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        enc, method = cfg["encoder"], cfg["method"]
        self.similarity = similarity_of(cfg, ("cosine",))
        self.temperature = float(cfg["loss"]["temperature"])
        self.momentum = float(method["momentum"])
        self.symmetric = bool(method["symmetric"])
        self.shuffle_bn = bool(method["shuffle_bn"])

        self.backbone = build_encoder(enc)
        self.projector = from_config(self.backbone.feature_dim, cfg["head"])
        if self.shuffle_bn and dist.world_size() == 1 and int(method["bn_splits"]) > 1:
            use_split_bn(self.backbone, int(method["bn_splits"]))
        self.key_encoder = momentum_copy(torch.nn.Sequential(self.backbone, self.projector))

    def online_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.similarity(self.projector(self.backbone(x)))

    @torch.no_grad()
    def momentum_update(self) -> None:
        ema_update(self.key_encoder.parameters(), self.online_parameters(), self.momentum)

    def queries_and_keys(self, x1: torch.Tensor, x2: torch.Tensor):
        """(q1, q2, k1, k2): the queries with gradient (q2 only when symmetric), then, after the
        momentum update, the global batch's keys of the other view (k1 only when symmetric)."""
        q1 = self.query(x1)
        q2 = self.query(x2) if self.symmetric else None
        with torch.no_grad():
            self.momentum_update()
            k2 = self.keys(x2)
            k1 = self.keys(x1) if self.symmetric else None
        return q1, q2, k1, k2

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch's normalised keys (N x D, rank order) from the key encoder."""
        return shuffled_keys(self.key_encoder, x, self.shuffle_bn, self.similarity)

    @staticmethod
    def local(keys_all: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch."""
        b = keys_all.shape[0] // dist.world_size()
        return keys_all[dist.rank() * b : (dist.rank() + 1) * b]


class MoCo(QueryKeyMethod):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        expect(cfg, "loss", "name", ("info_nce",))
        dim, size = int(cfg["head"]["projector_dim"]), int(cfg["method"]["queue_size"])
        per_step = int(cfg["optim"]["batch_size"]) * (2 if self.symmetric else 1)  # keys enqueued per step
        if size % per_step:
            raise UserError(
                f"method.queue_size = {size} must be a multiple of the keys enqueued per step, {per_step} "
                f"(optim.batch_size{' x 2 for the symmetric loss' if self.symmetric else ''}); "
                f"e.g. --set method.queue_size={max(per_step, size // per_step * per_step)}"
            )
        queue = dist.broadcast(F.normalize(torch.randn(dim, size), dim=0))  # same queue on every rank
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        q1, q2, k1, k2 = self.queries_and_keys(*views)
        # Snapshot: the logits must see the queue from before this batch, and autograd keeps
        # a reference to it while `enqueue` below overwrites columns in place.
        queue = self.queue.clone().detach()
        loss = info_nce(q1, self.local(k2), queue, self.temperature)
        if self.symmetric:
            loss = loss + info_nce(q2, self.local(k1), queue, self.temperature)
            self.enqueue(torch.cat([k1, k2]))
        else:
            self.enqueue(k2)
        return {"loss": loss, "z_std": embedding_std(q1)}

    @torch.no_grad()
    def enqueue(self, keys_all: torch.Tensor) -> None:
        """FIFO: write the global keys into columns [ptr, ptr + N) and advance the pointer."""
        n, size = keys_all.shape[0], self.queue.shape[1]
        assert size % n == 0, f"queue of {size} does not hold whole batches of {n} keys"
        # The pointer stays on the device: reading it (int(ptr)) would make the host wait for the
        # forward to finish before it could queue the backward, every step, on a GPU.
        columns = self.queue_ptr + torch.arange(n, device=self.queue.device)
        self.queue.index_copy_(1, columns, keys_all.T.to(self.queue.dtype))
        self.queue_ptr.add_(n).remainder_(size)


METHOD = MoCo
