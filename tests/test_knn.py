"""Weighted kNN (docs/spec/protocols.md E1): arithmetic, sanity floors, and every backend against a
brute-force reference on real Fashion-MNIST pixels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslctl.errors import UserError
from sslctl.evaluate.knn import class_scores, make_searcher, pair_up, weighted_knn
from sslctl.sources import read_idx


def load_pixels(root, prefix):
    x = torch.from_numpy(read_idx(root / f"{prefix}-images-idx3-ubyte.gz").copy()).reshape(-1, 784).float()
    y = torch.from_numpy(read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
    return x, y


@pytest.fixture(scope="module")
def mini_pixels(mini_idx):
    return (*load_pixels(mini_idx, "train"), *load_pixels(mini_idx, "t10k"))


def reference_knn(bank, bank_labels, queries, query_labels, k, t, num_classes):
    """E1 written out the slow, obvious way in float64: one query at a time."""
    bank = F.normalize(bank.double(), dim=1)
    top1 = top5 = 0
    for q, y in zip(F.normalize(queries.double(), dim=1), query_labels):
        sims = bank @ q
        nn_sims, nn_idx = sims.topk(k)
        scores = [0.0] * num_classes
        for s, i in zip(nn_sims.tolist(), nn_idx.tolist()):
            scores[int(bank_labels[i])] += torch.exp(torch.tensor(s / t)).item()
        voted = sorted((c for c in range(num_classes) if scores[c] > 0), key=lambda c: -scores[c])
        top1 += voted[0] == int(y)
        top5 += int(y) in voted[:5]
    return 100.0 * top1 / len(queries), 100.0 * top5 / len(queries)


def test_vote_arithmetic_by_hand():
    # Query [1, 0]. Bank: cos 1.0 (class 0), cos 0.6 (class 1), cos 0.6 (class 1), cos -1 (class 0).
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    query, query_label = torch.tensor([[2.0, 0.0]]), torch.tensor([1])
    # k=3, T=1: class 0 scores e^1 = 2.718, class 1 scores 2 e^0.6 = 3.644 -> class 1 (right).
    # k=3, T=0.1: class 0 e^10 = 22026, class 1 2 e^6 = 806.9 -> class 0 (wrong).
    # k=1: only the cos-1 neighbour -> class 0 (wrong) at any T.
    res = weighted_knn(bank, labels, query, query_label, ks=[3, 3, 1], temperatures=[1.0, 0.1, 1.0], num_classes=2)
    assert [r["top1"] for r in res] == [100.0, 0.0, 0.0]
    # top-5 counts only classes some neighbour voted for: with k=1 class 1 got no vote
    assert [r["top5"] for r in res] == [100.0, 100.0, 0.0]
    sims = torch.tensor([[1.0, 0.6, 0.6]])
    scores = class_scores(sims, torch.tensor([[0, 1, 1]]), 2, 1.0)
    assert torch.allclose(scores, torch.tensor([[torch.e, 2 * torch.exp(torch.tensor(0.6))]]))


def test_one_hot_features_give_100_and_shuffled_labels_give_chance(mini_pixels):
    _, ytr, _, yte = mini_pixels
    one_hot = lambda y: F.one_hot(y, 10).float()  # noqa: E731
    for r in weighted_knn(one_hot(ytr), ytr, one_hot(yte), yte):
        assert r["top1"] == 100.0 and r["top5"] == 100.0
        assert all(v == 100.0 for v in r["per_class_top1"])
    # Shuffled bank labels: chance (10% top-1, 50% top-5). Queries share neighbours, so one
    # shuffle's accuracy varies far more than a binomial would; average over several.
    xtr, _, xte, _ = mini_pixels
    runs = []
    for seed in range(8):
        shuffled = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))]
        runs.append([(r["top1"], r["top5"]) for r in weighted_knn(xtr, shuffled, xte, yte)])
    mean = torch.tensor(runs).mean(dim=0)  # pairs x (top1, top5)
    assert ((7.5 < mean[:, 0]) & (mean[:, 0] < 12.5)).all(), mean
    assert ((44.0 < mean[:, 1]) & (mean[:, 1] < 56.0)).all(), mean


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_backends_equal_brute_force_reference(mini_pixels, backend):
    xtr, ytr, xte, yte = mini_pixels
    bank, queries = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    # Reference neighbours in float64; ties within float32 rounding may come in either order.
    ref_sims, ref_idx = (queries.double() @ bank.double().T).topk(200, dim=1)
    sims, idx = make_searcher(bank, backend)[0](queries, 200)
    exact = (queries.double()[:, None, :] * bank.double()[idx]).sum(-1)  # our neighbours' true sims
    assert torch.allclose(exact, ref_sims, atol=2e-6), "a neighbour is missing or out of order"
    assert torch.allclose(sims.double(), ref_sims, atol=2e-6)
    differ = idx != ref_idx
    assert differ.float().mean() < 0.05  # only near-ties swap places
    assert torch.allclose(exact[differ], ref_sims[differ], atol=2e-6)

    res = weighted_knn(xtr, ytr, xte[:300], yte[:300], backend=backend)
    for r in res:
        assert (r["top1"], r["top5"]) == reference_knn(xtr, ytr, xte[:300], yte[:300], r["k"], r["temperature"], 10)


def test_default_pairs_and_protocol_strings(mini_pixels):
    xtr, ytr, xte, yte = mini_pixels
    res = weighted_knn(xtr, ytr, xte, yte)
    assert [(r["k"], r["temperature"]) for r in res] == [(20, 0.07), (200, 0.1)]
    assert [r["protocol"] for r in res] == ["weighted-knn/cosine/k=20/T=0.07", "weighted-knn/cosine/k=200/T=0.1"]
    assert res[0]["n_bank"] == 5000 and res[0]["n_eval"] == 1000
    # raw pixels, 5k bank: well above chance, below the full-bank floor of ~85%
    assert 75.0 < res[0]["top1"] < 85.0
    # per-class accuracies average back to top-1 on this balanced-ish test set
    counts = torch.bincount(yte, minlength=10).double()
    per_class = torch.tensor(res[0]["per_class_top1"], dtype=torch.float64)
    assert abs(float((per_class * counts).sum() / counts.sum()) - res[0]["top1"]) < 1e-9


def test_pairing_rules_and_bad_k():
    assert pair_up([20, 200], [0.07, 0.1]) == [(20, 0.07), (200, 0.1)]
    assert pair_up([10, 20], [0.1]) == [(10, 0.1), (20, 0.1)]
    assert pair_up([20], [0.07, 0.1]) == [(20, 0.07), (20, 0.1)]
    with pytest.raises(UserError):
        pair_up([1, 2, 3], [0.1, 0.2])
    with pytest.raises(UserError, match="larger than the bank"):
        weighted_knn(torch.randn(10, 4), torch.zeros(10, dtype=torch.long), torch.randn(2, 4), torch.zeros(2, dtype=torch.long), ks=[20], temperatures=[0.1])


def test_raw_pixels_on_full_fashion_mnist_reach_the_known_floor(fmnist_idx):
    xtr, ytr = load_pixels(fmnist_idx, "train")
    xte, yte = load_pixels(fmnist_idx, "t10k")
    res = weighted_knn(xtr, ytr, xte, yte)
    assert 84.0 < res[0]["top1"] < 87.0  # docs/spec/protocols.md E1: raw pixels ~85% at k=20
