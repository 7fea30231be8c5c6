"""ViT / timm encoders (sslctl/encoders.py) and what the recipes and the optimiser do with them:
the pooled features and the export (strict loads into timm.create_model / torchvision), options
through [encoder], every recipe accepting a ViT or refusing it at construction, weight-decay
exclusions, LARS's lr clipping and the weight-decay schedule. Tiny ViTs (16-32 px, depth 1-2):
each test takes seconds."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from sslctl.devices import use_fast_attention
from sslctl.encoder_io import load_encoder, read_metadata, save_encoder
from sslctl.encoders import build_backbone, build_encoder, strip_classifier
from sslctl.errors import UserError
from sslctl.methods import build_method
from sslctl.optim import build_optimizer, set_weight_decay, weight_decay_at
from sslctl.recipes import load_recipe

timm = pytest.importorskip("timm", reason="timm is not installed: pip install -e .[timm]")

TINY_VIT = {"img_size": 16, "patch_size": 4, "depth": 2}
VIT = "timm:vit_tiny_patch16_224"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def test_fast_attention_on_the_cpu_is_plain_matmuls_with_the_same_values_and_gradients():
    fused = build_backbone(VIT, **TINY_VIT).double()  # float64: the two differ only by rounding
    plain = build_backbone(VIT, **TINY_VIT).double()
    plain.load_state_dict(fused.state_dict())
    use_fast_attention(plain, torch.device("cuda"))  # a CUDA device keeps the fused kernel
    assert all(block.attn.fused_attn for block in plain.blocks)
    use_fast_attention(plain, torch.device("cpu"))
    assert not any(block.attn.fused_attn for block in plain.blocks)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for net in (fused, plain):
        net(x).pow(2).sum().backward()
    torch.testing.assert_close(plain(x), fused(x))
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_timm_backbone_returns_the_class_token_after_the_final_norm():
    net = build_backbone(VIT, **TINY_VIT).eval()
    x = torch.randn(3, 3, 16, 16)
    assert net.feature_dim == 192 and net.arch == VIT and net.options == TINY_VIT
    tokens = net.forward_features(x)  # after the final LayerNorm
    torch.testing.assert_close(net(x), tokens[:, 0])
    assert net(x).shape == (3, 192)


def test_timm_export_loads_strictly_into_timm_create_model_and_rebuilds_with_its_options(tmp_path):
    net = build_backbone(VIT, dynamic_img_size=True, **TINY_VIT).eval()
    path = save_encoder(tmp_path / "encoder.safetensors", net, small_stem=False, input_size=16,
                        mean=[0.5] * 3, std=[0.25] * 3, recipe="dino")
    meta = read_metadata(path)
    assert meta["arch"] == VIT and meta["options"] == {"dynamic_img_size": True, **TINY_VIT}
    from safetensors.torch import load_file

    plain = timm.create_model("vit_tiny_patch16_224", num_classes=0, **meta["options"]).eval()
    plain.load_state_dict(load_file(str(path)), strict=True)
    rebuilt, _ = load_encoder(path)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain(x), net(x))
    torch.testing.assert_close(rebuilt.eval()(x), net(x))


def test_torchvision_vit_takes_image_size_and_loads_into_torchvision():
    import torchvision

    net = build_encoder({"name": "vit_b_32", "small_stem": False, "image_size": 32, "ndf": 8}).eval()  # ndf: not its key
    assert net.feature_dim == 768 and net.options == {"image_size": 32}
    plain = torchvision.models.vit_b_32(image_size=32)
    assert strip_classifier(plain) == 768
    plain.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    feats = plain.eval()(x)
    torch.testing.assert_close(net(x), feats)
    tokens = net.encoder(torch.cat([net.class_token.expand(2, -1, -1), net._process_input(x)], dim=1))
    torch.testing.assert_close(feats, tokens[:, 0])  # the class token after the encoder's final LayerNorm


def test_a_fixed_size_vit_names_the_key_to_set_for_another_input_size():
    net = build_backbone(VIT, **TINY_VIT)
    with pytest.raises(UserError, match=r"takes 16x16 images \(encoder.img_size\) but got 32x32.*img_size=32.*dynamic_img_size"):
        net(torch.randn(1, 3, 32, 32))
    dynamic = build_backbone(VIT, dynamic_img_size=True, **TINY_VIT)
    assert dynamic(torch.randn(1, 3, 32, 32)).shape == (1, 192)  # position embedding interpolated


@pytest.mark.parametrize("section, message", [
    ({"name": "timm:vit_tiny_patch16_22"}, "timm has no model 'vit_tiny_patch16_22'; did you mean timm:vit_tiny_patch16_224"),
    ({"name": VIT, "bogus": 1}, "cannot be built with the options encoder.bogus = 1"),
    ({"name": VIT, "num_classes": 10}, "encoder.num_classes: sslctl sets it"),
    ({"name": VIT, "small_stem": True}, "small_stem = true applies to ResNets only.*small_stem=false"),
])
def test_bad_timm_encoders_are_user_errors(section, message):
    with pytest.raises(UserError, match=message):
        build_encoder(section)


def test_without_timm_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(UserError, match=r"needs the timm package.*pip install 'sslctl\[timm\]'"):
        build_backbone(VIT)


def test_cli_without_timm_exits_2_naming_the_extra(tmp_path, cli, mini_shards):
    """A real `sslctl pretrain` in a Python where `import timm` fails: exit 2, no traceback."""
    import os

    blocker = tmp_path / "no_timm"
    blocker.mkdir()
    (blocker / "timm.py").write_text("raise ImportError('No module named timm')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    done = cli("pretrain", str(mini_shards), "--recipe", "dino", "--out", str(tmp_path / "run"), "--set", f"encoder.name={VIT}",
               "--set", "encoder.small_stem=false", env=env)
    assert done.returncode == 2, done.stderr
    assert "pip install 'sslctl[timm]'" in done.stderr and "Traceback" not in done.stderr


# ---- [encoder] options through the recipe -----------------------------------------------------


def test_encoder_options_beyond_the_recipe_keys_are_for_timm_and_torchvision_vits():
    cfg = load_recipe("moco_v2", variant="small", overrides=["encoder.img_size=32", f"encoder.name={VIT}", "encoder.patch_size=4"])
    assert cfg["encoder"] == {"name": VIT, "small_stem": True, "img_size": 32, "patch_size": 4}  # any order
    assert load_recipe("simclr", overrides=["encoder.name=vit_b_16", "encoder.image_size=32"])["encoder"]["image_size"] == 32
    with pytest.raises(UserError, match="unknown key 'encoder.img_size'.*for timm models"):
        load_recipe("moco_v2", variant="small", overrides=["encoder.img_size=32"])
    with pytest.raises(UserError, match="unknown key 'encoder.smal_stem'.*Closest valid key: encoder.small_stem"):
        load_recipe("byol", overrides=["encoder.smal_stem=true"])


def test_a_recipe_file_may_hold_the_encoders_options_as_set_may(tmp_path):
    from sslctl.paths import RECIPES_DIR

    shipped = (RECIPES_DIR / "moco_v2.toml").read_text()
    assert '[encoder]\nname = "resnet50"\n' in shipped
    vit = tmp_path / "moco_vit.toml"
    vit.write_text(shipped.replace('[encoder]\nname = "resnet50"\n', f'[encoder]\nname = "{VIT}"\nimg_size = 32\npatch_size = 4\n'))
    assert load_recipe(vit, variant="none")["encoder"]["patch_size"] == 4
    bad = tmp_path / "moco_resnet.toml"
    bad.write_text(shipped.replace('[encoder]\nname = "resnet50"\n', '[encoder]\nname = "resnet50"\nimg_size = 32\n'))
    with pytest.raises(UserError, match="unknown key 'encoder.img_size' \\(from the file\\).*for timm models"):
        load_recipe(bad, variant="none")


VIT_SET = [f"encoder.name={VIT}", "encoder.img_size=16", "encoder.patch_size=4", "encoder.depth=1",
           "encoder.small_stem=false", "augment.crop_size=16", "optim.batch_size=8"]
SMALL = {  # keep the methods' own buffers small
    "moco_v1": ["method.queue_size=32"], "moco_v2": ["method.queue_size=32"], "adco": ["method.bank_size=32"],
    "swav": ["head.prototypes=16", "method.queue_size=0", "augment.extra_crop_size=8"],
    "dino": ["head.prototypes=64"],
}
ACCEPT = ["adco", "barlow_twins", "byol", "dino", "moco_v1", "moco_v2", "mocov3", "simclr", "simclr_v2", "simsiam", "swav",
          "vicreg"]
REFUSE = {
    "amdim": "AMDIM / YADIM compare the feature maps",
    "yadim": "AMDIM / YADIM compare the feature maps",
    "cpc_v2": "CPC needs a patch-grid encoder",
}


def test_every_recipe_is_listed_here():
    from sslctl.recipes import list_recipes

    assert sorted(ACCEPT + list(REFUSE)) == sorted(name for name, _ in list_recipes())


@pytest.mark.parametrize("recipe", ACCEPT)
def test_recipe_takes_a_vit(recipe):
    m = build_method(load_recipe(recipe, variant="small", overrides=VIT_SET + SMALL.get(recipe, [])))
    assert type(m.backbone).__name__ == "VisionTransformer"
    views = [torch.randn(8, 3, 16, 16) for _ in range(2)] + [torch.randn(8, 3, 8, 8) for _ in range(m.n_views - 2)]
    if m.n_views == 1:
        views = views[:1]
    m.setup(iter([views] * 8))
    out = m.training_step(views)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.backbone.cls_token.grad is not None


def test_zero_init_residual_of_the_imagenet_recipes_leaves_a_vit_alone():
    """SimSiam's, Barlow Twins' and VICReg's top levels zero-initialise torchvision residual
    blocks (encoder.zero_init_residual); with a timm ViT the key is sslctl's, not passed to timm."""
    cfg = load_recipe("vicreg", overrides=VIT_SET + ["head.projector_hidden=[32, 32]", "head.projector_dim=32"])
    assert cfg["encoder"]["zero_init_residual"] is True
    m = build_method(cfg)
    assert type(m.backbone).__name__ == "VisionTransformer" and "zero_init_residual" not in m.backbone.options


