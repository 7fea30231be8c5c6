"""Losses without negatives: SimSiam's stop-gradient cosine, Barlow Twins' cross-correlation,
VICReg's variance / invariance / covariance terms.

Shapes: z1, z2 (and p) are (B, D) embeddings of two views of the same B images, row n of one
view paired with row n of the other. Computed in fp32 with autocast off, like the other losses:
Barlow Twins' (1 - c_ii)^2 and VICReg's hinges compare values near 1 that bf16 resolves to 2^-8.

Batch statistics are the GLOBAL batch's. `cross_correlation` takes this process's rows and sums
its statistics over the processes itself (as the Barlow Twins code all-reduces c); the VICReg
terms take the global batch, gathered with gradient by the caller (as the VICReg code's
FullGatherLayer). Either way every process computes the loss of the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslctl.distributed import all_reduce_sum_with_grad, world_size
from sslctl.losses.contrastive import fp32


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The D*(D-1) off-diagonal entries of a square (D, D) matrix, flattened."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


# ---- SimSiam (Chen & He 2021) -------------------------------------------------------------


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)), the mean over the batch (paper eq. 1 and
    Algorithm 1). p: (B, D) predictions, z: (B, D) projections of the other view, DETACHED HERE:
    the stop-gradient is what keeps SimSiam from collapsing (paper §4.1), so no gradient ever
    reaches z through this term. Range [-1, 1]; identical directions give -1."""
    with fp32(p.device):
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


# ---- Barlow Twins (Zbontar et al. 2021) ----------------------------------------------------


def _standardise(z: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """Each dimension to mean 0 and variance 1 over the global batch of n rows: BatchNorm1d
    without affine in training mode (biased variance, + eps), statistics summed over processes."""
    mean = all_reduce_sum_with_grad(z.sum(dim=0)) / n
    centred = z - mean
    var = all_reduce_sum_with_grad(centred.pow(2).sum(dim=0)) / n
    return centred * torch.rsqrt(var + eps)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins' C (paper eq. 2), (D, D): C_ij = sum_b z1n_bi z2n_bj / N over the N images of
    the global batch, z1n, z2n each dimension standardised over that batch (the code's
    BatchNorm1d(affine=False) under SyncBN, eps 1e-5). z1, z2: (B, D) this process's rows; the
    sums are all-reduced with gradient (`all_reduce_sum_with_grad`), so every process gets the
    global C and the one-process gradient. In [-1, 1] up to eps; C of identical views is the
    views' correlation matrix, diagonal 1."""
    n = z1.shape[0] * world_size()
    with fp32(z1.device):
        z1n, z2n = _standardise(z1.float(), n, eps), _standardise(z2.float(), n, eps)
        return all_reduce_sum_with_grad(z1n.T @ z2n / n)


def barlow_twins_terms(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(invariance, redundancy reduction) of Barlow Twins' loss (paper eq. 1) from C:
    sum_i (1 - C_ii)^2 and sum_{i != j} C_ij^2. The loss is invariance + lambda * redundancy."""
    return (1 - torch.diagonal(c)).pow(2).sum(), off_diagonal(c).pow(2).sum()


# ---- VICReg (Bardes et al. 2022) -----------------------------------------------------------


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(invariance, variance, covariance) of VICReg (paper eqs. 1-5, the official main_vicreg.py).

    z1, z2: (N, D) the embeddings of the WHOLE global batch (gathered with gradient by the caller).
        invariance s = mean over n, j of (z1_nj - z2_nj)^2                            (F.mse_loss)
        variance   v = mean_j relu(1 - sqrt(Var(z1_j) + eps)) / 2 + the same for z2  (unbiased Var;
                       0 when every dimension's std is at least 1 (+ eps); 1 when all collapse)
        covariance c = sum_{i != j} Cov(z1)_ij^2 / D + the same for z2  (Cov over N - 1; 0 for
                       decorrelated dimensions)
    The loss is lambda s + mu v + nu c (25, 25, 1 in the paper)."""
    with fp32(z1.device):
        z1, z2 = z1.float(), z2.float()
        n, d = z1.shape
        invariance = F.mse_loss(z1, z2)
        z1, z2 = z1 - z1.mean(dim=0), z2 - z2.mean(dim=0)
        variance = sum(F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean() / 2 for z in (z1, z2))
        covariance = sum(off_diagonal(z.T @ z / (n - 1)).pow(2).sum() / d for z in (z1, z2))
    return invariance, variance, covariance
