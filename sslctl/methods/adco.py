"""AdCo: Adversarial Contrast (Hu, Wang, Hu, Qi; CVPR 2021). docs/spec/methods.md §5; recipes/adco.toml.

MoCo v2's encoders (query f_q, momentum key encoder f_k, shuffle-BN) with the queue replaced by
a bank M (dim x K) of negatives that are trained adversarially: the network descends the
contrastive loss, the bank ascends it. One step (maple-research-lab/AdCo training/train.py):

    q = normalise(f_q(v1)); momentum update; k_1..k_N = normalise(f_k(v2)) of the GLOBAL batch
    u_n = [q_n.k_1 .. q_n.k_N, q_n.m^_1 .. q_n.m^_K]      (other images' keys are negatives too)
    loss = CE(u_n / t, rank*B + n)                        (t = 0.12; positive at its global index)
    -- loop: backward, network optimizer step --
    after_optimizer_step, with the SAME forward's detached q and u (pre-step, as the code does):
      p = softmax(u / t_m)                                (t_m = 0.02, sharper than t)
      grad_j = 1/(t_m ||m_j||) * 1/B sum_n p_{n,N+j} (q_n - (q_n.m^_j) m^_j)
      G = -grad, averaged over ranks; V <- mu V + G + wd M; M <- M - lr V
i.e. SGD (lr 3, momentum 0.9, wd 1e-4, never scheduled) ascending the bank loss at t_m.
M and V are buffers, outside the network optimizer and DDP; they are checkpointed with the
method. Symmetric option: both views give queries and keys, loss and G are the halves' means.

ad_init (`setup`): before epoch 0, plain MoCo-loss steps (positive q.k at index 0, negatives =
the current normalised bank, t) write the gathered keys into consecutive bank columns until all
K are filled, then f_k is re-copied from f_q. The official code uses the training optimizer
there; the loop builds that only after setup, so setup builds its own from [optim] at the
recipe's scaled peak lr (no warmup: AdCo has none), and drops its momentum buffer afterwards.

Left out: multi-crop (5 query crops summed), which needs per-view crop sizes in [augment].
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from sslctl import console
from sslctl import distributed as dist
from sslctl.losses.contrastive import cross_entropy_at, info_nce, keys_and_bank_similarities
from sslctl.methods.base import expect
from sslctl.methods.moco import QueryKeyMethod
from sslctl.optim import build_optimizer
from sslctl.recipes import scaled_lr
from sslctl.siamese import embedding_std


@torch.no_grad()
def bank_gradient(q: torch.Tensor, sims: torch.Tensor, bank: torch.Tensor, bank_temperature: float) -> torch.Tensor:
    """Closed-form gradient of the bank loss L_m = mean_n CE(sims_n / t_m, y_n) with respect to
    the RAW bank columns (through their normalisation). q: (B, D) normalised queries; sims:
    (B, N+K) from `keys_and_bank_similarities`; bank: (D, K). Returns (D, K), fp32.
    The positives are among the first N columns, so only p's bank part enters."""
    q, sims, bank = q.float(), sims.float(), bank.float()
    n_keys, b = sims.shape[1] - bank.shape[1], q.shape[0]
    p = torch.softmax(sims / bank_temperature, dim=1)[:, n_keys:]  # (B, K)
    s = sims[:, n_keys:]  # q_n . m^_j
    m_hat = F.normalize(bank, dim=0)
    grad = (q.T @ p - m_hat * (p * s).sum(0)) / b  # tangential part: (I - m^ m^T) q, weighted by p
    return grad / (bank_temperature * bank.norm(dim=0))


class AdCo(QueryKeyMethod):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        expect(cfg, "loss", "name", ("info_nce_global",))
        method = cfg["method"]
        self.bank_temperature = float(cfg["loss"]["bank_temperature"])
        self.bank_lr = float(method["bank_lr"])
        self.bank_momentum = float(method["bank_momentum"])
        self.bank_weight_decay = float(method["bank_weight_decay"])
        self.ad_init = bool(method["ad_init"])
        dim, size = int(cfg["head"]["projector_dim"]), int(method["bank_size"])
        self.register_buffer("bank", dist.broadcast(torch.randn(dim, size)))  # identical on every rank
        self.register_buffer("bank_velocity", torch.zeros(dim, size))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (q, sims) for the bank step

    def contrast(self, q: torch.Tensor, keys_all: torch.Tensor) -> torch.Tensor:
        sims = keys_and_bank_similarities(q, keys_all, self.bank)
        target = dist.rank() * q.shape[0] + torch.arange(q.shape[0], device=q.device)
        self._pending.append((q.detach().float(), sims.detach()))
        return cross_entropy_at(sims, self.temperature, target)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self._pending.clear()
        q1, q2, k1, k2 = self.queries_and_keys(*views)
        loss = self.contrast(q1, k2)
        if self.symmetric:
            loss = 0.5 * loss + 0.5 * self.contrast(q2, k1)
        return {"loss": loss, "z_std": embedding_std(q1), "bank_loss": self.bank_loss()}

    @torch.no_grad()
    def bank_loss(self) -> torch.Tensor:
        """The loss the bank ascends (at t_m), on this step's similarities; logged."""
        losses = []
        for q, sims in self._pending:
            target = dist.rank() * q.shape[0] + torch.arange(q.shape[0], device=q.device)
            losses.append(cross_entropy_at(sims, self.bank_temperature, target))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def after_optimizer_step(self, progress=None) -> None:
        """Gradient ascent on the bank with the pre-step q and similarities of this step."""
        if not self._pending:
            return
        g = -torch.stack([bank_gradient(q, s, self.bank, self.bank_temperature) for q, s in self._pending]).mean(0)
        self._pending.clear()
        dist.all_reduce_mean(g)
        self.bank_velocity.mul_(self.bank_momentum).add_(g).add_(self.bank, alpha=self.bank_weight_decay)
        self.bank.sub_(self.bank_velocity, alpha=self.bank_lr)

    def setup(self, batches: Iterator[list[torch.Tensor]]) -> int:
        """ad_init: fill the bank with keys while warming the network up on a plain MoCo loss."""
        if not self.ad_init:
            return 0
        lr, _ = scaled_lr(self.cfg)
        optimizer = build_optimizer(self, self.cfg["optim"], lr)
        size, filled, used = self.bank.shape[1], 0, 0
        for views in batches:
            q = self.query(views[0])
            with torch.no_grad():
                self.momentum_update()
                k_all = self.keys(views[1])
            loss = info_nce(q, self.local(k_all), F.normalize(self.bank, dim=0), self.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p in self.trainable_parameters():  # setup runs outside DDP: average by hand
                if p.grad is not None:
                    dist.all_reduce_mean(p.grad)
            optimizer.step()
            n = min(k_all.shape[0], size - filled)
            self.bank[:, filled : filled + n] = k_all[:n].T.float()
            filled, used = filled + n, used + 1
            if filled >= size:
                break
        if filled < size:
            console.warn(f"ad_init: data ran out after {filled} of {size} bank columns; the rest stay random")
        with torch.no_grad():
            for k, q in zip(self.key_encoder.parameters(), self.online_parameters()):
                k.copy_(q)
        console.log(f"ad_init: bank filled with keys of {used} batches (lr {lr:g}); key encoder re-copied")
        return used


METHOD = AdCo
