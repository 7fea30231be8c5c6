"""The [augment] views for a whole uint8 batch in one call, on the batch's device (issue 7 lever).

`BatchViews(aug_cfg, mean, std)(images)` gives the same views as `sslctl.augment.build_views`
(same keys, same per-view tables, multi-crop, same distributions) but works on a B x C x H x W
uint8 batch at once, so the loader only decodes and collates, and on a GPU the augmentation runs
there. Every random number is drawn on the CPU from torch's global generator (a few per image),
so a seed gives the same augmentations on CPU and GPU.

Per op, as `sslctl.augment` (torchvision semantics):
  crop      torchvision's RandomResizedCrop sampler (10 tries, then the centre crop), vectorised;
            crop + resize by `roi_align` with adaptive sampling (averages when downscaling, like
            antialiasing; bilinear when upscaling)
  jitter    brightness / contrast / saturation / hue, a random order per image
  grayscale luma (0.2989, 0.587, 0.114), 3 channels kept
  blur      per-image sigma, SimCLR kernel size, reflect padding, as a grouped separable conv
  solarize  x >= 0.5 -> 1 - x
Differences from the per-sample path: it computes in float32 from the start (no uint8 rounding
between ops), and for 1-channel input it stays at one channel until normalisation, since
saturation, hue and grayscale do nothing to a gray image (3x less work for Fashion-MNIST).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from sslctl.augment import OPTIONAL, blur_kernel_size, check_view, gaussian_blur, view_configs, view_names

LUMA = (0.2989, 0.587, 0.114)


def _rand(*shape: int) -> torch.Tensor:
    return torch.rand(*shape)


def _uniform(n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * _rand(n)


def crop_boxes(heights: torch.Tensor, widths: torch.Tensor, scale: Sequence[float], ratio: Sequence[float]) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for every image at once -> (B, 4) float boxes
    x1, y1, x2, y2 in pixels. heights/widths: (B,) sizes of each image."""
    n, tries = heights.numel(), 10
    H, W = heights.double().unsqueeze(1), widths.double().unsqueeze(1)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * _rand(n, tries).double())
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(n, tries).double()
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)  # first valid try (0 when none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    u_i, u_j = _rand(n).double(), _rand(n).double()
    i = torch.floor(u_i * (heights.double() - h + 1))
    j = torch.floor(u_j * (widths.double() - w + 1))
    # no valid try: torchvision's fallback, the centred crop at the closest allowed aspect ratio
    none = ~ok.any(dim=1)
    if none.any():
        Hn, Wn = heights[none].double(), widths[none].double()
        in_ratio = Wn / Hn
        fw = torch.where(in_ratio < ratio[0], Wn, torch.where(in_ratio > ratio[1], torch.round(Hn * ratio[1]), Wn))
        fh = torch.where(in_ratio < ratio[0], torch.round(Wn / ratio[0]), Hn)
        w[none], h[none] = fw, fh
        i[none], j[none] = torch.div(Hn - fh, 2, rounding_mode="floor"), torch.div(Wn - fw, 2, rounding_mode="floor")
    return torch.stack([j, i, j + w, i + h], dim=1).float()


