"""Linear probes: E2 reaches scikit-learn's logistic regression on real features; its parts
(standardisation, stratified hold-out, wd choice) do what E2 says; E3 trains on a frozen encoder."""

from __future__ import annotations

import warnings

import pytest
import torch

from sslctl.embed import embed, load_split
from sslctl.errors import UserError
from sslctl.evaluate.linear import augmented_probe, linear_probe, standardize, stratified_holdout
from sslctl.sources import read_idx
from tests.evalkit import make_shards, make_unlabelled_shards


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def pixels(root, prefix, n):
    x = torch.from_numpy(read_idx(root / f"{prefix}-images-idx3-ubyte.gz")[:n].copy()).reshape(n, -1).float()
    y = torch.from_numpy(read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")[:n].copy()).long()
    return x, y


def sklearn_top1(train_x, train_y, eval_x, eval_y) -> float:
    """The reference: scikit-learn's LogisticRegression (defaults) on standardised features."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs may stop at max_iter; that is the reference as users run it
        clf = LogisticRegression(max_iter=200).fit(scaler.transform(train_x.numpy()), train_y.numpy())
    return 100.0 * clf.score(scaler.transform(eval_x.numpy()), eval_y.numpy())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("linear"), n_train=2000, n_test=500, max_count=1000)


def test_raw_pixels_probe_reaches_sklearn(mini_idx):
    train = pixels(mini_idx, "train", 2000)
    test = pixels(mini_idx, "t10k", 1000)
    res = linear_probe(*train, *test)
    reference = sklearn_top1(*train, *test)
    assert res["top1"] >= reference - 1.0, (res, reference)
    assert res["protocol"].startswith("linear/precomputed/") and res["epochs"] == 100
    assert res["wd"] in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    assert res["heldout_top1"][f"{res['wd']:g}"] == max(res["heldout_top1"].values())
    assert res["top1"] <= res["top5"] <= 100.0


def test_random_resnet_probe_reaches_sklearn(shards, tmp_path):
    feats = embed("resnet18", shards, weights="random", input_size=32, bf16=False, workers=0, out=tmp_path / "f.safetensors")
    train, test = load_split(feats, "train"), load_split(feats, "test")
    res = linear_probe(*train, *test)
    reference = sklearn_top1(*train, *test)
    assert res["top1"] >= reference - 1.0, (res, reference)
    assert res["top1"] > 60.0  # 10 classes: far above chance


def test_separable_features_give_100_and_labels_that_do_not_fit_give_chance():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(60)
    x = torch.nn.functional.one_hot(y, 10).float() + 0.1 * torch.randn(600, 10, generator=g)
    res = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert res["top1"] == 100.0
    noise = torch.randn(600, 20, generator=g)
    res = linear_probe(noise[:400], y[:400], noise[400:], y[400:])
    assert res["top1"] < 25.0  # chance is 10%


def test_standardize_uses_train_statistics_only():
    train = torch.tensor([[0.0, 10.0], [2.0, 30.0]])
    other = torch.tensor([[1.0, 20.0], [100.0, 20.0]])
    s_train, s_other = standardize(train, other)
    assert torch.allclose(s_train.mean(0), torch.zeros(2))
    std = train.std(0)
    assert torch.allclose(s_other, (other - train.mean(0)) / std)


def test_stratified_holdout_takes_ten_percent_of_every_class():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20 + [3] * 1)
    fit, held = stratified_holdout(labels, 0.1, seed=0)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(len(labels)))  # a partition
    assert torch.bincount(labels[held], minlength=4).tolist() == [5, 3, 2, 0]
    assert torch.equal(held, stratified_holdout(labels, 0.1, seed=0)[1])  # seeded
    assert not torch.equal(held, stratified_holdout(labels, 0.1, seed=1)[1])


def test_augmented_probe_trains_on_a_frozen_encoder(tmp_path):
    # a random encoder file (the protocol needs an sslctl encoder: input size + normalisation)
    from sslctl.encoder_io import save_encoder
    from sslctl.encoders import build_backbone

    shards = make_shards(tmp_path, n_train=500, n_test=200, max_count=500)
    torch.manual_seed(0)
    encoder = save_encoder(tmp_path / "encoder.safetensors", build_backbone("resnet18"), small_stem=False,
                           input_size=32, mean=[0.28] * 3, std=[0.35] * 3, recipe="none")
    # lr 0.1, not MoCo's 30: features of a random network are large; 30 suits trained ones
    res = augmented_probe(str(encoder), str(shards), epochs=2, lr=0.1, batch_size=50, workers=0, bf16=False)
    assert res["protocol"] == "linear/augment/crop32-pad4+flip/sgd-lr=0.1/epochs=2"
    assert res["n_train"] == 500 and res["n_eval"] == 200
    assert res["top1"] > 30.0  # two epochs on random features: well above the 10% of chance


def test_augmented_probe_refuses_unlabelled_shards(tmp_path):
    unlabelled = make_unlabelled_shards(tmp_path)
    with pytest.raises(UserError, match="no labels"):
        augmented_probe("resnet18", str(unlabelled), epochs=1)
