"""View pipelines: shapes and counts, per-view parameters, the primitives' math, normalisation, seeds."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from sslctl.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitter,
    RandomBlur,
    RandomSolarize,
    blur_kernel_size,
    build_views,
    eval_transform,
    normalization,
    view_configs,
    view_transform,
)
from sslctl.errors import UserError
from sslctl.paths import EMBEDDED_DATASET
from sslctl.recipes import list_recipes, load_recipe

UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean/std that leave x/255 as it is


@pytest.fixture(scope="module")
def fmnist() -> torch.Tensor:
    """The first 64 embedded Fashion-MNIST training images as uint8 N x 1 x 28 x 28."""
    with gzip.open(EMBEDDED_DATASET / "train-images-idx3-ubyte.gz") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return torch.from_numpy(data[: 64 * 784].copy()).view(64, 1, 28, 28)


def _plain(**changes) -> dict:
    """An [augment] table that does nothing random (full-image crop, no flip/colour/blur)."""
    aug = dict(
        views=2, crop_size=28, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], flip_p=0.0,
        jitter=[0.0, 0.0, 0.0, 0.0], jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
        blur_sigma=[0.1, 2.0], solarize_p=0.0, normalize="imagenet",
    )  # fmt: skip
    aug.update(changes)
    return aug


@pytest.mark.parametrize("name", [n for n, _ in list_recipes()])
def test_every_recipe_builds_views_of_the_right_count_shape_and_dtype(name, fmnist):
    aug = load_recipe(name, image_size=28)["augment"]
    mean, std = normalization(aug, {"mean": [0.286], "std": [0.353]})
    views = build_views(aug, mean, std)(fmnist[0])
    sizes = [aug.get("view1", {}).get("crop_size", aug["crop_size"])] * aug["views"]
    sizes += [aug.get("extra_crop_size")] * aug.get("extra_crops", 0)
    assert [tuple(v.shape) for v in views] == [(3, s, s) for s in sizes]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_multi_crop_order_sizes_and_scales():
    aug = load_recipe("moco_v2")["augment"] | {"extra_crops": 3, "extra_crop_size": 16, "extra_crop_scale": [0.05, 0.14], "crop_size": 32}
    cfgs = view_configs(aug)
    assert [c["crop_size"] for c in cfgs] == [32, 32, 16, 16, 16]
    assert [c["crop_scale"] for c in cfgs][2:] == [[0.05, 0.14]] * 3
    x = torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8)
    assert [v.shape[-1] for v in build_views(aug, IMAGENET_MEAN, IMAGENET_STD)(x)] == [32, 32, 16, 16, 16]


def test_per_view_blur_really_differs(fmnist):
    """BYOL-style: view1 blur_p 1, view2 blur_p 0 -> view2 is never blurred, view1 always is."""
    aug = _plain(view1={"blur_p": 1.0}, view2={"blur_p": 0.0}, blur_p=0.5, blur_sigma=[1.0, 2.0])  # sigma 0.1 is a no-op
    v1, v2 = view_configs(aug)
    assert (v1["blur_p"], v2["blur_p"]) == (1.0, 0.0)
    unblurred = view_transform(_plain(), *UNIT)
    t1, t2 = view_transform(v1, *UNIT), view_transform(v2, *UNIT)
    for i in range(20):
        x = fmnist[i].expand(3, -1, -1)
        torch.manual_seed(i)
        assert torch.equal(t2(x), unblurred(x))
        torch.manual_seed(i)
        blurred = t1(x)
        assert not torch.equal(blurred, unblurred(x))
        # a blur removes high frequencies: smaller neighbour differences
        assert blurred.diff(dim=-1).abs().mean() < unblurred(x).diff(dim=-1).abs().mean()


def test_byol_views_are_asymmetric():
    aug = load_recipe("byol")["augment"] if "byol" in dict(list_recipes()) else None
    if aug is None:
        pytest.skip("recipes/byol.toml not written yet")
    v1, v2 = view_configs(aug)
    assert (v1["blur_p"], v1["solarize_p"]) == (1.0, 0.0)
    assert (v2["blur_p"], v2["solarize_p"]) == (0.1, 0.2)


def test_solarize_math():
    x = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, -1, -1)
    out = RandomSolarize(1.0)(x)
    v = torch.arange(256)
    expected = torch.where(v < 128, v, 255 - v).to(torch.uint8).view(1, 16, 16).expand(3, -1, -1)
    assert torch.equal(out, expected)
    f = torch.tensor([0.0, 0.25, 0.49, 0.5, 0.75, 1.0]).view(1, 1, 6)
    assert RandomSolarize(1.0)(f).flatten().tolist() == pytest.approx([0.0, 0.25, 0.49, 0.5, 0.25, 0.0])
    assert torch.equal(RandomSolarize(0.0)(x), x)
    # in a pipeline the solarised view is 1 - x/255 above the threshold
    img = torch.full((3, 28, 28), 200, dtype=torch.uint8)
    out = view_transform(view_configs(_plain(solarize_p=1.0))[0], *UNIT)(img)
    assert torch.allclose(out, torch.full_like(out, 55 / 255))


def test_grayscale_keeps_three_equal_channels_with_luma_weights():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    out = view_transform(view_configs(_plain(grayscale_p=1.0))[0], *UNIT)(x)
    assert out.shape == (3, 28, 28)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    luma = (0.2989 * x[0].float() + 0.587 * x[1].float() + 0.114 * x[2].float()) / 255
    assert (out[0] - luma).abs().max() < 1.5 / 255


def test_gray_input_is_replicated(fmnist):
    out = build_views(_plain(), *UNIT)(fmnist[0])
    assert all(v.shape == (3, 28, 28) for v in out)
    assert torch.equal(out[0][0], out[0][2]) and torch.allclose(out[0][0], fmnist[0][0].float() / 255)


def test_normalisation_constants_and_manifest():
    assert normalization({"normalize": "imagenet"}, None) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = normalization({"normalize": "manifest"}, {"mean": [0.2860], "std": [0.3530]})
    assert mean == (0.286,) * 3 and std == (0.353,) * 3
    mean, std = normalization({"normalize": "manifest"}, {"stats": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}})
    assert mean == (0.1, 0.2, 0.3) and std == (0.4, 0.5, 0.6)
    with pytest.raises(UserError, match="no mean/std"):
        normalization({"normalize": "manifest"}, {"splits": {}})
    # the pipeline applies them: (x / 255 - mean) / std per channel
    x = torch.full((3, 8, 8), 51, dtype=torch.uint8)  # 0.2
    out = view_transform(view_configs(_plain(crop_size=8))[0], IMAGENET_MEAN, IMAGENET_STD)(x)
    for c in range(3):
        assert torch.allclose(out[c], torch.tensor((0.2 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]), atol=1e-6)


def test_determinism_under_manual_seed(fmnist):
    views = build_views(load_recipe("moco_v2", image_size=28)["augment"], IMAGENET_MEAN, IMAGENET_STD)
    torch.manual_seed(7)
    a = [views(x) for x in fmnist[:4]]
    torch.manual_seed(7)
    b = [views(x) for x in fmnist[:4]]
    torch.manual_seed(8)
    c = [views(x) for x in fmnist[:4]]
    assert all(torch.equal(u, v) for s, t in zip(a, b) for u, v in zip(s, t))
    assert not all(torch.equal(u, v) for s, t in zip(a, c) for u, v in zip(s, t))
    assert not torch.equal(a[0][0], a[0][1])  # the two views of one image differ


def test_jitter_brightness_additive_vs_multiplicative():
    black = torch.zeros(3, 4, 4, dtype=torch.uint8)
    mult = ColorJitter([0.8, 0, 0, 0], "multiplicative")
    add = ColorJitter([0.8, 0, 0, 0], "additive")
    torch.manual_seed(0)
    assert all(torch.equal(mult(black), black) for _ in range(10))  # 0 * factor = 0
    shifts = [int(add(black)[0, 0, 0]) for _ in range(20)]
    assert max(shifts) > 0 and max(shifts) <= round(0.8 * 255)  # + U[-b, b], clipped at 0
    grey = torch.full((3, 4, 4), 0.5)
    deltas = {round(float(add(grey)[0, 0, 0]) - 0.5, 6) for _ in range(20)}
    assert len(deltas) > 10 and all(-0.5 <= d <= 0.5 for d in deltas)


def test_separable_blur_equals_torchvision(fmnist):
    x = fmnist[7].expand(3, -1, -1).contiguous()
    ours = RandomBlur(5, [1.3, 1.3])(x)
    theirs = TF.gaussian_blur(x, [5, 5], [1.3, 1.3])
    assert ours.dtype == torch.uint8 and (ours.int() - theirs.int()).abs().max() <= 1
    f = x.float() / 255
    assert torch.allclose(RandomBlur(23, [2.0, 2.0])(f), TF.gaussian_blur(f, [23, 23], [2.0, 2.0]), atol=1e-5)


def test_blur_kernel_sizes():
    assert blur_kernel_size(224) == 23 and blur_kernel_size(96) == 9 and blur_kernel_size(32) == 3
    assert all(blur_kernel_size(s) % 2 == 1 for s in range(1, 300))


def test_shared_flip_flips_every_view_together(fmnist):
    views = build_views(_plain(flip_p=0.5, shared_flip=True), *UNIT)
    x = fmnist[3]
    plain, flipped = x.float().div(255).expand(3, -1, -1), x.float().div(255).flip(-1).expand(3, -1, -1)
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        v1, v2 = views(x)
        assert torch.equal(v1, v2)
        seen.add("flip" if torch.allclose(v1, flipped) else "plain" if torch.allclose(v1, plain) else "?")
    assert seen == {"flip", "plain"}


def test_translate_shifts_with_reflect_padding(fmnist):
    t = view_transform(view_configs(_plain(translate=4, translate_p=1.0))[0], *UNIT)
    x = fmnist[5].expand(3, -1, -1)
    torch.manual_seed(1)
    outs = [t(x) for _ in range(8)]
    assert all(o.shape == (3, 28, 28) for o in outs)
    assert any(not torch.allclose(o, x.float() / 255) for o in outs)


def test_eval_transform_resizes_crops_and_normalises():
    t = eval_transform(32, *UNIT)
    assert t(torch.zeros(1, 28, 28, dtype=torch.uint8)).shape == (3, 32, 32)
    wide = torch.zeros(3, 40, 80, dtype=torch.uint8)
    wide[:, :, 30:50] = 255  # a white band in the middle survives the center crop
    out = t(wide)
    assert out.shape == (3, 32, 32) and out[:, :, 16].min() > 0.99 and out[:, :, 0].max() < 0.01
    const = eval_transform(16, IMAGENET_MEAN, IMAGENET_STD)(torch.full((3, 20, 20), 255, dtype=torch.uint8))
    assert torch.allclose(const[1], torch.tensor((1 - 0.456) / 0.224))


@pytest.mark.parametrize(
    "change, key",
    [({"jitter_p": 1.5}, "augment.jitter_p"), ({"crop_scale": [0.5, 0.2]}, "augment.crop_scale"), ({"jitter": [0.4, 0.4, 0.4, 0.7]}, "augment.jitter")],
)
def test_bad_values_are_user_errors(change, key):
    with pytest.raises(UserError, match=key):
        build_views(_plain(**change), *UNIT)


def test_bad_view_table_and_channels():
    with pytest.raises(UserError, match="view1 .. view2"):
        build_views(_plain(view3={"blur_p": 1.0}), *UNIT)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        build_views(_plain(), *UNIT)(torch.zeros(4, 8, 8, dtype=torch.uint8))
