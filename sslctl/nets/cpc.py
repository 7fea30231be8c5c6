"""CPC v2's networks (Hénaff et al. 2019), as ported in lightning-bolts (docs/spec/methods.md §7(b)):

- `patchify`: an image -> a G x G grid of overlapping patches (8 px, stride 4 at 32 px;
  16 / 8 at 64 px; 32 / 16 at 128 px: a 7 x 7 grid every time).
- `CPCEncoder`: each patch through a ResNet whose every BatchNorm is a LayerNorm (bolts'
  `cpc_resnet101`, bottleneck blocks [3, 4, 46, 3]: LayerNorm keeps statistics from leaking
  between patches of one image), the patch vectors re-assembled into Z: B x c x G x G.
  `forward_grid(x)` gives Z; `forward(x)` its mean over the grid (B x c) for embed / kNN / linear.
- `MaskedContext`: the PixelCNN-style context network, 5 residual blocks of
  1x1 -> ReLU -> 1x3 -> pad a row on top -> 2x1 -> ReLU -> 1x1, so that row r of the output
  depends on rows <= r of Z only (bolts pads with ones; zeros here, the usual causal padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patchify(x: torch.Tensor, size: int, stride: int) -> tuple[torch.Tensor, int]:
    """(B, C, H, W) -> ((B*G*G, C, size, size) patches in image-major, row-major order, G)."""
    b, c = x.shape[:2]
    p = x.unfold(2, size, stride).unfold(3, size, stride)  # B x C x G x G x size x size
    g = p.shape[2]
    if p.shape[3] != g:
        raise ValueError(f"patchify needs square images, got {tuple(x.shape[-2:])}")
    return p.permute(0, 2, 3, 1, 4, 5).reshape(b * g * g, c, size, size), g


class LNBottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3(stride) -> 1x1 x expansion) with LayerNorm over (C, H, W)
    after each conv; LayerNorm shapes come from a sample patch batch, as in bolts."""

    def __init__(self, sample: torch.Tensor, inplanes: int, planes: int, stride: int, expansion: int):
        super().__init__()
        out = planes * expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        with torch.no_grad():
            h1 = self.conv1(sample)
            h2 = self.conv2(h1)
            h3 = self.conv3(h2)
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(h.shape[1:]) for h in (h1, h2, h3))
        self.downsample = None
        if stride != 1 or inplanes != out:
            conv = nn.Conv2d(inplanes, out, 1, stride, bias=False)
            self.downsample = nn.Sequential(conv, nn.LayerNorm(h3.shape[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.ln1(self.conv1(x)))
        h = F.relu(self.ln2(self.conv2(h)))
        h = self.ln3(self.conv3(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class CPCEncoder(nn.Module):
    """Patch grid + LayerNorm ResNet. `width` 64 and `layers` [3, 4, 46, 3] are bolts'
    cpc_resnet101 (stages of 64, 128, 512 (x8 expansion), 512 planes: c = 2048); smaller values
    make CPU-sized versions of the same network."""

    def __init__(
        self,
        layers: tuple[int, ...] | list[int] = (3, 4, 46, 3),
        width: int = 64,
        patch_size: int = 32,
        patch_stride: int = 16,
        input_size: int = 128,
    ):
        super().__init__()
        self.patch_size, self.patch_stride, self.input_size = patch_size, patch_stride, input_size
        sample = torch.zeros(2, 3, patch_size, patch_size)
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        with torch.no_grad():
            sample = self.conv1(sample)
        self.ln1 = nn.LayerNorm(sample.shape[1:])
        sample = F.max_pool2d(sample, 3, 2, 1)
        stages, inplanes = [], width
        for blocks, planes, stride, expansion in zip(layers, (width, 2 * width, 8 * width, 8 * width), (1, 2, 2, 2), (4, 4, 8, 4)):
            stage = []
            for i in range(blocks):
                block = LNBottleneck(sample, inplanes, planes, stride if i == 0 else 1, expansion)
                with torch.no_grad():
                    sample = block(sample)
                stage.append(block)
                inplanes = planes * expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = inplanes
        self.grid = (input_size - patch_size) // patch_stride + 1
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(P, 3, patch, patch) -> (P, c): the patch net, spatially averaged if it is not 1x1 yet."""
        h = F.max_pool2d(F.relu(self.ln1(self.conv1(patches))), 3, 2, 1)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return h.mean(dim=(2, 3))

    def forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> Z: (B, c, G, G), the patch vectors on their grid."""
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"the CPC encoder was built for {self.input_size} px images, got {tuple(x.shape[-2:])}; "
                "make augment.crop_size equal encoder.input_size"
            )
        patches, g = patchify(x, self.patch_size, self.patch_stride)
        z = self.encode_patches(patches)  # (B*G*G) x c
        return z.view(x.shape[0], g, g, -1).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_grid(x).mean(dim=(2, 3))


class MaskedContext(nn.Module):
    """PixelCNN-style context network: c = relu(z + sum of residual blocks), where output row r
    sees input rows <= r only (the 2x1 conv reads rows r - 1 and r after one padded row on top)."""

    def __init__(self, channels: int, hidden: int = 256, blocks: int = 5):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, hidden, 1),
                nn.ReLU(),
                nn.Conv2d(hidden, hidden, (1, 3)),  # within the row: width W - 2
                nn.ZeroPad2d((0, 0, 1, 0)),  # one row on top: the next conv cannot look down
                nn.Conv2d(hidden, hidden, (2, 1), padding=(0, 1)),  # rows r-1, r; width back to W
                nn.ReLU(),
                nn.Conv2d(hidden, channels, 1),
            )
            for _ in range(blocks)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = z
        for block in self.blocks:
            c = c + block(c)
        return F.relu(c)