@pytest.mark.parametrize("recipe", sorted(REFUSE))
def test_recipe_refuses_a_vit_at_construction(recipe):
    with pytest.raises(UserError, match=REFUSE[recipe]):
        build_method(load_recipe(recipe, variant="small", overrides=VIT_SET))


def test_local_feature_methods_refuse_a_torchvision_vit_too():
    with pytest.raises(UserError, match="has no feature map 'last'"):
        build_method(load_recipe("yadim", variant="small", overrides=["encoder.name=vit_b_32", "encoder.image_size=32",
                                                                        "encoder.small_stem=false"]))


def test_multi_crop_builds_a_timm_vit_with_dynamic_img_size_unless_the_recipe_says_otherwise():
    multi = VIT_SET + ["augment.extra_crops=2", "augment.extra_crop_size=8", "head.prototypes=16"]
    for recipe in ("swav", "dino"):
        m = build_method(load_recipe(recipe, variant="small", overrides=multi))
        assert m.backbone.options["dynamic_img_size"] is True
        assert m.backbone(torch.randn(2, 3, 8, 8)).shape == (2, 192)
    two_crops = build_method(load_recipe("dino", variant="small", overrides=VIT_SET + ["head.prototypes=16"]))
    assert "dynamic_img_size" not in two_crops.backbone.options  # one crop size: the ViT as the recipe says


