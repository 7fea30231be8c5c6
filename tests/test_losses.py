"""Losses of the founding methods against docs/spec/methods.md's sanity values (§10.3) and references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslctl.losses.contrastive import cross_entropy_at, info_nce, keys_and_bank_similarities, nt_xent, regression_loss


def info_nce_global(q, keys, bank, temperature: float, positive_index: torch.Tensor) -> torch.Tensor:
    """AdCo's network loss as methods/adco.py computes it: CE over [the global batch's keys, the
    bank] / t with the positive of local query n at its global index."""
    return cross_entropy_at(keys_and_bank_similarities(q, keys, bank), temperature, positive_index)


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def spec_tolerance(t: float, n_spec: int, n_ours: int, d: int = 128) -> float:
    """3 sigma of (spec value - our value) for random unit vectors: both are sample means whose
    noise is dominated by the positive logit s/t, s ~ N(0, 1/d) (0.08 for MoCo at t=0.07 and
    B=256, so a single seeded draw like the spec's cannot be matched to 0.01)."""
    return 3 / t * math.sqrt(1 / (d * n_spec) + 1 / (d * n_ours))


def same(*shape: int) -> torch.Tensor:
    """Identical unit vectors: every cosine is 1, so every logit is equal."""
    return F.normalize(torch.ones(*shape), dim=-1)


# ---- MoCo: InfoNCE against a queue, positive at index 0 -----------------------------------


@pytest.mark.parametrize("k, spec", [(65536, 11.090), (4096, 8.318)])
def test_info_nce_equal_logits_is_log_k_plus_1(k, spec):
    q = same(256, 128)
    loss = info_nce(q, q, same(k, 128).T, temperature=0.2)
    assert loss.item() == pytest.approx(math.log(k + 1), abs=1e-4)
    assert loss.item() == pytest.approx(spec, abs=5e-4)


@pytest.mark.parametrize("k, t, spec", [(65536, 0.07, 12.05), (65536, 0.2, 11.20), (4096, 0.1, 8.76)])
def test_info_nce_random_unit_vectors(k, t, spec):
    loss = info_nce(unit(512, 128, seed=1), unit(512, 128, seed=2), unit(k, 128, seed=3).T, t)
    assert loss.item() == pytest.approx(spec, abs=spec_tolerance(t, 256, 512))
    assert loss.item() > math.log(k + 1)  # random logits always cost more than equal ones


def test_info_nce_matches_a_loop_with_the_positive_first():
    q, k, queue = unit(5, 8, seed=1), unit(5, 8, seed=2), unit(7, 8, seed=3).T
    ref = sum(-torch.log_softmax(torch.cat([q[n] @ k[n, None].T, q[n] @ queue]) / 0.2, 0)[0] for n in range(5)) / 5
    assert info_nce(q, k, queue, 0.2).item() == pytest.approx(ref.item(), rel=1e-5)


# ---- AdCo: (N+K)-way, positive at the global index ------------------------------------------


def test_info_nce_global_equal_logits_is_log_n_plus_k():
    loss = info_nce_global(same(256, 128), same(256, 128), torch.ones(128, 65536), 0.12, torch.arange(256))
    assert loss.item() == pytest.approx(math.log(256 + 65536), abs=1e-4)
    assert loss.item() == pytest.approx(11.094, abs=5e-4)


def test_info_nce_global_random_unit_vectors():
    bank = torch.randn(128, 65536, generator=torch.Generator().manual_seed(3))  # raw: normalised inside
    loss = info_nce_global(unit(256, 128, seed=1), unit(256, 128, seed=2), bank, 0.12, torch.arange(256))
    assert loss.item() == pytest.approx(11.34, abs=spec_tolerance(0.12, 256, 256))
    assert loss.item() > math.log(256 + 65536)


def test_adco_similarities_normalise_bank_columns_and_put_the_keys_first():
    q, keys = unit(3, 4, seed=1), unit(6, 4, seed=2)
    bank = torch.randn(4, 5) * torch.tensor([0.1, 1.0, 3.0, 10.0, 100.0])
    sims = keys_and_bank_similarities(q, keys, bank)
    assert sims.shape == (3, 11)
    torch.testing.assert_close(sims[:, :6], q @ keys.T)
    torch.testing.assert_close(sims[:, 6:], q @ F.normalize(bank, dim=0))


# ---- SimCLR: NT-Xent ------------------------------------------------------------------------


def nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Textbook reference: 2N views, anchor i's positive is its pair, candidates all j != i;
    TF total = sum over the 2N anchors / N."""
    z = torch.cat([z1, z2]).double()
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(z[i] @ z[j] / t) for j in range(2 * n) if j != i)
        total += -math.log(math.exp(z[i] @ z[pos] / t) / denom)
    return total / n


def test_nt_xent_equals_naive_loop():
    z1, z2 = unit(6, 5, seed=1), unit(6, 5, seed=2)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(nt_xent_loop(z1, z2, 0.5), rel=1e-5)


def test_nt_xent_masks_self_similarity():
    # Two orthogonal pairs whose views coincide: for every anchor the positive has cosine 1, the
    # two views of the other image cosine 0, and its own copy (cosine 1) must not count.
    e = torch.eye(2)
    t = 0.5
    per_anchor = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert nt_xent(e, e, t).item() == pytest.approx(2 * per_anchor, rel=1e-6)


@pytest.mark.parametrize("n, t, spec_equal, spec_random", [(256, 0.5, 6.236, 6.26), (4096, 0.1, 9.011, 9.41)])
def test_nt_xent_sanity_values_tf_total_is_twice_per_anchor(n, t, spec_equal, spec_random):
    equal = nt_xent(same(n, 128), same(n, 128), t).item()
    assert equal == pytest.approx(2 * math.log(2 * n - 1), abs=1e-4)
    assert equal / 2 == pytest.approx(spec_equal, abs=5e-4)
    random = nt_xent(unit(n, 128, seed=1), unit(n, 128, seed=2), t).item()
    assert random / 2 == pytest.approx(spec_random, abs=spec_tolerance(t, 2 * n, 2 * n))


def test_nt_xent_ranks_split_the_global_batch():
    """Two simulated ranks, each with its local anchors against the gathered views: the mean of
    their losses is the one-process loss on the whole batch (positive at rank*B + n)."""
    z1, z2 = unit(8, 5, seed=1), unit(8, 5, seed=2)
    per_rank = [nt_xent(z1[r * 4 : r * 4 + 4], z2[r * 4 : r * 4 + 4], 0.3, z1_all=z1, z2_all=z2, rank=r) for r in (0, 1)]
    assert (sum(per_rank) / 2).item() == pytest.approx(nt_xent(z1, z2, 0.3).item(), rel=1e-6)


# ---- BYOL: regression -----------------------------------------------------------------------


def test_regression_loss_is_2_minus_2cos_and_about_4_symmetric_for_random_vectors():
    p, z = torch.randn(4, 3), torch.randn(4, 3)
    expected = (2 - 2 * F.cosine_similarity(p, z)).mean()
    torch.testing.assert_close(regression_loss(p, z), expected)
    assert regression_loss(p, 5 * p).item() == pytest.approx(0.0, abs=1e-6)
    a, b = unit(4096, 256, seed=1), unit(4096, 256, seed=2)
    assert (regression_loss(a, b) + regression_loss(b, a)).item() == pytest.approx(4.00, abs=0.01)


# ---- precision ------------------------------------------------------------------------------


def test_losses_compute_in_fp32_under_bf16_autocast():
    q, k, queue = unit(16, 8, seed=1), unit(16, 8, seed=2), unit(64, 8, seed=3).T
    ref = info_nce(q.bfloat16().float(), k.bfloat16().float(), queue, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = info_nce(q.bfloat16(), k.bfloat16(), queue, 0.07)
        simclr = nt_xent(q.bfloat16(), k.bfloat16(), 0.1)
        byol = regression_loss(q.bfloat16(), k.bfloat16())
    assert out.dtype == simclr.dtype == byol.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
