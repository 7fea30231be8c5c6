"""Batched views: each op equals torchvision's on the same parameters; the views match the
per-sample pipeline's shapes and statistics; per-view parameters, seeds, lists of sizes."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from sslctl.augment import build_views, view_configs
from sslctl.augment_batch import (
    BatchViews,
    _BatchView,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    crop_boxes,
    gaussian_blur,
    resized_crops,
)
from sslctl.paths import EMBEDDED_DATASET
from sslctl.recipes import list_recipes, load_recipe
from tests.test_augment import UNIT, _plain


@pytest.fixture(scope="module")
def fmnist() -> torch.Tensor:
    with gzip.open(EMBEDDED_DATASET / "train-images-idx3-ubyte.gz") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return torch.from_numpy(data[: 512 * 784].copy()).view(512, 1, 28, 28)


@pytest.fixture(scope="module")
def colour(fmnist) -> torch.Tensor:
    """Fashion-MNIST tinted per channel, so hue and saturation have something to change."""
    return torch.cat([fmnist, (fmnist.float() * 0.6).to(torch.uint8), (fmnist.float() * 0.3 + 40).to(torch.uint8)], 1)


def test_colour_ops_equal_torchvision():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 20, 24)
    f = torch.tensor([0.5, 0.9, 1.2, 1.6])
    for mine, theirs in [(adjust_brightness, TF.adjust_brightness), (adjust_contrast, TF.adjust_contrast), (adjust_saturation, TF.adjust_saturation)]:
        expected = torch.stack([theirs(x[i], float(f[i])) for i in range(4)])
        assert torch.allclose(mine(x.clone(), f), expected, atol=1e-6), mine.__name__
    shift = torch.tensor([-0.4, -0.1, 0.2, 0.5])
    expected = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(4)])
    assert torch.allclose(adjust_hue(x.clone(), shift), expected, atol=1e-5)
    assert torch.equal(adjust_brightness(torch.zeros(2, 1, 3, 3), torch.tensor([0.25, -0.5]), additive=True)[:, 0, 0, 0], torch.tensor([0.25, 0.0]))


def test_blur_equals_torchvision_per_image_sigma():
    torch.manual_seed(1)
    x = torch.rand(4, 3, 16, 20)
    sigma = torch.tensor([0.3, 0.8, 1.5, 2.0])
    expected = torch.stack([TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2) for i in range(4)])
    assert torch.allclose(gaussian_blur(x, sigma, 5), expected, atol=1e-6)


def test_crop_boxes_follow_torchvision_sampler():
    torch.manual_seed(2)
    n = 2000
    H, W = torch.full((n,), 28), torch.full((n,), 40)
    boxes = crop_boxes(H, W, (0.2, 1.0), (3 / 4, 4 / 3))
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 40).all() and (y2 <= 28).all()
    w, h = x2 - x1, y2 - y1
    area = w * h / (28 * 40)
    assert area.min() > 0.15 and area.max() <= 1.0  # scale (0.2, 1) up to rounding
    assert ((w / h) > 0.6).all() and ((w / h) < 1.5).all()
    # the same distribution as torchvision's own sampler (rejections of too-wide crops included)
    from torchvision.transforms import RandomResizedCrop

    ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, 28, 40), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]).float()
    ref_area = ref[:, 2] * ref[:, 3] / (28 * 40)
    assert float(area.mean()) == pytest.approx(float(ref_area.mean()), abs=0.02)
    assert float((w / h).mean()) == pytest.approx(float((ref[:, 3] / ref[:, 2]).mean()), abs=0.02)
    assert float(x1.mean()) == pytest.approx(float(ref[:, 1].mean()), abs=0.5)
    # impossible requests fall back to the centred crop at the closest allowed ratio
    fb = crop_boxes(torch.tensor([20]), torch.tensor([20]), (1.0, 1.0), (2.0, 3.0))
    assert fb.tolist() == [[0.0, 5.0, 20.0, 15.0]]


def test_resized_crops_identity_and_linear_ramp():
    x = torch.rand(3, 2, 12, 12)
    full = torch.tensor([[0.0, 0.0, 12.0, 12.0]] * 3)
    assert torch.allclose(resized_crops(x, full, 12), x, atol=1e-6)
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16).contiguous()
    up = resized_crops(ramp, torch.tensor([[4.0, 0.0, 8.0, 16.0]]), 8)  # 4 px wide -> 8 px
    # bilinear resampling of a linear ramp is exact: pixel centres 4 + (o + 0.5) / 2 - 0.5
    assert torch.allclose(up[0, 0, 0], torch.tensor([3.75 + 0.5 * o for o in range(8)]))


@pytest.mark.parametrize("name", [n for n, _ in list_recipes()])
def test_every_recipe_gives_the_per_sample_shapes(name, fmnist):
    aug = load_recipe(name, image_size=28)["augment"]
    torch.manual_seed(0)
    batched = BatchViews(aug, (0.3,) * 3, (0.35,) * 3)(fmnist[:8])
    single = build_views(aug, (0.3,) * 3, (0.35,) * 3)(fmnist[0])
    assert [tuple(v.shape) for v in batched] == [(8, *s.shape) for s in single]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in batched)


@pytest.mark.parametrize("channels", [1, 3])
def test_statistics_match_the_per_sample_pipeline(channels, fmnist, colour):
    """Same distributions: mean, spread, colour spread and sharpness of the views agree."""
    images = fmnist if channels == 1 else colour
    aug = load_recipe("moco_v2", image_size=28)["augment"] | {"blur_p": 0.5, "solarize_p": 0.2, "crop_size": 28}
    torch.manual_seed(0)
    batched = BatchViews(aug, *UNIT)(images)[0]
    per_sample = torch.stack([build_views(aug, *UNIT)(x)[0] for x in images])
    for stat in (
        lambda v: v.mean(),
        lambda v: v.std(),
        lambda v: (v - v.mean(1, keepdim=True)).abs().mean() * 5,
        lambda v: v.diff(dim=-1).abs().mean() * 5,
    ):
        assert float(stat(batched)) == pytest.approx(float(stat(per_sample)), abs=0.025)


def test_per_view_blur_really_differs(fmnist):
    aug = _plain(view1={"blur_p": 1.0}, view2={"blur_p": 0.0}, blur_p=0.5, blur_sigma=[1.0, 2.0])
    v1, v2 = (_BatchView(c, "augment") for c in view_configs(aug))
    plain = _BatchView(view_configs(_plain())[0], "augment")
    x = fmnist[:32].float() / 255
    hw = torch.full((32,), 28)
    torch.manual_seed(3)
    p2 = v2.sample(hw, hw)
    torch.manual_seed(3)
    assert torch.equal(v2.apply(x, p2), plain.apply(x, plain.sample(hw, hw)))
    torch.manual_seed(3)
    blurred = v1.apply(x, v1.sample(hw, hw))
    torch.manual_seed(3)
    sharp = plain.apply(x, plain.sample(hw, hw))
    assert (blurred.diff(dim=-1).abs().mean((1, 2, 3)) < sharp.diff(dim=-1).abs().mean((1, 2, 3))).all()


def test_solarize_grayscale_and_normalise_in_batch(colour):
    x = colour[:16]
    out = BatchViews(_plain(solarize_p=1.0, grayscale_p=1.0), (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))(x)[0]
    gray = (0.2989 * x[:, 0].float() + 0.587 * x[:, 1].float() + 0.114 * x[:, 2].float()) / 255
    solar = torch.where(gray >= 0.5, 1 - gray, gray)
    for c, m in enumerate((0.1, 0.2, 0.3)):
        assert torch.allclose(out[:, c], (solar - m) / 0.5, atol=1e-5)


def test_seeds_lists_of_sizes_and_channels_last(fmnist):
    views = BatchViews(load_recipe("moco_v2", image_size=28)["augment"], *UNIT, channels_last=True)
    torch.manual_seed(5)
    a = views(fmnist[:16])
    torch.manual_seed(5)
    b = views(fmnist[:16])
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a[0], a[1])
    assert a[0].is_contiguous(memory_format=torch.channels_last)
    mixed = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(20, 30), (40, 25), (32, 32)]] + [fmnist[0]]
    out = views(mixed)
    assert [tuple(v.shape) for v in out] == [(4, 3, 32, 32)] * 2
    with pytest.raises(ValueError, match="B, 1|3, H, W"):
        views(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))


def test_translate_and_shared_flip(fmnist):
    x = fmnist[:8]
    still = BatchViews(_plain(translate=4, translate_p=0.0), *UNIT)(x)[0]
    assert torch.allclose(still[:, 0], x[:, 0].float() / 255)
    torch.manual_seed(4)
    moved = BatchViews(_plain(translate=4, translate_p=1.0), *UNIT)(x)[0]
    assert moved.shape == (8, 3, 28, 28) and not torch.allclose(moved[:, 0], x[:, 0].float() / 255)
    torch.manual_seed(6)
    v1, v2 = BatchViews(_plain(flip_p=0.5, shared_flip=True), *UNIT)(x)
    assert torch.equal(v1, v2)
    flipped = [torch.allclose(v1[i, 0], x[i, 0].flip(-1).float() / 255) for i in range(8)]
    assert any(flipped) and not all(flipped)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
def test_cuda_gives_the_cpu_result(colour):
    views = BatchViews(load_recipe("swav", image_size=28)["augment"] | {"blur_p": 0.5}, *UNIT)
    torch.manual_seed(7)
    cpu = views(colour[:64])
    batch = colour[:64].cuda()
    views(batch)  # warm-up: first-call allocations and library loads may synchronise
    torch.cuda.synchronize()
    torch.manual_seed(7)
    torch.cuda.set_sync_debug_mode("error")  # after that the host never waits for the GPU
    try:
        gpu = views(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.allclose(c, g.cpu(), atol=1e-4) for c, g in zip(cpu, gpu))
