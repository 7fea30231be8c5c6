"""View pipelines from a recipe's [augment] section (docs/spec/methods.md §0.2), with torchvision.transforms.v2.

Every view is built from the same keys:

    crop_size, crop_scale [lo, hi]    RandomResizedCrop (aspect 3/4..4/3, or `crop_ratio`)
    flip_p                            horizontal flip
    jitter [b, c, s, h], jitter_p     colour jitter in random order (torchvision semantics;
                                      `jitter_brightness = "additive"` for SimCLR v1 / BYOL)
    grayscale_p                       grayscale kept at 3 channels (luma 0.2989, 0.587, 0.114)
    blur_p, blur_sigma [lo, hi]       Gaussian blur, SimCLR/BYOL kernel 2*floor(size/20)+1 taps
    solarize_p                        x -> 1 - x where x >= 0.5 (BYOL)
    normalize "imagenet"|"manifest"   constants, see `normalization`

`[augment.view1]`, `[augment.view2]`, ... override any of them for one view (BYOL's asymmetric blur
and solarize). Multi-crop (SwAV) is part of the same section: `extra_crops` more views of
`extra_crop_size` px with `extra_crop_scale`, otherwise like the base keys. Optional parts:
`translate` px with `translate_p` (AMDIM/CPC's reflect-padded shift) and `shared_flip` (AMDIM's one
flip shared by all views). The views come out as [view1 .. viewN, extra crops ...].

Work stays in uint8 until the last op (cheaper per-sample ops, no float copy per stage); all
randomness comes from torch's RNG so `torch.manual_seed` (per DataLoader worker) fixes it.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as tF
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from sslctl.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keys a view reads and their values when a recipe leaves them out (only the optional parts).
OPTIONAL = {
    "extra_crops": 0,
    "jitter_brightness": "multiplicative",
    "interpolation": "bilinear",
    "crop_ratio": [3 / 4, 4 / 3],
    "translate": 0,
    "translate_p": 0.0,
    "shared_flip": False,
}
_VIEW = re.compile(r"view(\d+)$")


def blur_kernel_size(crop_size: int) -> int:
    """SimCLR/BYOL: an odd kernel of about 10% of the image: 2 * floor(size / 20) + 1 (23 at 224)."""
    return 2 * (crop_size // 20) + 1


def view_configs(aug: dict) -> list[dict]:
    """One flat dict of keys per view: [view1 .. viewN, extra crops ...]."""
    base = {**OPTIONAL, **{k: v for k, v in aug.items() if not isinstance(v, dict)}}
    n = int(base.get("views", 2))
    for name in aug:
        m = _VIEW.match(name)
        if isinstance(aug[name], dict) and not (m and 1 <= int(m.group(1)) <= n):
            raise UserError(f"[augment.{name}]: per-view tables are view1 .. view{n} (augment.views = {n})")
    views = [{**base, **aug.get(f"view{i}", {})} for i in range(1, n + 1)]
    for _ in range(int(base["extra_crops"])):
        views.append({**base, "crop_size": base["extra_crop_size"], "crop_scale": base["extra_crop_scale"]})
    return views


def view_names(aug: dict) -> list[str]:
    """Where each view's keys come from, for error messages: augment.view1 .. / augment."""
    n = int(aug.get("views", 2))
    names = [f"augment.view{i}" if f"view{i}" in aug else "augment" for i in range(1, n + 1)]
    return names + ["augment (extra crops)"] * int(aug.get("extra_crops", 0))


def check_view(cfg: dict, where: str) -> None:
    """Range checks that torchvision would otherwise report as a traceback mid-run."""

    def bad(key: str, expected: str) -> UserError:
        return UserError(f"recipe {where}.{key} = {cfg.get(key)!r}: expected {expected}")

    for key in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "translate_p"):
        if not 0.0 <= float(cfg.get(key, 0.0)) <= 1.0:
            raise bad(key, "a probability in [0, 1]")
    lo, hi = cfg["crop_scale"]
    if not 0.0 < lo <= hi <= 1.0:
        raise bad("crop_scale", "[lo, hi] with 0 < lo <= hi <= 1, e.g. [0.2, 1.0]")
    if int(cfg["crop_size"]) < 1:
        raise bad("crop_size", "a positive number of pixels")
    jitter = cfg["jitter"]
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        raise bad("jitter", "[brightness, contrast, saturation, hue] >= 0 with hue <= 0.5, e.g. [0.4, 0.4, 0.4, 0.1]")
    s_lo, s_hi = cfg["blur_sigma"]
    if not 0.0 < s_lo <= s_hi:
        raise bad("blur_sigma", "[lo, hi] with 0 < lo <= hi, e.g. [0.1, 2.0]")


