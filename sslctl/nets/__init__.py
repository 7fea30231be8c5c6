"""Networks torchvision lacks (the AMDIM encoder, CPC's patch-grid encoder), registered by name in
`sslctl.encoders.CUSTOM`, and `build_encoder`: the [encoder] section -> a backbone.

A custom factory's keyword arguments are filled from [encoder] keys of the same name (the
AMDIM encoder reads `ndf`, `n_rkhs`, `depth`, `input_size`), so one recipe can hold a custom
net's options and still swap in a torchvision model with `--set encoder.name=resnet18`:
keys the chosen network does not take are left alone. `build_backbone` keeps a custom net's
options on it as `.options`, so its encoder.safetensors can rebuild it.
"""

from __future__ import annotations

import importlib
import inspect

from torch import nn

from sslctl.encoders import CUSTOM, build_backbone


def custom_options(name: str, section: dict) -> dict:
    """The [encoder] keys that the custom net `name` takes as keyword arguments ({} otherwise)."""
    if name not in CUSTOM:
        return {}
    module_name, factory = CUSTOM[name].split(":")
    params = inspect.signature(getattr(importlib.import_module(module_name), factory)).parameters
    return {k: v for k, v in section.items() if k in params}


def build_encoder(section: dict) -> nn.Module:
    """The backbone a recipe's [encoder] section names (torchvision or custom)."""
    return build_backbone(section["name"], bool(section.get("small_stem", False)), **custom_options(section["name"], section))
