"""Backbones by name: the framework's "encoder" part.

A backbone is the torchvision classification model itself with its classifier replaced by
`nn.Identity`, so `backbone(x)` returns the pooled representation h (B x D) and its
state_dict keys are exactly torchvision's. `encoder.safetensors` therefore loads with
strict=True into `torchvision.models.<name>()` after `apply_small_stem` (if used) and
`strip_classifier`.

`timm:NAME` is any timm model, built as `timm.create_model(NAME, num_classes=0, **options)`:
its forward is already the pooled representation (for a ViT the class token after the final
norm) and its state_dict loads strictly into that same call. The options are the [encoder]
keys other than `name`, `small_stem` and `zero_init_residual` (img_size, patch_size, drop_path_rate,
dynamic_img_size, ...); they are saved in encoder.safetensors so `load_encoder` rebuilds the
same net. timm is an extra (`pip install 'sslctl[timm]'`).

Custom networks that torchvision lacks (the AMDIM encoder, ...) live in `sslctl/nets/` and are
registered in CUSTOM by name. A user's own net is named by its import path, "package.module:factory"
(as a plugin method is): factory(**options) returns an nn.Module whose forward gives B x D and whose
`feature_dim` is D.
"""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn
import torchvision

from sslctl.errors import UserError

# name -> "module:factory"; factory(**kwargs) returns an nn.Module with a `feature_dim` attribute.
CUSTOM: dict[str, str] = {}
CUSTOM["amdim"] = "sslctl.nets.amdim:AMDIMEncoder"
CUSTOM["cpc_resnet"] = "sslctl.nets.cpc:CPCEncoder"

_CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")

TIMM = "timm:"  # encoder.name prefix of a timm model
# [encoder] keys sslctl reads itself; the others are the net's options
SSLCTL_KEYS = ("name", "small_stem", "zero_init_residual")
# torchvision builders take a few options of their model class (by the builder's module)
TORCHVISION_OPTIONS = {"torchvision.models.vision_transformer": ("image_size",)}


def apply_small_stem(model: nn.Module) -> nn.Module:
    """CIFAR stem (docs/spec/methods.md §0.3): 3x3 stride-1 conv1 with 64 channels and no max-pool."""
    if not isinstance(getattr(model, "conv1", None), nn.Conv2d) or not hasattr(model, "maxpool"):
        raise UserError(f"encoder.small_stem = true applies to ResNets only; {type(model).__name__} has no conv1/maxpool: "
                        "set --set encoder.small_stem=false (a ViT adapts to small images through its patch size)")
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def strip_classifier(model: nn.Module) -> int:
    """Replace the classification layer by Identity; return the feature dimension it consumed."""
    for attr in _CLASSIFIER_ATTRS:
        head = getattr(model, attr, None)
        if head is None:
            continue
        linear = head if isinstance(head, nn.Linear) else next(
            (m for m in reversed(list(head.modules())) if isinstance(m, nn.Linear)), None
        )
        if linear is None:
            continue
        setattr(model, attr, nn.Identity())
        return linear.in_features
    raise UserError(f"cannot find the classifier of {type(model).__name__} (looked for {_CLASSIFIER_ATTRS})")


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def is_timm(name: str) -> bool:
    return str(name).startswith(TIMM)


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError(
            "encoder.name = 'timm:...' needs the timm package, an optional extra of sslctl: "
            "pip install 'sslctl[timm]' (or pip install timm)"
        ) from None
    return timm


def timm_backbone(name: str, **options) -> nn.Module:
    """`timm.create_model(NAME, num_classes=0, **options)` for name "timm:NAME", untrained."""
    timm, arch = _timm(), name[len(TIMM):]
    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(TIMM + c for c in close)}?" if close else " (timm.list_models() lists them)"
        raise UserError(f"unknown encoder '{name}': timm has no model '{arch}'{hint}")
    for key in ("num_classes", "pretrained"):
        if key in options:
            raise UserError(f"encoder.{key}: sslctl sets it for timm models (num_classes=0, untrained); remove the key")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **options)
    except (TypeError, ValueError, AssertionError) as err:
        keys = ", ".join(f"encoder.{k} = {v!r}" for k, v in options.items()) or "none"
        raise UserError(f"encoder '{name}' cannot be built with the options {keys}: {err}") from None
    # num_classes=0 leaves the pooled features (pre-logits) as the output
    model.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) a ViT takes exclusively (torchvision's image_size; timm's img_size unless
    dynamic_img_size), or None for a network that takes any size."""
    if isinstance(getattr(model, "image_size", None), int):  # torchvision ViT
        return (model.image_size, model.image_size)
    embed = getattr(model, "patch_embed", None)  # timm ViT
    if embed is not None and getattr(embed, "strict_img_size", False) and getattr(embed, "img_size", None):
        return tuple(embed.img_size)
    return None


def build_multi_crop_encoder(section: dict, sizes: set[int]) -> nn.Module:
    """`build_encoder` for crops of the given sizes (SwAV's, DINO's multi-crop). A timm ViT is built
    with dynamic_img_size = true when the crops have several sizes and the recipe does not say
    (its position embedding interpolated per input size, as DINO's own ViT does); a ViT that takes
    one size only is refused."""
    model = build_encoder(section)
    if len(sizes) > 1 and fixed_input_size(model) is not None and is_timm(section["name"]) and "dynamic_img_size" not in section:
        model = build_encoder({**section, "dynamic_img_size": True})
    fixed = fixed_input_size(model)
    if fixed is not None and {(s, s) for s in sizes} != {fixed}:
        raise UserError(f"encoder {model.arch} takes {fixed[0]}x{fixed[1]} images only, the recipe's crops are "
                        f"{', '.join(map(str, sorted(sizes)))} px: set --set encoder.dynamic_img_size=true (timm ViTs "
                        "interpolate their position embedding per input size) or match encoder.img_size to the crops")
    return model


def _check_input_size(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a fixed-size ViT: a clear error instead of an assertion deep inside."""
    x, expected = args[0], fixed_input_size(model)
    if expected is not None and tuple(x.shape[-2:]) != expected:
        key = "image_size" if hasattr(model, "image_size") else "img_size"
        dynamic = "" if hasattr(model, "image_size") else (
            ", or encoder.dynamic_img_size = true (the position embedding is interpolated per input size, "
            "e.g. for multi-crop)")
        raise UserError(
            f"encoder {model.arch} takes {expected[0]}x{expected[1]} images (encoder.{key}) but got "
            f"{x.shape[-2]}x{x.shape[-1]}: set --set encoder.{key}={x.shape[-1]}{dynamic}"
        )


def is_custom(name: str) -> bool:
    """A registered custom net, or one named by its import path "package.module:factory"."""
    return name in CUSTOM or (":" in name and not is_timm(name))


def custom_factory(name: str):
    path = CUSTOM.get(name, name)
    module_name, _, factory = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), factory)
    except (ImportError, AttributeError) as err:
        raise UserError(f"encoder.name = '{name}': cannot import {factory} from {module_name} ({err}); "
                        "a custom net is named package.module:factory, importable from where sslctl runs") from None