class ColorJitter(nn.Module):
    """Colour jitter as torchvision does it (brightness, contrast, saturation, hue in a random
    order, factors uniform in [max(0, 1 - x), 1 + x], hue shift in [-h, h]), with SimCLR v1 /
    BYOL's additive brightness, x + U[-b, b], as an option."""

    def __init__(self, jitter: Sequence[float], brightness: str = "multiplicative"):
        super().__init__()
        self.b, self.c, self.s, self.h = (float(v) for v in jitter)
        self.additive = brightness == "additive"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in torch.randperm(4).tolist():
            if op == 0 and self.b > 0:
                if self.additive:
                    x = _add_brightness(x, _uniform(-self.b, self.b))
                else:
                    x = F.adjust_brightness(x, _uniform(max(0.0, 1 - self.b), 1 + self.b))
            elif op == 1 and self.c > 0:
                x = F.adjust_contrast(x, _uniform(max(0.0, 1 - self.c), 1 + self.c))
            elif op == 2 and self.s > 0:
                x = F.adjust_saturation(x, _uniform(max(0.0, 1 - self.s), 1 + self.s))
            elif op == 3 and self.h > 0:
                x = F.adjust_hue(x, _uniform(-self.h, self.h))
        return x


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi))


def _add_brightness(x: torch.Tensor, delta: float) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return (x.float() + delta * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return (x + delta).clamp_(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Gaussian blur of a (B, C, H, W) float batch, one sigma per image (B,), `kernel` taps,
    reflect padding as torchvision; separable (two 1-D passes), used by both view paths."""
    B, C, H, W = x.shape
    half = (kernel - 1) / 2
    t = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.to(x.dtype).view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, dim=0)  # (B*C, kernel)
    pad = kernel // 2
    y = tF.pad(x.reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = tF.conv2d(y, k.view(B * C, 1, kernel, 1), groups=B * C)
    y = tF.conv2d(y, k.view(B * C, 1, 1, kernel), groups=B * C)
    return y.view(B, C, H, W)


class RandomBlur(nn.Module):
    """Gaussian blur with sigma ~ U[lo, hi] as one separable convolution pass per axis: the same
    result as torchvision's GaussianBlur, which convolves with the full k x k kernel (~10x slower
    at 23 taps, the largest per-sample cost at 224 px)."""

    def __init__(self, kernel: int, sigma: Sequence[float]):
        super().__init__()
        self.kernel, (self.lo, self.hi) = kernel, (float(s) for s in sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.empty(1).uniform_(self.lo, self.hi)
        y = gaussian_blur(x.unsqueeze(0).float(), sigma, self.kernel)[0]
        return y.round_().clamp_(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y


class RandomSolarize(nn.Module):
    """BYOL's solarize on pixels in [0, 1]: x if x < 0.5 else 1 - x (uint8: x >= 128 -> 255 - x)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(1)) >= self.p:
            return x
        return F.solarize(x, threshold=128 if x.dtype == torch.uint8 else 0.5)


def _maybe(p: float, transform: nn.Module) -> list[nn.Module]:
    """RandomApply, or nothing when p is 0 (and the bare op when p is 1)."""
    if p <= 0:
        return []
    return [transform] if p >= 1 else [v2.RandomApply([transform], p=p)]


def view_transform(cfg: dict, mean: Sequence[float], std: Sequence[float], where: str = "augment") -> v2.Compose:
    """One view's pipeline on a uint8 3xHxW tensor -> normalised float32 3 x size x size."""
    cfg = {**OPTIONAL, **cfg}
    check_view(cfg, where)
    size = int(cfg["crop_size"])
    interp = InterpolationMode.BICUBIC if cfg["interpolation"] == "bicubic" else InterpolationMode.BILINEAR
    ops: list[nn.Module] = [
        v2.RandomResizedCrop(size, scale=tuple(cfg["crop_scale"]), ratio=tuple(cfg["crop_ratio"]), interpolation=interp, antialias=True)
    ]
    if int(cfg["translate"]) > 0:
        ops += _maybe(float(cfg["translate_p"]), v2.RandomCrop(size, padding=int(cfg["translate"]), padding_mode="reflect"))
    if float(cfg["flip_p"]) > 0 and not cfg["shared_flip"]:
        ops.append(v2.RandomHorizontalFlip(float(cfg["flip_p"])))
    if any(float(j) > 0 for j in cfg["jitter"]):
        ops += _maybe(float(cfg["jitter_p"]), ColorJitter(cfg["jitter"], cfg["jitter_brightness"]))
    if float(cfg["grayscale_p"]) > 0:
        ops.append(v2.RandomGrayscale(float(cfg["grayscale_p"])))
    if blur_kernel_size(size) > 1:
        ops += _maybe(float(cfg["blur_p"]), RandomBlur(blur_kernel_size(size), cfg["blur_sigma"]))
    if float(cfg["solarize_p"]) > 0:
        ops.append(RandomSolarize(float(cfg["solarize_p"])))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """A 1- or 3-channel CHW image as 3 channels (gray replicated)."""
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a CHW image with 1 or 3 channels, got shape {tuple(x.shape)}")
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


class Views:
    """Callable: uint8 CHW image -> list of float views (runs per sample in DataLoader workers)."""

    def __init__(self, aug_cfg: dict, mean: Sequence[float], std: Sequence[float]):
        cfgs = view_configs(aug_cfg)
        self.transforms = [view_transform(c, mean, std, where) for c, where in zip(cfgs, view_names(aug_cfg))]
        self.shared_flip_p = float(cfgs[0]["flip_p"]) if cfgs[0]["shared_flip"] else 0.0

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = to_rgb(x)
        if self.shared_flip_p and float(torch.rand(1)) < self.shared_flip_p:
            x = F.horizontal_flip(x)
        return [t(x) for t in self.transforms]

    def __len__(self) -> int:
        return len(self.transforms)


def build_views(aug_cfg: dict, mean: Sequence[float], std: Sequence[float]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The recipe's view pipelines as one per-sample callable: uint8 CHW -> [float 3xSxS, ...]."""
    return Views(aug_cfg, mean, std)


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """No augmentation: resize the shorter side to `size` (bilinear, antialias), center crop,
    normalise; uint8 CHW (1 or 3 channels) -> float 3 x size x size."""
    pipeline = v2.Compose(
        [
            v2.Resize(size, interpolation=InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
    return lambda x: pipeline(to_rgb(x))


def normalization(aug_cfg: dict, manifest: dict | None) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) for 3 channels: ImageNet constants, or the shards' own training-split statistics
    (`mean` / `std` in manifest.json, 1 or 3 values; gray replicated to 3 channels)."""
    mode = aug_cfg.get("normalize", "imagenet")
    if mode == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if mode != "manifest":
        raise UserError(f"augment.normalize = {mode!r}: expected \"imagenet\" or \"manifest\"")
    stats = _find_stats(manifest or {})
    if stats is None:
        raise UserError(
            "augment.normalize = \"manifest\" but the shards' manifest.json has no mean/std; "
            "re-run `sslctl shard`, or use --set augment.normalize=imagenet"
        )
    mean, std = (tuple(float(v) for v in s) for s in stats)
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError(f"manifest.json mean/std must have 1 or 3 channels with std > 0, got mean {mean}, std {std}")
    return mean, std  # type: ignore[return-value]


def _find_stats(manifest: dict):
    """mean/std at the top level of the manifest or one level down (e.g. under "stats")."""
    for table in [manifest, *(v for v in manifest.values() if isinstance(v, dict))]:
        if isinstance(table.get("mean"), (list, tuple, int, float)) and "std" in table:
            as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v]  # noqa: E731
            return as_list(table["mean"]), as_list(table["std"])
    return None