def test_multi_crop_refuses_a_fixed_size_vit_at_construction():
    fixed = VIT_SET + ["augment.extra_crops=2", "augment.extra_crop_size=8", "head.prototypes=16", "encoder.dynamic_img_size=false"]
    for recipe in ("swav", "dino"):
        with pytest.raises(UserError, match="takes 16x16 images only, the recipe's crops are 8, 16 px.*dynamic_img_size=true"):
            build_method(load_recipe(recipe, variant="small", overrides=fixed))


def test_moco_says_shuffle_bn_does_nothing_without_batchnorm(capsys):
    build_method(load_recipe("moco_v2", variant="small", overrides=VIT_SET + SMALL["moco_v2"]))
    assert "shuffle-BN changes nothing" in capsys.readouterr().err
    build_method(load_recipe("moco_v2", variant="small", overrides=SMALL["moco_v2"] + ["optim.batch_size=8"]))
    assert "shuffle-BN" not in capsys.readouterr().err


# ---- optimiser ----------------------------------------------------------------------------------


def test_vit_norms_biases_pos_embed_and_cls_token_are_kept_out_of_weight_decay():
    m = build_method(load_recipe("dino", overrides=[f"encoder.{k}={v}" for k, v in TINY_VIT.items()]
                                 + ["head.prototypes=64", "augment.crop_size=16", "augment.extra_crop_size=8"]))
    opt = build_optimizer(m, m.cfg["optim"], lr=1e-3)
    decayed, kept = ({id(p) for p in g["params"]} for g in opt.param_groups)
    names = {id(p): n for n, p in m.named_parameters()}
    assert opt.param_groups[0]["weight_decay"] == 0.04 and opt.param_groups[1]["weight_decay"] == 0.0
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight", "backbone.blocks.0.attn.qkv.bias",
            "projector.0.bias"} <= {names[i] for i in kept}
    assert {"backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight", "prototypes.weight_v"} <= {names[i] for i in decayed}
    assert not any(n.startswith("teacher.") for n in (names[i] for i in decayed | kept))
    set_weight_decay(opt, 0.3)  # the loop's step of optim.weight_decay_end's schedule: the kept group stays at 0
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def test_weight_decay_schedule_is_dinos_cosine():
    cfg = {"weight_decay": 0.04, "weight_decay_end": 0.4}
    assert weight_decay_at(0, 100, cfg) == pytest.approx(0.04)
    assert weight_decay_at(50, 100, cfg) == pytest.approx(0.22)
    assert weight_decay_at(100, 100, cfg) == pytest.approx(0.4)
    assert weight_decay_at(25, 100, cfg) == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert weight_decay_at(30, 100, {"weight_decay": 0.1}) == 0.1  # no end: constant


