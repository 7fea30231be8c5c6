"""`sslctl plot`: embedding maps (PCA exact, t-SNE / UMAP when installed) and training curves,
checked as images: a PNG of the right size with the class colours actually drawn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sslctl.embed import embed
from sslctl.errors import UserError
from sslctl.plot import embedding_map, pca_2d, plot, training_curves
from tests.evalkit import make_shards, write_features

TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
         (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    shards = make_shards(root, n_train=100, n_test=300, max_count=300)
    return embed("resnet18", shards, weights="random", input_size=32, bf16=False, workers=0, out=root / "f.safetensors")


def colours_present(png, palette, tolerance=40) -> int:
    """How many palette colours appear in the image (points are drawn with alpha over white)."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    count = 0
    for rgb in palette:
        blended = 0.7 * np.array(rgb) + 0.3 * 255  # alpha 0.7 over white
        if (np.abs(pixels - blended).sum(axis=1) < tolerance).sum() >= 20:
            count += 1
    return count


def test_pca_equals_the_leading_singular_vectors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    xy = pca_2d(x)
    u, s, _ = torch.linalg.svd(x.double() - x.double().mean(0), full_matrices=False)
    assert torch.allclose(xy.double().abs(), (u[:, :2] * s[:2]).abs(), atol=1e-4)
    assert torch.equal(pca_2d(x), xy)  # deterministic, signs included


@pytest.mark.parametrize("method", ["pca", "tsne", pytest.param("umap", marks=pytest.mark.slow)])  # umap: numba JIT
def test_embedding_map_draws_every_class(features, tmp_path, method):
    if method == "tsne":
        pytest.importorskip("sklearn")
    if method == "umap":
        pytest.importorskip("umap")
    out = embedding_map(features, tmp_path / f"{method}.png", method=method, split="test")
    image = Image.open(out)
    assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 500
    assert colours_present(out, TAB10) == 10  # all ten classes (and the legend) are drawn


def test_unlabelled_features_draw_grey_points(tmp_path):
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    feats = write_features(tmp_path / "u.safetensors", {"train": (x, torch.full((50,), -1))})
    out = embedding_map(feats, tmp_path / "u.png", split="train")
    assert colours_present(out, [(128, 128, 128)]) == 1
    assert colours_present(out, TAB10[:7] + TAB10[8:]) == 0  # (tab10's 8th colour is this grey)


def metrics_lines(n_steps=30, monitor_every=10):
    """metrics.jsonl as `sslctl pretrain` writes it: one line per logged step, one per monitor."""
    lines = []
    for step in range(1, n_steps + 1):
        lines.append({"step": step, "epoch": (step - 1) // 10, "loss": 5.0 - 0.1 * step, "lr": 0.06 * (1 - step / n_steps),
                      "images_per_s": 40.0, "data_wait_pct": 5.0})
        if step % monitor_every == 0:
            lines.append({"step": step, "epoch": step // 10 - 1, "monitor": "test", "knn_top1_k20": 60.0 + step,
                          "knn_top1_k200": 55.0 + step})
    return "\n".join(json.dumps(line) for line in lines) + "\n"


def test_training_curves_with_and_without_monitor(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(metrics_lines() + '{"step": 31, "epo')  # a line cut short by a kill
    out = plot(run, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    with_monitor = Image.open(out).size
    assert colours_present(out, TAB10[:2]) == 2  # loss/k=20 blue and lr/k=200 orange lines
    (run / "metrics.jsonl").write_text(metrics_lines(monitor_every=1000))
    without = Image.open(training_curves(run, tmp_path / "plain.png")).size
    assert with_monitor[0] > 1.3 * without[0]  # the third panel is only there with a monitor


def test_bad_plot_inputs(tmp_path, features):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot(tmp_path, tmp_path / "x.png")
    with pytest.raises(UserError, match=r"\.png, \.pdf or \.svg"):
        embedding_map(features, tmp_path / "x.jpg")
    with pytest.raises(UserError, match="expected one of pca, tsne, umap"):
        embedding_map(features, tmp_path / "x.png", method="mds")
    with pytest.raises(UserError, match="no split 'val'"):
        embedding_map(features, tmp_path / "x.png", split="val")


def test_the_map_draws_test_else_val_else_the_first_split(tmp_path, capsys):
    for names, drawn in ((["train", "val"], "val"), (["train", "val", "test"], "test"), (["train"], "train")):
        splits = {name: (torch.randn(20, 4), torch.arange(20) % 2) for name in names}
        feats = write_features(tmp_path / f"{drawn}.safetensors", splits)
        capsys.readouterr()
        embedding_map(feats, tmp_path / f"{drawn}.png")
        assert f"split {drawn}" in capsys.readouterr().err
