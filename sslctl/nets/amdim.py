"""The AMDIM encoder (Bachman, Hjelm, Buchwalter 2019; docs/spec/methods.md §6(b)), after
Philip-Bachman/amdim-public `model.py` and its lightning-bolts port.

A residual stack of "ConvResNxN" units, conv(kxk) -> [BN] -> ReLU -> 1x1 conv plus an avg-pool
(or, when it narrows, conv) shortcut, with a Fixup-like start (every second conv zero) and no BN
except the final one on each output embedding (`use_bn = False`, the default). The layer list
depends on the input size (32, 64 or 128 px) and is laid out so that three of its outputs are
1x1, 5x5 and 7x7 maps:

    r1: B x n_rkhs x 1 x 1   the global feature (the network's last output)
    r5: B x n_rkhs x 5 x 5   a local map, through a residual 1x1-conv "fake RKHS" MLP
    r7: B x n_rkhs x 7 x 7   a local map, likewise

`forward_maps(x, names)` returns those asked for of {"1": r1, "5": r5, "7": r7, "last": r1};
`forward(x)` returns r1 flattened (B x n_rkhs), the representation embed / kNN / linear use.
`rkhs["5"]`, `rkhs["7"]` are the local maps' own MLPs (a method comparing only r1 freezes them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _maybe_bn(channels: int, use_bn: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if use_bn else nn.Identity()


class ConvStem(nn.Module):
    """(optional pad) -> conv -> [BN] -> ReLU. The 128 px stem pads by reflection."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, pad: int = 0, pad_mode: str = "constant"):
        super().__init__()
        self.pad, self.pad_mode = pad, pad_mode
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride, 0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, mode=self.pad_mode)
        return F.relu(self.conv(x))


