"""Optimisers (LARS against a hand computation, weight-decay exclusions) and schedules at known points."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslctl.errors import UserError
from sslctl.optim import LARS, build_optimizer, cosine_tau, lr_at, set_lr


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def test_lars_matches_hand_computation_with_exclusions():
    """Two steps (lr changes between them: SimCLR's lr sits inside the momentum buffer)."""
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))  # 2-D: decayed and adapted
    b = nn.Parameter(torch.tensor([0.2, -0.4]))  # 1-D (bias / BN): neither
    opt = build_optimizer([("w", w), ("b", b)], {"name": "lars", "momentum": 0.9, "weight_decay": 0.01}, lr=0.5)
    assert isinstance(opt, LARS)

    wv, bv = [1.0, -2.0, 0.5, 3.0], [0.2, -0.4]
    mw, mb = [0.0] * 4, [0.0] * 2
    grads = [([0.1, 0.2, -0.3, 0.4], [1.0, -1.0]), ([-0.2, 0.05, 0.1, 0.3], [0.5, 0.25])]
    for lr, (gw, gb) in zip([0.5, 0.25], grads):
        set_lr(opt, lr)
        w.grad = torch.tensor(gw).view(2, 2)
        b.grad = torch.tensor(gb)
        opt.step()
        # hand computation, docs/spec/methods.md §0.4
        d = [g + 0.01 * x for g, x in zip(gw, wv)]
        trust = 0.001 * _norm(wv) / _norm(d)
        mw = [0.9 * m + lr * trust * g for m, g in zip(mw, d)]
        wv = [x - m for x, m in zip(wv, mw)]
        mb = [0.9 * m + lr * 1.0 * g for m, g in zip(mb, gb)]  # no wd, trust 1
        bv = [x - m for x, m in zip(bv, mb)]
        assert w.detach().flatten().tolist() == pytest.approx(wv, rel=1e-6, abs=1e-9)
        assert b.detach().tolist() == pytest.approx(bv, rel=1e-6, abs=1e-9)


def test_lars_without_exclusions_adapts_every_tensor_and_zero_norm_trust_is_one():
    b = nn.Parameter(torch.tensor([0.0, 0.0]))  # |w| = 0 -> trust 1
    c = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = build_optimizer([("b", b), ("c", c)], {"name": "lars", "momentum": 0.0, "weight_decay": 0.0, "exclude_bn_bias": False}, lr=1.0)
    assert len(opt.param_groups) == 1
    b.grad = torch.tensor([1.0, 1.0])
    c.grad = torch.tensor([0.0, 2.0])
    opt.step()
    assert b.tolist() == [-1.0, -1.0]
    trust = 0.001 * 5.0 / 2.0
    assert c.tolist() == pytest.approx([3.0, 4.0 - trust * 2.0])


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    "cfg, decayed_1d",
    [
        ({"name": "sgd", "weight_decay": 1e-4}, True),  # SGD default: everything decays (MoCo)
        ({"name": "sgd", "weight_decay": 1e-4, "exclude_bn_bias": True}, False),
        ({"name": "lars", "weight_decay": 1e-6}, False),  # LARS default: excluded (SimCLR, BYOL)
        ({"name": "adamw", "weight_decay": 0.05, "exclude_bn_bias": True}, False),
    ],
)
def test_groups_and_weight_decay_exclusion(cfg, decayed_1d):
    net = _net()
    net[0].bias.requires_grad_(False)  # frozen parameters never reach the optimiser
    opt = build_optimizer(net, cfg, lr=0.1)
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert id(net[0].bias) not in by_id
    assert by_id[id(net[0].weight)]["weight_decay"] == cfg["weight_decay"]
    assert by_id[id(net[3].weight)]["weight_decay"] == cfg["weight_decay"]
    for p in (net[1].weight, net[1].bias, net[3].bias):
        assert by_id[id(p)]["weight_decay"] == (cfg["weight_decay"] if decayed_1d else 0.0)
    assert all(g["lr"] == 0.1 for g in opt.param_groups)


def test_sgd_is_coupled_l2_and_adamw_is_decoupled():
    w = nn.Parameter(torch.tensor([2.0]).view(1, 1))
    opt = build_optimizer([w], {"name": "sgd", "momentum": 0.0, "weight_decay": 0.5}, lr=0.1)
    w.grad = torch.tensor([[1.0]])
    opt.step()
    assert w.item() == pytest.approx(2.0 - 0.1 * (1.0 + 0.5 * 2.0))
    v = nn.Parameter(torch.tensor([[2.0]]))
    opt = build_optimizer([v], {"name": "adamw", "weight_decay": 0.5, "betas": [0.8, 0.999]}, lr=0.1)
    assert opt.param_groups[0]["betas"] == (0.8, 0.999)
    v.grad = torch.tensor([[1.0]])
    opt.step()  # decoupled: w * (1 - lr*wd), then Adam's first step moves by ~lr
    assert v.item() == pytest.approx(2.0 * (1 - 0.05) - 0.1, rel=1e-4)


