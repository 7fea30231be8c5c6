"""Projector / predictor MLPs: the framework's "representation extraction" part.

One builder covers every head in docs/spec/methods.md:
- MoCo v1:   mlp(D, [], 128)                                   (a single linear layer)
- MoCo v2:   mlp(D, [D], 128, norm=False)                      (no BN in the head)
- SimCLR v2: mlp(D, [D, D], 128, last_bias=False, last_norm=True)  (Linear-BN-ReLU x2, Linear-BN(no affine))
- BYOL:      mlp(D, [4096], 256, last_bias=False)              (Linear-BN-ReLU-Linear(no bias)), predictor alike
- SwAV:      mlp(D, [2048], 128)                               then L2-normalise and prototypes
"""

from __future__ import annotations

from torch import nn


def mlp(
    in_dim: int,
    hidden: list[int],
    out_dim: int,
    *,
    norm: bool = True,
    last_bias: bool = True,
    last_norm: bool = False,
) -> nn.Sequential:
    """Linear(-BN)-ReLU for each hidden width, then Linear to out_dim.

    Hidden linears carry no bias when followed by BN (the BN shift replaces it).
    `last_norm` adds a BN without affine parameters after the last linear (SimCLR v2)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for width in hidden:
        layers.append(nn.Linear(dim, width, bias=not norm))
        if norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU(inplace=True))
        dim = width
    layers.append(nn.Linear(dim, out_dim, bias=last_bias))
    if last_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def from_config(in_dim: int, cfg: dict, prefix: str = "projector") -> nn.Sequential:
    """Build a head from recipe keys `<prefix>_hidden` (list of widths), `<prefix>_dim`,
    `<prefix>_norm`, `<prefix>_last_bias`, `<prefix>_last_norm` in the [head] section."""
    return mlp(
        in_dim,
        list(cfg.get(f"{prefix}_hidden", [])),
        int(cfg[f"{prefix}_dim"]),
        norm=bool(cfg.get(f"{prefix}_norm", True)),
        last_bias=bool(cfg.get(f"{prefix}_last_bias", True)),
        last_norm=bool(cfg.get(f"{prefix}_last_norm", False)),
    )
