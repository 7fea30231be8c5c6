"""Losses over local features (feature maps), as pure functions:

- `map_nce`: AMDIM's NCE of one source vector per image against every location of a target map
  (Bachman et al. 2019; docs/spec/methods.md §6(c)); AMDIM's 1->5, 1->7, 5->5 tasks and YADIM's last-map
  comparison (§8) are calls of it with different maps.
- `cpc_nce`: CPC v2's InfoNCE of each prediction against all patch targets in the batch, for
  each row offset (Hénaff et al. 2019, as in lightning-bolts' `CPCTask`; docs/spec/methods.md §7(c)).

Both compute scores in fp32 with autocast off: AMDIM's scores are clipped at +-20, and bf16
would blur differences of a few tenths there. Both take the targets of the whole global batch
(gathered with gradient over ranks, or just the local batch) and `first`, the index of this
rank's first image among them, so negatives can span every rank.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from sslctl.losses.contrastive import fp32


def tanh_clip(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Soft clip to (-clip, clip): clip * tanh(x / clip); about x for |x| << clip."""
    return clip * torch.tanh(x / clip)


def random_location(maps: torch.Tensor) -> torch.Tensor:
    """(B, d, H, W) -> (B, d): the vector at one location per image, drawn uniformly (torch RNG).
    AMDIM's 5->5 source; for a 1x1 map this is just the global vector."""
    b, d = maps.shape[:2]
    flat = maps.flatten(2)  # B x d x HW
    where = torch.randint(flat.shape[2], (b,), device=maps.device)
    return flat[torch.arange(b, device=maps.device), :, where]


def map_nce(
    src: torch.Tensor, tgt: torch.Tensor, *, clip: float = 20.0, reg_weight: float = 0.05, first: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """AMDIM's NCE of source vectors against target maps; returns (loss, score regulariser).

    src: (B, d), one source vector per (local) image n.
    tgt: (N, d, H, W) (or (N, d, L)) target maps of N >= B images; image n's own map is row first + n.

        s[n, m, l] = <src_n, tgt_m,l> / sqrt(d)         raw scores, B x N x L
        reg        = reg_weight * mean(s^2)             over all raw scores (keeps them small)
        s          <- clip * tanh(s / clip)              soft clip
        loss       = -mean_{n,l} log( e^s[n,n,l] / (e^s[n,n,l] + sum_{m != n, l'} e^s[n,m,l']) )

    Every location l of the image's own map is a separate positive; all locations of all other
    images form one shared set of negatives. Equal scores give log(1 + (N - 1) L): 8.51 at
    N = 200, L = 25 (§6(h)).
    """
    with fp32(src.device):
        b, d = src.shape
        tgt = tgt.float().flatten(2)  # N x d x L
        n, _, length = tgt.shape
        scores = (src.float() @ tgt.transpose(0, 1).reshape(d, n * length)).view(b, n, length) / math.sqrt(d)
        reg = reg_weight * scores.pow(2).mean()
        scores = tanh_clip(scores, clip)
        own = torch.arange(b, device=src.device) + first
        pos = scores[torch.arange(b, device=src.device), own]  # B x L
        is_own = F.one_hot(own, n).bool().unsqueeze(2)  # B x N x 1
        neg = torch.logsumexp(scores.masked_fill(is_own, float("-inf")).flatten(1), dim=1, keepdim=True)
        loss = (torch.logaddexp(pos, neg) - pos).mean()
    return loss, reg


def cpc_nce(
    preds: torch.Tensor,
    targets: torch.Tensor,
    offsets: Sequence[int],
    weights: Sequence[float] | None = None,
    first: int = 0,
) -> torch.Tensor:
    """CPC v2's InfoNCE over row offsets: sum_j w_j L_j.

    preds: (B, c, H, W), the prediction made from the context at each grid cell (r, col).
    targets: (N, c, H, W), the target vectors of N >= B images; image b's own grid is row first + b.
    For offset j the prediction at (r, col), r < H - j, must pick out the target at (r + j, col)
    of the same image among all N*H*W targets:

        L_j = mean_{b, r < H-j, col} CE( <pred_b,r,col, t> for every target t,  index(first + b, r + j, col) )

    Offsets j >= H leave no row to predict and are skipped (bolts gets NaN there and drops it).
    `weights` (default 1 each) weigh the offsets: bolts' loop counts offset j (j - 1) times.
    Equal logits give log(N*H*W) per offset: 8.05 at N = 64 on a 7x7 grid (§7(h)).
    """
    weights = [1.0] * len(offsets) if weights is None else list(weights)
    if len(weights) != len(offsets):
        raise ValueError(f"cpc_nce: {len(offsets)} offsets but {len(weights)} weights")
    b, c, h, w = preds.shape
    device = preds.device
    with fp32(device):
        flat_targets = targets.float().permute(0, 2, 3, 1).reshape(-1, c)  # (N*H*W) x c, image-major
        total = preds.new_zeros((), dtype=torch.float32)
        for j, weight in zip(offsets, weights):
            if not 0 < j < h:
                continue
            p = preds[:, :, : h - j, :].float().permute(0, 2, 3, 1).reshape(-1, c)  # (B*(H-j)*W) x c
            image = torch.arange(b, device=device).repeat_interleave((h - j) * w) + first
            cell = torch.arange((h - j) * w, device=device).repeat(b)  # r * W + col
            labels = image * h * w + j * w + cell
            total = total + float(weight) * F.cross_entropy(p @ flat_targets.T, labels)
    return total
