"""Backbones by name: the framework's "encoder" part.

A backbone is the torchvision classification model itself with its classifier replaced by
`nn.Identity`, so `backbone(x)` returns the pooled representation h (B x D) and its
state_dict keys are exactly torchvision's. `encoder.safetensors` therefore loads with
strict=True into `torchvision.models.<name>()` after `apply_small_stem` (if used) and
`strip_classifier`.

Custom networks that torchvision lacks (the AMDIM encoder, ...) live in `sslctl/nets/` and are
registered in CUSTOM by name.
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


def apply_small_stem(model: nn.Module) -> nn.Module:
    """CIFAR stem (docs/spec/methods.md §0.3): 3x3 stride-1 conv1 with 64 channels and no max-pool."""
    if not hasattr(model, "conv1") or not hasattr(model, "maxpool"):
        raise UserError(f"small_stem applies to ResNets only; {type(model).__name__} has no conv1/maxpool")
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


def build_backbone(name: str, small_stem: bool = False, **kwargs) -> nn.Module:
    """The encoder by name: any torchvision classification model, or a registered custom net.

    The returned module has `feature_dim` (D of its pooled output) and `arch` (its name)."""
    if name in CUSTOM:
        module_name, factory = CUSTOM[name].split(":")
        model = getattr(importlib.import_module(module_name), factory)(**kwargs)
        model.arch = name
        model.options = dict(kwargs)  # saved in encoder.safetensors so load_encoder rebuilds the same net
        return model
    if name not in torchvision_names():
        import difflib

        close = difflib.get_close_matches(name, torchvision_names() + list(CUSTOM), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown encoder '{name}'{hint} (any torchvision classification model name works)")
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if small_stem:
        apply_small_stem(model)
    model.feature_dim = strip_classifier(model)
    model.arch = name
    return model


def custom_options(name: str, section: dict) -> dict:
    """The [encoder] keys that the custom net `name` takes as keyword arguments ({} otherwise).
    Keys the chosen network does not take are left alone, so one recipe can hold a custom net's
    options and still swap in a torchvision model with `--set encoder.name=resnet18`."""
    if name not in CUSTOM:
        return {}
    module_name, factory = CUSTOM[name].split(":")
    params = inspect.signature(getattr(importlib.import_module(module_name), factory)).parameters
    return {k: v for k, v in section.items() if k in params}


def build_encoder(section: dict) -> nn.Module:
    """The backbone a recipe's [encoder] section names (torchvision or custom, with its options)."""
    return build_backbone(section["name"], bool(section.get("small_stem", False)), **custom_options(section["name"], section))


def feature_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The ResNet's intermediate maps (after layer1..layer4), for methods that compare local
    features (AMDIM, CPC, YADIM) with a torchvision ResNet as encoder."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    maps = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        maps.append(x)
    return maps
