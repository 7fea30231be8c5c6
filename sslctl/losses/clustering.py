"""Clustering losses (docs/spec/methods.md §4): Sinkhorn-Knopp codes and SwAV's swapped prediction.

Shapes: scores are B x K (samples x prototypes), s = C z̄ with unit-norm rows, so in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslctl.distributed import all_reduce_max, all_reduce_sum, world_size


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Equipartitioned soft codes Q (B x K, each row sums to 1) from detached scores.

    The official `distributed_sinkhorn`: P = exp(S^T / eps) (K x B), divided by its global sum,
    then `iters` times rows (prototypes) to 1/K with all-reduced row sums and columns (samples)
    to 1/B_global with local sums; finally x B_global. B_global = local rows x world size, so
    the prototypes are balanced over the whole global batch (and the queue rows, if any).
    fp32, and the max is subtracted before exp (e^(1/eps) = e^20 at eps 0.05): a shift shared
    by every rank (all-reduced max) cancels in the first division, so the codes are unchanged.
    """
    s = scores.detach().float() / eps
    shift = all_reduce_max(s.max().clone())
    p = torch.exp(s - shift).t()  # K x B
    k, b = p.shape[0], p.shape[1] * world_size()
    p /= all_reduce_sum(p.sum())
    for _ in range(iters):
        p /= all_reduce_sum(p.sum(dim=1, keepdim=True))  # each prototype: total mass 1/K
        p /= k
        p /= p.sum(dim=0, keepdim=True)  # each sample: total mass 1/B
        p /= b
    return (p * b).t()


def swapped_prediction(
    scores: list[torch.Tensor], codes: dict[int, torch.Tensor], temperature: float = 0.1
) -> torch.Tensor:
    """SwAV loss: every other crop v predicts each assigned crop a's code q_a.

    L = 1/|A| sum_a 1/(V-1) sum_{v != a} mean_n CE(q_a[n], softmax(s_v[n] / temperature)).
    `scores[v]` (B x K, with graph) are crop v's prototype scores; `codes[a]` are Sinkhorn codes
    of crop a (no graph). Computed in fp32 (log-softmax at temperature 0.1 under bf16 is coarse).
    """
    n_crops = len(scores)
    log_p = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    loss = scores[0].new_zeros((), dtype=torch.float32)
    for a, q in codes.items():
        sub = sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(n_crops) if v != a)
        loss = loss + sub / (n_crops - 1)
    return loss / len(codes)
