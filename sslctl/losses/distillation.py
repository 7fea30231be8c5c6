"""DINO's self-distillation loss (Caron et al. 2021, eq. 3; facebookresearch/dino main_dino.py
DINOLoss). Softmax and logs in fp32 with autocast off: at a teacher temperature of 0.04 the
scaled logits reach 25 and more in magnitude (see losses/contrastive.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslctl.losses.contrastive import fp32


@torch.no_grad()
def teacher_targets(teacher: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's centred and sharpened distributions softmax((t - c) / temperature), fp32,
    without gradient. teacher: (N, K) scores; center: (1, K)."""
    with fp32(teacher.device):
        return F.softmax((teacher.float() - center.float()) / temperature, dim=-1)


def dino_cross_entropy(student: torch.Tensor, targets: torch.Tensor, n_crops: int, temperature: float) -> torch.Tensor:
    """H(P_t, P_s) over every (teacher crop, other student crop) pair, averaged.

    student: (n_crops * B, K) scores of all crops in view order (the teacher's crops first);
    targets: (n_teacher * B, K) the teacher's distributions of its crops (`teacher_targets`).
    Each pair's cross-entropy -sum_k p_t log softmax(s / temperature) is averaged over the batch,
    then over the n_teacher * (n_crops - 1) pairs (a crop is never compared with itself).
    Equal student scores give log K whatever the targets."""
    with fp32(student.device):
        log_p = F.log_softmax(student.float() / temperature, dim=-1).chunk(n_crops)
        total, pairs = student.new_zeros((), dtype=torch.float32), 0
        for i, p_t in enumerate(targets.float().chunk(len(targets) // log_p[0].shape[0])):
            for v, log_p_s in enumerate(log_p):
                if v != i:
                    total = total + (-p_t * log_p_s).sum(dim=-1).mean()
                    pairs += 1
        return total / pairs
