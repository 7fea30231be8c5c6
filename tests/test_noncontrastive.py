"""SimSiam, Barlow Twins, VICReg: their losses at inputs with known values, the gradients the
methods hinge on, and the methods' invariants on tiny real networks (ResNet-18 small stem at
16 px, batch 8) built from the real recipes. Two processes: tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslctl.losses.noncontrastive import barlow_twins_terms, cross_correlation, negative_cosine, off_diagonal, vicreg_terms
from sslctl.methods import build_method
from sslctl.recipes import load_recipe

B = 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)


SMALL_HEAD = ["head.projector_hidden=[64, 64]", "head.projector_dim=64"]


def method(name: str, *overrides: str, variant: str = "small"):
    """The recipe's method with a 64-wide projector (SimSiam: its predictor's output too)."""
    head = SMALL_HEAD + (["head.predictor_dim=64"] if name == "simsiam" else [])
    return build_method(load_recipe(name, variant=variant, overrides=[*head, *overrides]))


def views(b: int = B, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)]


def hadamard(n: int) -> torch.Tensor:
    """n x n, entries +-1, orthogonal columns; every column but the first has mean 0."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def decorrelated(n: int, d: int, scale: float = 1.0) -> torch.Tensor:
    """(n, d): d mean-0, mutually orthogonal +-scale columns: std scale*sqrt(n/(n-1)), covariance 0."""
    return scale * hadamard(n)[:, 1 : d + 1]


# ---- losses ---------------------------------------------------------------------------------


def test_off_diagonal_takes_every_entry_but_the_diagonal():
    m = torch.arange(16.0).view(4, 4)
    assert off_diagonal(m).tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14]


def test_negative_cosine_is_minus_one_for_identical_directions_and_its_range():
    p = torch.randn(5, 7)
    assert negative_cosine(p, p.clone()).item() == pytest.approx(-1.0)
    assert negative_cosine(p, 3 * p).item() == pytest.approx(-1.0)  # scale-free
    assert negative_cosine(p, -p).item() == pytest.approx(1.0)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert negative_cosine(a, b).item() == pytest.approx(0.0)


def test_negative_cosine_stops_the_gradient_at_z_and_moves_p_towards_z():
    p, z = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    loss = negative_cosine(p, z)
    loss.backward()
    assert z.grad is None  # the stop-gradient: nothing flows into the target branch
    assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():  # a small step against the gradient raises every cosine
        before = F.cosine_similarity(p, z)
        after = F.cosine_similarity(p - 0.1 * p.grad, z)
    assert (after > before).all()


