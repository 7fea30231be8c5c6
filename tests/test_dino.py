"""DINO (sslctl/methods/dino.py, sslctl/losses/distillation.py): the loss at known inputs, the
centering update, the teacher-temperature warm-up, what the teacher sees, gradient clipping and
the frozen last layer, the EMA. Tiny real networks (ResNet-18 small stem or a 1-block ViT at
8-16 px, batch 4): seconds. 2 ranks = 1 rank: tests/test_distributed.py; exact resume:
tests/test_train.py; the short learning run: tests/test_short_runs_noncontrastive.py."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from sslctl.losses.distillation import dino_cross_entropy, teacher_targets
from sslctl.methods import Progress, build_method
from sslctl.methods.dino import WeightNormLinear, teacher_temperature
from sslctl.optim import cosine_tau, weight_decay_at
from sslctl.recipes import load_recipe

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed: pip install -e .[timm]")

B, K = 4, 64
SMALL = ["head.prototypes=64", "head.projector_hidden=[32, 32]", "head.projector_dim=16"]
MULTI_CROP = ["augment.crop_size=16", "augment.extra_crops=2", "augment.extra_crop_size=8"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def dino(*overrides: str, variant: str = "small"):
    return build_method(load_recipe("dino", variant=variant, overrides=[*SMALL, *MULTI_CROP, *overrides]))


def crops(n_local: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)] + [torch.randn(B, 3, 8, 8, generator=g) for _ in range(n_local)]


# ---- the loss --------------------------------------------------------------------------------


def test_cross_entropy_is_log_k_for_a_uniform_student_whatever_the_teacher():
    student = torch.zeros(4 * B, K)  # equal scores: the student's softmax is uniform
    targets = F.softmax(torch.randn(2 * B, K) * 3, dim=-1)
    assert dino_cross_entropy(student, targets, 4, 0.1).item() == pytest.approx(math.log(K), rel=1e-6)
    uniform = torch.full((2 * B, K), 1.0 / K)  # a uniform teacher: log K only when the student is uniform too
    assert dino_cross_entropy(torch.randn(4 * B, K), uniform, 4, 0.1).item() > math.log(K)


def test_cross_entropy_at_a_hand_computed_input():
    """2 global + 1 local crop, batch 1, K = 2: pairs (t0, s1), (t0, s2), (t1, s0), (t1, s2)."""
    s = torch.tensor([[0.0, 0.1], [0.2, 0.0], [0.1, 0.1]])  # crops 0, 1, 2
    t = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    log_p = F.log_softmax(s / 0.1, dim=-1)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(-(t[i] * log_p[v]).sum() for i, v in pairs) / 4
    torch.testing.assert_close(dino_cross_entropy(s, t, 3, 0.1), expected)


def test_teacher_targets_centre_then_sharpen():
    center = torch.randn(1, K)
    assert torch.allclose(teacher_targets(center.expand(B, K), center, 0.04), torch.full((B, K), 1.0 / K))
    t = torch.randn(B, K)
    sharp, soft = teacher_targets(t, center, 0.04), teacher_targets(t, center, 0.07)
    torch.testing.assert_close(sharp, F.softmax((t - center) / 0.04, dim=-1))
    entropy = lambda p: -torch.special.xlogy(p, p).sum(-1)  # noqa: E731
    assert (entropy(sharp) < entropy(soft)).all()
    assert not teacher_targets(t.requires_grad_(), center, 0.04).requires_grad


def test_teacher_temperature_warms_up_linearly_per_epoch_then_stays():
    args = (0.04, 0.07, 30)
    assert teacher_temperature(0, *args) == 0.04
    assert teacher_temperature(29, *args) == pytest.approx(0.07)  # np.linspace(0.04, 0.07, 30)[-1]
    assert teacher_temperature(10, *args) == pytest.approx(0.04 + 0.03 * 10 / 29)
    assert teacher_temperature(30, *args) == teacher_temperature(299, *args) == 0.07
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07 and teacher_temperature(0, 0.04, 0.07, 1) == 0.04
    m = dino("loss.warmup_teacher_temperature_epochs=50")
    m.before_forward(Progress(step=0, total_steps=10, epoch=0, steps_per_epoch=1))
    assert m._teacher_temperature == 0.04
    m.before_forward(Progress(step=49, total_steps=10, epoch=49, steps_per_epoch=1))
    assert m._teacher_temperature == pytest.approx(0.07)


def test_center_moves_toward_the_teacher_batch_mean_by_one_minus_momentum():
    m = dino()
    c0 = torch.randn(1, K)
    m.center.copy_(c0)
    teacher = torch.randn(2 * B, K)
    m.update_center(teacher)
    torch.testing.assert_close(m.center, 0.9 * c0 + 0.1 * teacher.mean(0, keepdim=True))


def test_weight_norm_last_layer_matches_torch_and_keeps_unit_rows():
    layer = WeightNormLinear(16, K, learn_norm=False)
    assert not layer.weight_g.requires_grad
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, K, bias=False))
    ref.parametrizations.weight.original0.data.copy_(layer.weight_g)
    ref.parametrizations.weight.original1.data.copy_(layer.weight_v)
    x = F.normalize(torch.randn(B, 16), dim=-1)
    torch.testing.assert_close(layer(x), ref(x))
    assert layer(x).abs().max() <= 1.0 + 1e-6  # unit rows against unit inputs: cosines
    assert WeightNormLinear(16, K, learn_norm=True).weight_g.requires_grad


# ---- the method --------------------------------------------------------------------------------


def test_head_is_the_dino_head():
    m = dino()
    names = [type(l).__name__ for l in m.projector]
    assert names == ["Linear", "GELU", "Linear", "GELU", "Linear"]  # no BN (use_bn_in_head false)
    assert all(l.bias is not None and not l.bias.any() for l in m.projector if isinstance(l, torch.nn.Linear))
    assert m.prototypes.weight_v.shape == (K, 16)
    full = load_recipe("dino")
    assert full["head"]["prototypes"] == 65536 and full["head"]["projector_dim"] == 256
    assert full["head"]["projector_hidden"] == [2048, 2048]


def test_student_sees_every_crop_teacher_only_the_two_global_ones_and_gets_no_gradient():
    m = dino()
    bn_s, bn_t = m.backbone.bn1, m.teacher[0].bn1
    n_s, n_t = int(bn_s.num_batches_tracked), int(bn_t.num_batches_tracked)
    out = m.training_step(crops())
    assert int(bn_t.num_batches_tracked) == n_t + 1  # one teacher batch: the 2 global crops together
    assert int(bn_s.num_batches_tracked) == n_s + 2  # one student batch per resolution
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert all(p.grad is not None for p in m.backbone.parameters())
    assert m.prototypes.weight_v.grad is not None and not m.center.requires_grad
    assert 0 < out["teacher_entropy"].item() <= math.log(K) + 1e-4


def test_loss_equals_the_formula_on_the_networks_outputs():
    m = dino()
    m.eval()  # per-sample BN so separate forwards give the same numbers
    vs = crops()
    center0 = torch.randn(1, K)
    m.center.copy_(center0)
    loss = m.training_step(vs)["loss"]
    with torch.no_grad():
        student = torch.cat([m.prototypes(F.normalize(m.projector(m.backbone(v)), dim=-1)) for v in vs])
        teacher = m.teacher(torch.cat(vs[:2]))
    expected = dino_cross_entropy(student, teacher_targets(teacher, center0, 0.04), 4, 0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.center, 0.9 * center0 + 0.1 * teacher.mean(0, keepdim=True))


@needs_timm
def test_vit_teacher_is_built_without_drop_path_and_starts_as_the_student():
    m = dino("encoder.name=timm:vit_tiny_patch16_224", "encoder.small_stem=false", "encoder.img_size=16",
             "encoder.patch_size=4", "encoder.depth=2", "encoder.drop_path_rate=0.5")
    drop = lambda net: [mod.drop_prob for mod in net.modules() if type(mod).__name__ == "DropPath"]  # noqa: E731
    assert drop(m.backbone) and max(drop(m.backbone)) == 0.5 and not drop(m.teacher)
    for s, t in zip(m.student_modules().parameters(), m.teacher.parameters()):
        assert torch.equal(s, t)
    m.eval()
    x = crops()[0]
    torch.testing.assert_close(m.teacher[0](x), m.backbone(x))  # same weights, drop path off in eval


def test_gradients_clipped_per_parameter_and_last_layer_frozen_in_the_first_epoch():
    m = dino("method.clip_grad=0.5", "method.freeze_last_layer_epochs=1")
    m.training_step(crops())["loss"].mul(1000).backward()  # large gradients
    before = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.before_optimizer_step(Progress(step=9, total_steps=100, epoch=0, steps_per_epoch=10))
    assert m.prototypes.weight_v.grad is None  # step 9 < 1 epoch of 10 steps
    for name, p in m.named_parameters():
        if p.grad is None:
            continue
        norm0 = before[name].norm()
        assert p.grad.norm() <= 0.5 * (1 + 1e-4)
        torch.testing.assert_close(p.grad, before[name] * min(1.0, 0.5 / (norm0.item() + 1e-6)))  # same direction
    m.zero_grad()
    m.training_step(crops())["loss"].backward()
    m.before_optimizer_step(Progress(step=10, total_steps=100, epoch=1, steps_per_epoch=10))
    assert m.prototypes.weight_v.grad is not None


def test_teacher_ema_follows_the_cosine_momentum_from_the_base_to_one():
    m = dino()
    with torch.no_grad():
        for p in m.student_modules().parameters():
            p.add_(0.1)
    teacher0, student = [p.clone() for p in m.teacher.parameters()], [p.clone() for p in m.student_modules().parameters()]
    m.after_optimizer_step(Progress(step=30, total_steps=100, epoch=0, steps_per_epoch=100))
    tau = cosine_tau(0.9995, 30, 100)
    for t0, s, t1 in zip(teacher0, student, m.teacher.parameters()):
        torch.testing.assert_close(t1, tau * t0 + (1 - tau) * s)


def test_recipe_variants_build():
    for variant, backbone in (("small", "ResNet"), ("resnet50", "ResNet")):
        m = build_method(load_recipe("dino", variant=variant, overrides=["head.prototypes=64", "encoder.name=resnet18"]))
        assert type(m.backbone).__name__ == backbone
    vit = load_recipe("dino")
    assert vit["encoder"]["name"] == "timm:vit_small_patch16_224" and vit["optim"]["weight_decay_end"] == 0.4
    assert load_recipe("dino", variant="resnet50")["optim"]["name"] == "sgd"


@needs_timm
def test_engine_writes_the_weight_decay_schedule(mini_shards, tmp_path):
    """Through the real loop: after 3 steps the decayed group holds DINO's cosine weight decay."""
    from sslctl.train import pretrain

    cfg = load_recipe("dino", variant="small", overrides=[
        *SMALL, "encoder.name=timm:vit_tiny_patch16_224", "encoder.small_stem=false", "encoder.img_size=8",
        "encoder.patch_size=4", "encoder.depth=1", "augment.crop_size=8", "optim.batch_size=16", "schedule.epochs=1",
        "optim.weight_decay=0.04", "optim.weight_decay_end=0.4"])
    run = pretrain(mini_shards, cfg, tmp_path / "run", device="cpu", workers=0, max_steps=3, log_every=1)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    total = 5000 // 16
    assert groups[0]["weight_decay"] == pytest.approx(weight_decay_at(2, total, cfg["optim"])) and groups[1]["weight_decay"] == 0.0
    assert 0.04 < groups[0]["weight_decay"] < 0.041
