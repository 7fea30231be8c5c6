"""One short file per method. `build_method(cfg)` picks it by the recipe's `recipe.method` key.

A method module defines `METHOD`, its Method subclass (see base.py for the contract)."""

from __future__ import annotations

import importlib
import pkgutil

from sslctl.errors import UserError
from sslctl.methods.base import Method, Progress

__all__ = ["Method", "Progress", "build_method", "available"]


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("base",))


def build_method(cfg: dict) -> Method:
    name = cfg["recipe"]["method"]
    if ":" in name:  # "package.module:Class": a Method defined elsewhere (sslctl finetune / distill, plugins)
        module, _, cls = name.partition(":")
        try:
            method_cls = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as err:
            raise UserError(f"recipe.method = '{name}': cannot import {cls} from {module} ({err})") from None
        if not (isinstance(method_cls, type) and issubclass(method_cls, Method)):
            raise UserError(f"recipe.method = '{name}': {cls} is not an sslctl Method subclass")
        return method_cls(cfg)
    if name not in available():
        raise UserError(f"recipe.method = '{name}' is not a method; available: {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{name}").METHOD(cfg)