def build_backbone(name: str, small_stem: bool = False, **kwargs) -> nn.Module:
    """The encoder by name: any torchvision classification model, a timm model ("timm:NAME"),
    a registered custom net, or one by its import path ("package.module:factory").

    The returned module has `feature_dim` (D of its pooled output), `arch` (its name) and
    `options` (the constructor options, saved with the encoder)."""
    if is_timm(name):
        model = timm_backbone(name, **kwargs)
        if small_stem:
            apply_small_stem(model)
        model.arch, model.options = name, dict(kwargs)
        if fixed_input_size(model) is not None:
            model.register_forward_pre_hook(_check_input_size)
        return model
    if is_custom(name):
        model = custom_factory(name)(**kwargs)
        model.arch = name
        model.options = dict(kwargs)  # saved in encoder.safetensors so load_encoder rebuilds the same net
        return model
    if name not in torchvision_names():
        import difflib

        close = difflib.get_close_matches(name, torchvision_names() + list(CUSTOM), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown encoder '{name}'{hint} (any torchvision classification model name works, "
                        "a timm model as timm:NAME, or your own net as package.module:factory)")
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"encoder '{name}' cannot be built with the options {kwargs}: {err}") from None
    if small_stem:
        apply_small_stem(model)
    model.feature_dim = strip_classifier(model)
    model.arch, model.options = name, dict(kwargs)
    if fixed_input_size(model) is not None:  # torchvision's ViTs take one input size
        model.register_forward_pre_hook(_check_input_size)
    return model


def option_keys(name: str) -> tuple[str, ...] | None:
    """The [encoder] keys the encoder `name` takes as options; None: any key (timm validates them)."""
    if is_timm(name):
        return None
    if is_custom(name):
        return tuple(inspect.signature(custom_factory(name)).parameters)
    if name in torchvision_names():
        return TORCHVISION_OPTIONS.get(torchvision.models.get_model_builder(name).__module__, ())
    return ()


def encoder_options(section: dict) -> dict:
    """The [encoder] keys that the named network takes as keyword arguments: every key but
    `name` and `small_stem` for a timm model; the ones a custom net's constructor or a torchvision
    builder takes (TORCHVISION_OPTIONS) otherwise. Keys the chosen network does not take are left
    alone, so one recipe can hold a custom net's options and still swap in a torchvision model
    with `--set encoder.name=resnet18`."""
    keys = option_keys(section["name"])
    return {k: v for k, v in section.items() if k not in SSLCTL_KEYS and (keys is None or k in keys)}


def build_encoder(section: dict) -> nn.Module:
    """The backbone a recipe's [encoder] section names, with its options (`encoder_options`), its
    residual blocks zero-initialised when `zero_init_residual`."""
    model = build_backbone(section["name"], bool(section.get("small_stem", False)), **encoder_options(section))
    return zero_init_residual(model) if section.get("zero_init_residual", False) else model


def zero_init_residual(backbone: nn.Module) -> nn.Module:
    """torchvision's `zero_init_residual=True` on a built network (SimSiam, Barlow Twins and VICReg
    build their ResNets so): the last BN of every residual block starts with weight 0, so each
    block starts as the identity. Networks without torchvision ResNet blocks are left alone."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for m in backbone.modules():
        if isinstance(m, (Bottleneck, BasicBlock)):
            nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)
    return backbone


def feature_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The ResNet's intermediate maps (after layer1..layer4), for methods that compare local
    features (AMDIM, CPC, YADIM) with a torchvision ResNet as encoder."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    maps = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        maps.append(x)
    return maps