def resized_crops(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box b of image b and resize it to size x size: (B, C, H, W) float -> (B, C, size, size)."""
    index = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype).unsqueeze(1)
    rois = torch.cat([index, boxes], dim=1)
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor, additive: bool = False) -> torch.Tensor:
    f = _per_image(factor, x)
    return (x + f if additive else x * f).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean of the grayscale image (torchvision)."""
    f = _per_image(factor, x)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_image(factor, x)
    return (f * x + (1 - f) * _gray(x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` (in turns, per image): RGB -> HSV, h + shift mod 1, -> RGB."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    d = maxc - minc
    safe = torch.where(d > 0, d, torch.ones_like(d))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc)) / 6.0
    h = torch.where(d > 0, h, torch.zeros_like(h))
    h = torch.remainder(h + shift.to(x.dtype).view(-1, 1, 1), 1.0)
    s = d / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    v = maxc
    # HSV -> RGB: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU -> device without making the host wait for the GPU: pinned memory, async copy."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class _BatchView:
    """One view's ops, batched. `sample` draws every random parameter on the CPU; `apply` runs
    the ops on the batch's device with those parameters (no host-device sync on a GPU)."""

    def __init__(self, cfg: dict, where: str):
        cfg = {**OPTIONAL, **cfg}
        check_view(cfg, where)
        self.cfg = cfg
        self.size = int(cfg["crop_size"])
        self.kernel = blur_kernel_size(self.size)
        self.jitter = [float(v) for v in cfg["jitter"]]
        self.additive = cfg["jitter_brightness"] == "additive"

    def sample(self, heights: torch.Tensor, widths: torch.Tensor) -> dict:
        """Random parameters for each image (CPU tensors), in a fixed order of draws."""
        c, n = self.cfg, heights.numel()
        p: dict = {"boxes": crop_boxes(heights, widths, c["crop_scale"], c["crop_ratio"])}
        t = int(c["translate"])
        if t > 0 and float(c["translate_p"]) > 0:
            apply = _rand(n) < float(c["translate_p"])
            shift = torch.where(apply.unsqueeze(1), torch.randint(0, 2 * t + 1, (n, 2)), torch.full((n, 2), t))
            p["rows"] = shift[:, :1] + torch.arange(self.size)  # (n, size) rows of the padded view
            p["cols"] = shift[:, 1:] + torch.arange(self.size)
        if float(c["flip_p"]) > 0 and not c["shared_flip"]:
            p["flip"] = _rand(n) < float(c["flip_p"])
        if any(v > 0 for v in self.jitter) and float(c["jitter_p"]) > 0:
            p["jitter"] = self._sample_jitter(n, _rand(n) < float(c["jitter_p"]))
        if float(c["grayscale_p"]) > 0:
            p["gray"] = _rand(n) < float(c["grayscale_p"])
        if float(c["blur_p"]) > 0 and self.kernel > 1:
            p["blur"] = _rand(n) < float(c["blur_p"])
            p["sigma"] = _uniform(n, *(float(s) for s in c["blur_sigma"]))
        if float(c["solarize_p"]) > 0:
            p["solarize"] = _rand(n) < float(c["solarize_p"])
        return p

    def _sample_jitter(self, n: int, apply: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Four ops in a random order per jittered image -> (op, image indices, factors) in the
        order to run them: slot by slot, each op on the images that have it in that slot."""
        b, c, s, h = self.jitter
        factors = [
            _uniform(n, -b, b) if self.additive else _uniform(n, max(0.0, 1 - b), 1 + b),
            _uniform(n, max(0.0, 1 - c), 1 + c),
            _uniform(n, max(0.0, 1 - s), 1 + s),
            _uniform(n, -h, h),
        ]
        order = torch.argsort(_rand(n, 4), dim=1)  # a random permutation per image
        steps = []
        for slot in range(4):
            for op in range(4):
                if self.jitter[op] > 0:
                    idx = ((order[:, slot] == op) & apply).nonzero().squeeze(1)
                    if len(idx):
                        steps.append((op, idx, factors[op][idx]))
        return steps

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """Float batch in [0, 1] (B, C, H, W) -> this view (B, C, size, size) in [0, 1]."""
        dev = x.device
        x = resized_crops(x, _to(p["boxes"], dev), self.size)
        if "rows" in p:
            x = _translate(x, int(self.cfg["translate"]), _to(p["rows"], dev), _to(p["cols"], dev))
        if "flip" in p:
            x = _where(_to(p["flip"], dev), x.flip(-1), x)
        for op, idx, factor in p.get("jitter", []):
            if op == 0:
                fn = lambda y, f: adjust_brightness(y, f, self.additive)  # noqa: E731
            else:
                fn = (None, adjust_contrast, adjust_saturation, adjust_hue)[op]
            if x.shape[1] == 3 or op < 2:  # saturation and hue leave a gray image as it is
                i = _to(idx, dev)
                x[i] = fn(x[i], _to(factor, dev))
        if "gray" in p and x.shape[1] == 3:
            x = _where(_to(p["gray"], dev), _gray(x).expand_as(x), x)
        if "blur" in p:
            x = _where(_to(p["blur"], dev), gaussian_blur(x, _to(p["sigma"], dev), self.kernel), x)
        if "solarize" in p:
            x = _where(_to(p["solarize"], dev), torch.where(x >= 0.5, 1.0 - x, x), x)
        return x


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def _translate(x: torch.Tensor, t: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Shift by up to +-t px with reflect padding (RandomCrop(size, padding=t, 'reflect'))."""
    n, _, H, W = x.shape
    padded = F.pad(x, (t, t, t, t), mode="reflect").permute(0, 2, 3, 1)
    b = torch.arange(n, device=x.device).view(-1, 1, 1)
    return padded[b, rows.view(n, H, 1), cols.view(n, 1, W)].permute(0, 3, 1, 2)


class BatchViews:
    """Callable: uint8 batch (B, 1|3, H, W) on any device, or a list of uint8 CHW images of
    different sizes -> list of normalised float32 views (B, 3, S, S), [view1 .. viewN, extras]."""

    def __init__(self, aug_cfg: dict, mean: Sequence[float], std: Sequence[float], channels_last: bool = False):
        cfgs = view_configs(aug_cfg)
        self.views = [_BatchView(c, w) for c, w in zip(cfgs, view_names(aug_cfg))]
        self.shared_flip_p = float(cfgs[0]["flip_p"]) if cfgs[0].get("shared_flip") else 0.0
        self.mean_std = torch.tensor([list(mean), list(std)], dtype=torch.float32).view(2, 1, 3, 1, 1)
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        x, heights, widths = self._batch(images)
        dev = x.device
        # every random draw first, on the CPU, in a fixed order: a seed gives the same views on any device
        flip = _rand(len(x)) < self.shared_flip_p if self.shared_flip_p else None
        params = [view.sample(heights, widths) for view in self.views]
        if flip is not None:
            x = _where(_to(flip, dev), x.flip(-1), x)
        mean, std = _to(self.mean_std, dev)
        out = []
        for view, p in zip(self.views, params):
            v = view.apply(x, p)
            v = ((v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else v) - mean) / std
            out.append(v.contiguous(memory_format=torch.channels_last) if self.channels_last else v)
        return out

    def __len__(self) -> int:
        return len(self.views)

    @staticmethod
    def _batch(images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> float batch in [0, 1] and each image's own height and width (CPU tensors)."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] not in (1, 3):
                raise ValueError(f"expected a (B, 1|3, H, W) batch, got shape {tuple(images.shape)}")
            B, _, H, W = images.shape
            return images.float().div_(255.0), torch.full((B,), H), torch.full((B,), W)
        # different sizes: replicate-pad to the largest; each crop box stays inside its own image
        channels = 3 if any(im.shape[0] == 3 for im in images) else 1
        H, W = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
        batch = torch.stack(
            [
                F.pad(im.float().div(255.0).expand(channels, -1, -1).unsqueeze(0), (0, W - im.shape[2], 0, H - im.shape[1]), mode="replicate")[0]
                for im in images
            ]
        )
        return batch, torch.tensor([im.shape[1] for im in images]), torch.tensor([im.shape[2] for im in images])