def test_cross_correlation_is_the_official_bn_standardised_product():
    """The official code: c = bn(z1).T @ bn(z2) / N, bn = BatchNorm1d(affine=False), training mode.
    Values and gradients equal."""
    z1, z2 = (torch.randn(16, 6) * 3 + 1).requires_grad_(), (torch.randn(16, 6) - 2).requires_grad_()
    c = cross_correlation(z1, z2)
    r1, r2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    bn = torch.nn.BatchNorm1d(6, affine=False)
    ref = bn(r1).T @ bn(r2) / 16
    torch.testing.assert_close(c, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn(6, 6)
    (c * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(z1.grad, r1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z2.grad, r2.grad, rtol=1e-4, atol=1e-6)


def test_barlow_twins_on_identical_views_leaves_only_the_redundancy_of_the_correlations():
    """Identical views: C is the correlation matrix, so the invariance term is 0 (up to BN's eps)
    and the redundancy term is the sum of squared off-diagonal correlations. Constructed: columns
    a, a, b, -a with a, b orthogonal: correlations +1 (a, a), -1 (a, -a twice), 0 with b."""
    a, b = decorrelated(32, 2).T
    z = torch.stack([a, a, b, -a], dim=1) * torch.tensor([1.0, 5.0, 0.5, 2.0]) + 3.0  # scale, shift: standardised away
    invariance, redundancy = barlow_twins_terms(cross_correlation(z, z))
    assert invariance.item() == pytest.approx(0.0, abs=1e-6)
    # off-diagonal correlations: (0,1) +1, (0,3) -1, (1,3) -1, each twice; all with b 0
    assert redundancy.item() == pytest.approx(6.0, rel=1e-4)
    lambd = 0.0051
    assert (invariance + lambd * redundancy).item() == pytest.approx(lambd * 6.0, rel=1e-3)
    z = decorrelated(32, 8)
    invariance, redundancy = barlow_twins_terms(cross_correlation(z, z))
    assert invariance.item() == pytest.approx(0.0, abs=1e-6) and redundancy.item() == pytest.approx(0.0, abs=1e-9)
    invariance, _ = barlow_twins_terms(cross_correlation(z, -z))  # anti-correlated views: (1 - (-1))^2 per dim
    assert invariance.item() == pytest.approx(4.0 * 8, rel=1e-4)


def test_vicreg_terms_at_constructed_inputs():
    z = decorrelated(64, 16, scale=2.0)  # std 2 > 1 in every dimension, decorrelated
    s, v, c = vicreg_terms(z, z.clone())
    assert (s.item(), v.item()) == (0.0, 0.0)
    assert c.item() == pytest.approx(0.0, abs=1e-10)
    s, _, _ = vicreg_terms(z, z + 1.0)
    assert s.item() == pytest.approx(1.0)
    # the hinge at gamma = 1: every std 0.5 -> 1 - sqrt(0.25 + 1e-4) per dimension, the two
    # views averaged; collapsed (constant) embeddings -> 1 - sqrt(1e-4) = 0.99
    half = decorrelated(64, 16, scale=0.5 * (63 / 64) ** 0.5)  # unbiased std exactly 0.5
    _, v, _ = vicreg_terms(half, half)
    assert v.item() == pytest.approx(1 - (0.25 + 1e-4) ** 0.5, rel=1e-5)
    _, v, _ = vicreg_terms(torch.ones(64, 16), torch.ones(64, 16))
    assert v.item() == pytest.approx(0.99, rel=1e-6)
    # covariance: columns a, a (variance s2 each): Cov offdiag = s2 twice -> 2 s2^2 / D per view
    a = decorrelated(64, 1, scale=3.0)[:, 0]
    s2 = a.var().item()
    pair = torch.stack([a, a], dim=1)
    _, _, c = vicreg_terms(pair, pair)
    assert c.item() == pytest.approx(2 * (2 * s2**2 / 2), rel=1e-5)


def test_vicreg_variance_hinge_has_no_gradient_above_gamma():
    z = torch.cat([decorrelated(64, 2, scale=2.0), decorrelated(64, 4, scale=0.3)[:, 2:]], dim=1).requires_grad_()
    _, v, _ = vicreg_terms(z, z.detach())
    v.backward()
    per_dim = z.grad.abs().sum(dim=0)
    assert per_dim[:2].tolist() == [0.0, 0.0] and (per_dim[2:] > 0).all()
    with torch.no_grad():  # the step against the gradient spreads the low-variance dimensions
        assert ((z - z.grad)[:, 2:].std(dim=0) > z[:, 2:].std(dim=0)).all()


def test_losses_stay_fp32_under_bf16_autocast():
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [negative_cosine(z1, z2), *barlow_twins_terms(cross_correlation(z1, z2)), *vicreg_terms(z1, z2)]
    assert all(o.dtype == torch.float32 for o in outs)


# ---- SimSiam --------------------------------------------------------------------------------


def test_simsiam_heads_are_the_papers_projector_and_bottleneck_predictor():
    m = build_method(load_recipe("simsiam", variant="small"))
    assert [type(l).__name__ for l in m.projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert m.projector[6].bias is None and not m.projector[7].affine  # BN on the output, no affine
    assert [type(l).__name__ for l in m.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (m.predictor[0].in_features, m.predictor[0].out_features, m.predictor[3].out_features) == (2048, 512, 2048)
    assert m.predictor[0].bias is None and m.predictor[3].bias is not None


def test_simsiam_step_is_the_symmetric_stop_gradient_loss():
    m = method("simsiam", "head.predictor_hidden=[16]")
    ref = method("simsiam", "head.predictor_hidden=[16]")
    ref.load_state_dict(m.state_dict())
    x1, x2 = views()
    out = m.training_step([x1, x2])
    out["loss"].backward()
    z1, z2 = ref.projector(ref.backbone(x1)), ref.projector(ref.backbone(x2))
    p1, p2 = ref.predictor(z1), ref.predictor(z2)
    manual = -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2
    torch.testing.assert_close(out["loss"], manual)
    assert all(p.grad is not None for p in m.predictor.parameters())
    # the projector's gradient is the stop-gradient one: it differs from the gradient without it
    with_sg = torch.autograd.grad(manual, list(ref.projector.parameters()), retain_graph=True)
    no_sg = -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2
    without = torch.autograd.grad(no_sg, list(ref.projector.parameters()))
    for got, want, other in zip((p.grad for p in m.projector.parameters()), with_sg, without):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(w, o, rtol=1e-2, atol=1e-5) for w, o in zip(with_sg, without))
    assert -1 <= out["loss"].item() <= 1 and out["z_std"].item() > 0


def test_simsiam_predictor_keeps_the_peak_lr_through_warmup_and_decay(mini_shards, tmp_path):
    """The real engine's lr writer with the recipe's method.fix_pred_lr: at a warmup step and at a
    decayed step, the predictor's group has the peak lr, the others the schedule's."""
    from sslctl.run_options import RunOptions
    from sslctl.train import Engine

    cfg = load_recipe("simsiam", variant="small", overrides=["optim.batch_size=8", "schedule.epochs=4", "schedule.warmup_epochs=1",
                                                              "head.predictor_dim=64",
                                                              "head.projector_hidden=[64, 64]", "head.projector_dim=64"])
    options = RunOptions(device="cpu", resume="never", seed=0, workers=0, log_every=1, channels_last=False, amp=False)
    engine = Engine(mini_shards, cfg, tmp_path / "run", options)
    predictor = {id(p) for p in engine.method.predictor.parameters()}
    for step in (5, 3 * engine.total_steps // 4):  # in the warmup, in the cosine
        engine.step = step
        engine.train_step(views(8))
        scheduled = engine.lr(step)
        assert 0 < scheduled < engine.peak_lr
        for group in engine.optimizer.param_groups:
            held = {id(p) for p in group["params"]} <= predictor
            assert group["lr"] == (engine.peak_lr if held else scheduled)
    assert sum(len(g["params"]) for g in engine.optimizer.param_groups if g.get("fixed_lr")) == len(predictor)


# ---- Barlow Twins, VICReg -------------------------------------------------------------------


def test_barlow_twins_step_is_scaled_invariance_plus_lambda_redundancy_of_bn_standardised_views():
    m = method("barlow_twins")
    ref = method("barlow_twins")
    ref.load_state_dict(m.state_dict())
    x1, x2 = views()
    out = m.training_step([x1, x2])
    z1, z2 = (ref.projector(ref.backbone(x)) for x in (x1, x2))
    bn = torch.nn.BatchNorm1d(64, affine=False)
    c = bn(z1).T @ bn(z2) / B
    expected = 0.1 * ((1 - c.diagonal()).pow(2).sum() + 0.0051 * off_diagonal(c).pow(2).sum())
    torch.testing.assert_close(out["loss"], expected, rtol=1e-4, atol=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in m.backbone.parameters())


def test_vicreg_step_weights_the_three_terms():
    m = method("vicreg")
    out = m.training_step(views())
    expected = 25 * out["invariance"] + 50 * out["variance"] + out["covariance"]  # small: std_coeff 50
    torch.testing.assert_close(out["loss"].detach(), expected)
    out["loss"].backward()
    assert all(p.grad is not None for p in m.backbone.parameters())
    assert 0 < out["variance"].item() <= 1


@pytest.mark.parametrize("name", ["simsiam", "barlow_twins", "vicreg"])
def test_imagenet_recipes_zero_init_residual_blocks_and_small_ones_do_not(name):
    full = method(name, "encoder.name=resnet18", variant="none")
    last_bns = [blk.bn2.weight for layer in ("layer1", "layer2", "layer3", "layer4") for blk in getattr(full.backbone, layer)]
    assert len(last_bns) == 8 and all(w.abs().sum() == 0 for w in last_bns)
    assert full.backbone.bn1.weight.abs().sum() > 0
    small = method(name)
    assert small.backbone.layer1[0].bn2.weight.abs().sum() > 0
    assert small.embed(views()[0]).shape == (B, 512) and small.embed(views()[0], "projector").shape == (B, 64)


def test_recipes_refuse_another_methods_loss_and_simsiam_mismatched_dims():
    from sslctl.errors import UserError

    with pytest.raises(UserError, match="head.predictor_dim = 2048 must equal head.projector_dim = 64"):
        build_method(load_recipe("simsiam", variant="small", overrides=SMALL_HEAD))
    for name, loss in (("simsiam", "vicreg"), ("barlow_twins", "negative_cosine"), ("vicreg", "barlow_twins")):
        cfg = load_recipe(name, variant="small")
        cfg["loss"]["name"] = loss
        with pytest.raises(UserError, match="loss.name"):
            build_method(cfg)
