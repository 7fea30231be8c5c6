"""MoCo v3 (sslctl/methods/mocov3.py): the loss at known inputs, the symmetric step on the
networks' outputs, the momentum update before the keys, the heads, the frozen random patch
projection and sin-cos position embedding of the ViT. Tiny real networks: seconds. 2 ranks =
1 rank: tests/test_distributed.py; exact resume: tests/test_train.py."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from sslctl.losses.contrastive import info_nce_in_batch
from sslctl.methods import Progress, build_method
from sslctl.methods.mocov3 import sincos_position_embedding
from sslctl.optim import build_optimizer, cosine_tau
from sslctl.recipes import load_recipe

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed: pip install -e .[timm]")

B = 4
HEADS = ["head.projector_hidden=[32]", "head.predictor_hidden=[32]", "head.projector_dim=16", "head.predictor_dim=16"]
VIT = ["encoder.img_size=16", "encoder.patch_size=4", "encoder.depth=1", "encoder.embed_dim=48", "encoder.num_heads=4",
       "augment.crop_size=16", "head.projector_hidden=[32, 32]", "head.predictor_hidden=[32]", "head.projector_dim=16",
       "head.predictor_dim=16"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def mocov3(*overrides: str, variant: str = "small"):
    return build_method(load_recipe("mocov3", variant=variant, overrides=[*HEADS, *overrides] if variant == "small" else [*VIT, *overrides]))


def views(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]


def test_loss_at_known_inputs():
    t = 0.2
    q = torch.eye(B, 8)  # identical, orthonormal queries and keys: positive 1/t, negatives 0
    expected = 2 * t * math.log(1 + (B - 1) * math.exp(-1 / t))
    assert info_nce_in_batch(q, q, t).item() == pytest.approx(expected, rel=1e-5)
    assert info_nce_in_batch(q, q, 0.01).item() == pytest.approx(0.0, abs=1e-12)  # t -> 0: the positive wins outright
    same = F.normalize(torch.ones(B, 8), dim=1)  # every logit equal: 2t log N
    assert info_nce_in_batch(same, same, t).item() == pytest.approx(2 * t * math.log(B), rel=1e-6)
    # rank r's queries have their positives at r * B + n among the global keys
    keys = torch.cat([F.normalize(torch.randn(B, 8), dim=1), q])
    assert info_nce_in_batch(q, keys, t, rank=1).item() < info_nce_in_batch(q, keys, t, rank=0).item()


def test_step_is_the_symmetric_loss_of_the_networks_outputs_with_keys_after_the_momentum_update():
    m = mocov3()
    m.eval()  # per-sample BN, so separate forwards agree
    with torch.no_grad():
        for p in m.online_parameters():
            p.add_(0.01 * torch.randn_like(p))
    key0, online = [p.clone() for p in m.momentum_encoder.parameters()], [p.clone() for p in m.online_parameters()]
    m.before_forward(Progress(step=25, total_steps=100, epoch=0, steps_per_epoch=100))
    momentum = cosine_tau(0.99, 25, 100)
    assert m.momentum == momentum
    x1, x2 = views()
    loss = m.training_step([x1, x2])["loss"]
    for k0, q, k1 in zip(key0, online, m.momentum_encoder.parameters()):
        torch.testing.assert_close(k1, momentum * k0 + (1 - momentum) * q)  # updated before the keys
    with torch.no_grad():
        q1, q2 = (F.normalize(m.predictor(m.projector(m.backbone(x))), dim=1) for x in (x1, x2))
        k1, k2 = (F.normalize(m.momentum_encoder(x), dim=1) for x in (x1, x2))
    torch.testing.assert_close(loss, info_nce_in_batch(q1, k2, 0.2) + info_nce_in_batch(q2, k1, 0.2), rtol=1e-5, atol=1e-6)


def test_momentum_encoder_is_a_frozen_copy_without_predictor_and_gets_no_gradient():
    m = mocov3()
    assert len(list(m.momentum_encoder.parameters())) == len(m.online_parameters())
    for q, k in zip(m.online_parameters(), m.momentum_encoder.parameters()):
        assert torch.equal(q, k) and not k.requires_grad
    m.train()
    out = m.training_step(views())
    out["loss"].backward()
    assert all(p.grad is None for p in m.momentum_encoder.parameters())
    assert all(p.grad is not None for p in [*m.backbone.parameters(), *m.predictor.parameters()])
    assert out["z_std"].item() > 0


@needs_timm
def test_heads_are_the_official_mlps():
    def layout(seq):
        return [(type(l).__name__, getattr(l, "bias", None) is not None, getattr(l, "affine", None)) for l in seq]

    resnet = mocov3()
    assert layout(resnet.projector) == [("Linear", False, None), ("BatchNorm1d", True, True), ("ReLU", False, None),
                                        ("Linear", False, None), ("BatchNorm1d", False, False)]
    assert layout(resnet.predictor)[-1] == ("Linear", False, None)  # ResNet: no BN after the predictor
    vit = mocov3(variant="none")
    assert sum(type(l).__name__ == "Linear" for l in vit.projector) == 3  # ViT: a 3-layer projector
    assert layout(vit.predictor)[-1] == ("BatchNorm1d", False, False)
    full = load_recipe("mocov3")
    assert full["loss"]["temperature"] == 0.2 and load_recipe("mocov3", variant="resnet50")["loss"]["temperature"] == 1.0
    assert full["encoder"]["num_heads"] == 12 and full["head"]["projector_hidden"] == [4096, 4096]


@needs_timm
def test_vit_patch_projection_is_random_frozen_and_gets_no_gradient():
    m = mocov3(variant="none")
    proj = m.backbone.patch_embed.proj
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 48))
    assert not proj.weight.requires_grad and not proj.bias.requires_grad and not proj.bias.any()
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.9 * bound  # uniform(-bound, bound)
    m.training_step(views())["loss"].backward()
    assert proj.weight.grad is None and proj.bias.grad is None and m.backbone.pos_embed.grad is None
    assert m.backbone.blocks[0].attn.qkv.weight.grad is not None
    frozen = {id(proj.weight), id(proj.bias), id(m.backbone.pos_embed)}
    opt = build_optimizer(m, m.cfg["optim"], lr=1e-3)
    assert not frozen & {id(p) for g in opt.param_groups for p in g["params"]}
    key_proj = m.momentum_encoder[0].patch_embed.proj
    assert torch.equal(key_proj.weight, proj.weight)  # the key encoder has the same random projection


@needs_timm
def test_vit_position_embedding_is_the_fixed_2d_sin_cos_one():
    m = mocov3(variant="none")
    pos = m.backbone.pos_embed
    assert pos.shape == (1, 1 + 16, 48) and not pos.requires_grad
    torch.testing.assert_close(pos, sincos_position_embedding((4, 4), 48, 1))
    assert not pos[0, 0].any()  # the class token's position is zero
    omega = 1.0 / 10000 ** (torch.arange(12) / 12)
    for m_idx in (0, 5, 15):  # patch m: the first quarter encodes m // 4, the third m % 4
        torch.testing.assert_close(pos[0, 1 + m_idx, :12], torch.sin((m_idx // 4) * omega))
        torch.testing.assert_close(pos[0, 1 + m_idx, 24:36], torch.sin((m_idx % 4) * omega))
    import timm
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=0, **m.backbone.options)
    assert list(plain.state_dict()) == list(m.backbone.state_dict())  # the export still loads into timm


def test_vit_switches_refuse_a_resnet():
    from sslctl.errors import UserError

    with pytest.raises(UserError, match="stop_grad_conv1 = true applies to a timm ViT"):
        mocov3("method.stop_grad_conv1=true")
