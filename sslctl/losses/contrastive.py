"""Contrastive and regression losses of the founding methods (docs/spec/methods.md §1, §2, §3, §5).

Inputs are L2-normalised embeddings unless stated. Similarities, logits and softmax are
computed in fp32 with autocast switched off: at temperatures of 0.02-0.2 the logits reach
50 in magnitude, and bf16's 8-bit mantissa would blur differences of a few tenths.
Sanity values at initialisation are in docs/spec/methods.md §10.3 and checked in tests/test_losses.py.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """A region where autocast is off, so float32 inputs stay float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def cross_entropy_at(sims: torch.Tensor, temperature: float, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of CE(sims / temperature, target) in fp32. sims: (B, C); target: (B,) long."""
    with fp32(sims.device):
        return F.cross_entropy(sims.float() / temperature, target)


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE (He et al. 2019, eq. 1), positive at index 0.

    q, k: (B, D) queries and their positive keys (k carries no gradient);
    negatives: (D, K) the queue's columns, detached. Logits (B, 1+K) = [q.k, q.Q] / temperature.
    Equal logits give log(K+1)."""
    with fp32(q.device):
        q = q.float()
        pos = (q * k.float()).sum(dim=1, keepdim=True)
        sims = torch.cat([pos, q @ negatives.float()], dim=1)
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return cross_entropy_at(sims, temperature, target)


def keys_and_bank_similarities(q: torch.Tensor, keys: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """AdCo's (N+K)-way similarities (Hu et al. 2021, docs/spec/methods.md §5c), fp32.

    q: (B, D) local queries; keys: (N, D) the global batch's keys in rank order; bank: (D, K)
    raw (unnormalised) adversarial negatives, used as normalised columns.
    Returns (B, N+K): [q.k_1 .. q.k_N, q.m^_1 .. q.m^_K]. AdCo's network loss is
    `cross_entropy_at` of these at its positives' global indices (methods/adco.py)."""
    with fp32(q.device):
        q = q.float()
        return torch.cat([q @ keys.float().T, q @ F.normalize(bank.float(), dim=0)], dim=1)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    *,
    z1_all: torch.Tensor | None = None,
    z2_all: torch.Tensor | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020), as in google-research/simclr tf2/objective.py.

    z1, z2: (B, D) this process's two views; z1_all, z2_all: (N, D) all processes' views in rank
    order, gathered WITH gradient (defaults: z1, z2, i.e. one process). Anchor n of view 1 has
    its positive at global index rank*B + n of view 2; candidates are the other 2N-1 views, its
    own self-similarity removed with a mask (-inf), not by subtracting e^{1/t} (docs/spec/methods.md §2h).

    Returns the TF code's total: mean over pairs of (loss of view-1 anchor + loss of view-2
    anchor), i.e. a SUM over the two directions averaged over pairs, twice the paper's 1/(2N)
    form. Equal logits give 2*log(2N-1)."""
    z1_all = z1 if z1_all is None else z1_all
    z2_all = z2 if z2_all is None else z2_all
    b = z1.shape[0]
    target = rank * b + torch.arange(b, device=z1.device)
    with fp32(z1.device):
        z1, z2, z1_all, z2_all = (t.float() for t in (z1, z2, z1_all, z2_all))
        self_mask = F.one_hot(target, z1_all.shape[0]).bool()
        aa = (z1 @ z1_all.T).masked_fill(self_mask, float("-inf"))
        bb = (z2 @ z2_all.T).masked_fill(self_mask, float("-inf"))
        ab, ba = z1 @ z2_all.T, z2 @ z1_all.T
        # Each anchor's candidates: the other view (positive at `target`) then its own view.
        return cross_entropy_at(torch.cat([ab, aa], 1), temperature, target) + cross_entropy_at(
            torch.cat([ba, bb], 1), temperature, target
        )


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's loss for one direction (Grill et al. 2020, eq. 2): mean over the batch of
    ||p^ - z^||^2 = 2 - 2 cos(p, z). p: (B, D) online predictions; z: (B, D) target projections
    (detached by the caller). Inputs need not be normalised. Random vectors give ~2.0."""
    with fp32(p.device):
        return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1)).mean()
