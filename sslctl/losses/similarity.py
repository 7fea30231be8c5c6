"""The similarity part of a method (Falcon & Cho's fourth part): a recipe's [loss] similarity.

sslctl's losses score embeddings by dot products; the similarity says what the embeddings are
made into first, along dim 1 (the features of a B x D batch, or of each location of a
B x C x H x W map):
    cosine  L2-normalised, so a dot product is a cosine (MoCo, AdCo, SimCLR, BYOL, SwAV)
    dot     left as they are (AMDIM, YADIM and CPC, whose losses scale or clip the products)
A method names the ones it implements (methods.base.similarity_of refuses the others). BYOL's
regression loss, 2 - 2 cos(p, z'), normalises inside: mapping p and z' first would change only
the rounding, and made one step on 2 processes differ more from the same step on one (5% of
conv1's update, tests/test_distributed.py allows 3%), so BYOL applies nothing itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


def dot(x: torch.Tensor) -> torch.Tensor:
    return x


SIMILARITIES = {"cosine": cosine, "dot": dot}