def test_bad_optimizer_name_and_no_parameters():
    with pytest.raises(UserError, match="optim.name = 'rmsprop'"):
        build_optimizer(_net(), {"name": "rmsprop"}, lr=0.1)
    frozen = _net().requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        build_optimizer(frozen, {"name": "sgd"}, lr=0.1)


# ---------------------------------------------------------------- schedules


def test_warmup_then_cosine_per_step():
    cfg = {"epochs": 100, "warmup_epochs": 10, "lr_schedule": "cosine", "per": "step", "final_lr": 0.0}
    spe = 100
    assert lr_at(0, spe, cfg, 1.0) == 0.0  # SimCLR/BYOL warm up from 0
    assert lr_at(500, spe, cfg, 1.0) == pytest.approx(0.5)
    assert lr_at(1000, spe, cfg, 1.0) == pytest.approx(1.0)  # end of warmup = peak
    assert lr_at(5500, spe, cfg, 1.0) == pytest.approx(0.5)  # midpoint of the cosine
    assert lr_at(10000, spe, cfg, 1.0) == pytest.approx(0.0, abs=1e-12)  # end
    assert lr_at(20000, spe, cfg, 1.0) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at final
    steps = [lr_at(s, spe, cfg, 1.0) for s in range(1000, 10001, 100)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_swav_warmup_start_and_final_lr():
    cfg = {"epochs": 800, "warmup_epochs": 10, "warmup_start_lr": 0.3, "lr_schedule": "cosine", "per": "step", "final_lr": 0.0048}
    spe = 313
    assert lr_at(0, spe, cfg, 4.8) == pytest.approx(0.3)
    assert lr_at(1565, spe, cfg, 4.8) == pytest.approx(0.3 + 4.5 * 1565 / 3130)
    assert lr_at(3130, spe, cfg, 4.8) == pytest.approx(4.8)
    assert lr_at(800 * spe, spe, cfg, 4.8) == pytest.approx(0.0048)
    mid = 3130 + (800 * spe - 3130) // 2
    assert lr_at(mid, spe, cfg, 4.8) == pytest.approx(0.0048 + 0.5 * (4.8 - 0.0048), rel=1e-3)


def test_cosine_per_epoch_moco_adco():
    """lr_e = end + (lr0 - end)(1 + cos(pi e / E)) / 2, constant within an epoch (docs/spec/methods.md §0.5)."""
    cfg = {"epochs": 200, "warmup_epochs": 0, "lr_schedule": "cosine", "per": "epoch", "final_lr": 0.0006}
    spe = 10
    assert lr_at(0, spe, cfg, 0.03) == pytest.approx(0.03)
    assert lr_at(9, spe, cfg, 0.03) == pytest.approx(0.03)  # whole first epoch at the peak
    e1 = 0.0006 + (0.03 - 0.0006) * (1 + math.cos(math.pi / 200)) / 2
    assert lr_at(10, spe, cfg, 0.03) == pytest.approx(e1) and lr_at(19, spe, cfg, 0.03) == pytest.approx(e1)
    assert lr_at(1000, spe, cfg, 0.03) == pytest.approx(0.0006 + (0.03 - 0.0006) / 2)
    last = 0.0006 + (0.03 - 0.0006) * (1 + math.cos(math.pi * 199 / 200)) / 2
    assert lr_at(1999, spe, cfg, 0.03) == pytest.approx(last)


def test_step_decay_and_constant_and_warmup_steps():
    cfg = {"epochs": 200, "warmup_epochs": 0, "lr_schedule": "step", "milestones": [120, 160]}
    assert lr_at(1199, 10, cfg, 0.03) == pytest.approx(0.03)
    assert lr_at(1200, 10, cfg, 0.03) == pytest.approx(0.003)
    assert lr_at(1600, 10, cfg, 0.03) == pytest.approx(0.0003)
    amdim = {"epochs": 300, "warmup_steps": 500, "lr_schedule": "step", "milestones": [250, 280], "gamma": 0.2}
    assert lr_at(250, 100, amdim, 2e-4) == pytest.approx(1e-4)
    assert lr_at(25000, 100, amdim, 2e-4) == pytest.approx(2e-4 * 0.2)
    assert lr_at(28000, 100, amdim, 2e-4) == pytest.approx(2e-4 * 0.04)
    const = {"epochs": 5, "warmup_epochs": 1, "lr_schedule": "constant"}
    assert [lr_at(s, 4, const, 1.0) for s in (0, 2, 4, 19)] == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(UserError, match="lr_schedule"):
        lr_at(0, 1, {"epochs": 1, "lr_schedule": "linear"}, 1.0)


def test_cosine_tau_byol():
    assert cosine_tau(0.996, 0, 1000) == pytest.approx(0.996)
    assert cosine_tau(0.996, 500, 1000) == pytest.approx(0.998)
    assert cosine_tau(0.996, 1000, 1000) == pytest.approx(1.0)
    taus = [cosine_tau(0.99, k, 100) for k in range(101)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))