# ---- end to end -----------------------------------------------------------------------------------


def test_vit_tiny_pretrain_embed_knn_through_the_cli_and_the_export_loads_into_timm(tmp_path, cli, mini_shards):
    """`sslctl pretrain` (DINO, a 1-block ViT-Tiny at 16 px, 4 steps) -> `embed` -> `knn`, as a
    user runs them; then the run's encoder.safetensors in plain timm."""
    import json

    from safetensors.torch import load_file

    sets = [f"encoder.name={VIT}", "encoder.small_stem=false", "encoder.img_size=16", "encoder.patch_size=4",
            "encoder.depth=1", "encoder.embed_dim=96", "encoder.num_heads=3", "augment.crop_size=16", "head.prototypes=64"]
    done = cli("pretrain", str(mini_shards), "--recipe", "dino", "--out", str(tmp_path / "run"), "--max-steps", "4",
               "--batch-size", "16", "--workers", "0", "--quiet", *[a for s in sets for a in ("--set", s)])
    assert done.returncode == 0, done.stderr
    run = done.stdout.strip()
    assert run == str(tmp_path / "run")
    feats = cli("embed", run, str(mini_shards), "--workers", "0", "--quiet")
    assert feats.returncode == 0, feats.stderr
    knn = cli("knn", "--k", "20", "-t", "0.07", stdin=feats.stdout)
    assert knn.returncode == 0, knn.stderr
    result = json.loads(knn.stdout.splitlines()[0])
    assert result["task"] == "knn" and result["n_bank"] == 5000 and result["n_eval"] == 1000 and 30 < result["top1"] <= 100

    meta = read_metadata(tmp_path / "run" / "encoder.safetensors")
    assert meta["arch"] == VIT and meta["options"]["patch_size"] == 4 and meta["input_size"] == 16
    net = timm.create_model("vit_tiny_patch16_224", num_classes=0, **meta["options"])
    net.load_state_dict(load_file(str(tmp_path / "run" / "encoder.safetensors")), strict=True)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 96)