class ConvResNxN(nn.Module):
    """h = conv1x1(ReLU([BN](conv_kxk(x)))) + shortcut(x); the shortcut is an avg-pool of the
    same window, zero-padded in channels when the unit widens, a conv when it narrows."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, use_bn: bool = False):
        super().__init__()
        self.n_in, self.n_out, self.kernel, self.stride = n_in, n_out, kernel, stride
        self.conv1 = nn.Conv2d(n_in, n_out, kernel, stride, 0, bias=False)
        self.bn1 = _maybe_bn(n_out, use_bn)
        self.conv2 = nn.Conv2d(n_out, n_out, 1, 1, 0, bias=False)
        self.conv3 = nn.Conv2d(n_in, n_out, kernel, stride, 0, bias=True) if n_out < n_in else None
        nn.init.zeros_(self.conv2.weight)  # Fixup-like: each unit starts as its shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.bn1(self.conv1(x))))
        if self.conv3 is not None:
            return h + self.conv3(x)
        short = F.avg_pool2d(x, self.kernel, self.stride)
        if self.n_out > self.n_in:
            short = F.pad(short, (0, 0, 0, 0, 0, self.n_out - self.n_in))
        return h + short


def res_block(n_in: int, n_out: int, kernel: int, stride: int, depth: int, use_bn: bool) -> nn.Sequential:
    """One kxk unit that changes size, then depth - 1 1x1 units."""
    units = [ConvResNxN(n_in, n_out, kernel, stride, use_bn)]
    units += [ConvResNxN(n_out, n_out, 1, 1, use_bn) for _ in range(depth - 1)]
    return nn.Sequential(*units)


class FakeRKHS(nn.Module):
    """Residual 1x1-conv MLP to n_rkhs channels, then BN: BN(conv(ReLU([BN](conv(x)))) + shortcut(x)).
    The shortcut starts close to the identity when it can (amdim-public's eye init)."""

    def __init__(self, n_in: int, n_out: int, use_bn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 1, bias=False)
        self.bn1 = _maybe_bn(n_out, use_bn)
        self.conv2 = nn.Conv2d(n_out, n_out, 1, bias=False)
        self.shortcut = nn.Conv2d(n_in, n_out, 1, bias=True)
        self.bn_out = nn.BatchNorm2d(n_out)
        nn.init.zeros_(self.conv2.weight)
        if n_out >= n_in:
            with torch.no_grad():
                self.shortcut.weight.uniform_(-0.01, 0.01)
                self.shortcut.weight[:, :, 0, 0].fill_diagonal_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.bn_out(h + self.shortcut(x))


def _layers(input_size: int, ndf: int, n_rkhs: int, depth: int, use_bn: bool) -> list[nn.Module]:
    """amdim-public's layer lists; the comments give the spatial size at 32 / 64 / 128 px."""
    if input_size == 32:
        return [
            ConvStem(3, ndf, 3, 1),  # 30
            ConvResNxN(ndf, ndf, 1, 1, use_bn),  # 30
            res_block(ndf, 2 * ndf, 4, 2, depth, use_bn),  # 14
            res_block(2 * ndf, 4 * ndf, 2, 2, depth, use_bn),  # 7
            _maybe_bn(4 * ndf, use_bn),  # 7
            res_block(4 * ndf, 4 * ndf, 3, 1, depth, use_bn),  # 5
            res_block(4 * ndf, 4 * ndf, 3, 1, depth, use_bn),  # 3
            ConvResNxN(4 * ndf, n_rkhs, 3, 1, use_bn),  # 1
            nn.BatchNorm2d(n_rkhs),
        ]
    stem = [ConvStem(3, ndf, 3, 1)]  # 64 -> 62
    if input_size == 128:
        stem = [ConvStem(3, ndf, 5, 2, 2, "reflect"), ConvStem(ndf, ndf, 3, 1)]  # 128 -> 64 -> 62
    elif input_size != 64:
        raise ValueError(f"the AMDIM encoder takes 32, 64 or 128 px images, not {input_size}")
    return [
        *stem,
        res_block(ndf, 2 * ndf, 4, 2, depth, use_bn),  # 30
        res_block(2 * ndf, 4 * ndf, 4, 2, depth, use_bn),  # 14
        res_block(4 * ndf, 8 * ndf, 2, 2, depth, use_bn),  # 7
        _maybe_bn(8 * ndf, use_bn),  # 7
        res_block(8 * ndf, 8 * ndf, 3, 1, depth, use_bn),  # 5
        res_block(8 * ndf, 8 * ndf, 3, 1, depth, use_bn),  # 3
        ConvResNxN(8 * ndf, n_rkhs, 3, 1, use_bn),  # 1
        nn.BatchNorm2d(n_rkhs),
    ]


MAPS = ("1", "5", "7", "last")


class AMDIMEncoder(nn.Module):
    map_names = MAPS

    def __init__(self, ndf: int = 320, n_rkhs: int = 2560, depth: int = 10, input_size: int = 128, use_bn: bool = False):
        super().__init__()
        self.input_size = input_size
        self.feature_dim = n_rkhs
        self.layers = nn.ModuleList(_layers(input_size, ndf, n_rkhs, depth, use_bn))
        # which layer's output is the (last) 1x1, 5x5 and 7x7 map, found by a dry run as amdim-public does
        self.layers.eval()  # so the dry run leaves the BN running statistics alone
        with torch.no_grad():
            sizes = [a.shape[-1] for a in self._activations(torch.zeros(1, 3, input_size, input_size))]
        self.layers.train()
        self.index = {w: max(i for i, s in enumerate(sizes) if s == w) for w in (1, 5, 7)}
        local_width = 4 * ndf if input_size == 32 else 8 * ndf  # channels of the 5x5 and 7x7 maps
        self.rkhs = nn.ModuleDict({"5": FakeRKHS(local_width, n_rkhs, use_bn), "7": FakeRKHS(local_width, n_rkhs, use_bn)})

    def _activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        acts = []
        for layer in self.layers:
            x = layer(x)
            acts.append(x)
        return acts

    def _checked_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"the AMDIM encoder was built for {self.input_size} px images, got {tuple(x.shape[-2:])}; "
                "make augment.crop_size equal encoder.input_size"
            )
        return self._activations(x)

    def forward_maps(self, x: torch.Tensor, names: tuple[str, ...] = MAPS) -> dict[str, torch.Tensor]:
        """The maps asked for, of {"1": B x n_rkhs x 1 x 1, "5": B x n_rkhs x 5 x 5,
        "7": B x n_rkhs x 7 x 7, "last": the "1" map}; a local map's RKHS MLP runs only when asked."""
        acts = self._checked_activations(x)
        out = {"1": acts[self.index[1]], "last": acts[self.index[1]]}
        out.update({w: self.rkhs[w](acts[self.index[int(w)]]) for w in ("5", "7") if w in names})
        return {name: out[name] for name in names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._checked_activations(x)[self.index[1]].flatten(1)
