"""One short file per method. `build_method(cfg)` picks it by the recipe's `recipe.method` key.

A method module defines `METHOD`, its Method subclass (see base.py for the contract)."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from sslctl.errors import UserError
from sslctl.methods.base import Method, Progress

__all__ = ["Method", "Progress", "build_method", "method_class", "method_defaults", "available"]


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("base",))


def method_class(name: str) -> type[Method]:
    """The Method subclass a recipe's `recipe.method` names: a method of this package, or
    "package.module:Class" for one defined elsewhere (sslctl finetune / distill, plugins)."""
    if ":" in name:
        module, _, cls = name.partition(":")
        try:
            method_cls = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as err:
            raise UserError(f"recipe.method = '{name}': cannot import {cls} from {module} ({err})") from None
        if not (isinstance(method_cls, type) and issubclass(method_cls, Method)):
            raise UserError(f"recipe.method = '{name}': {cls} is not an sslctl Method subclass")
        return method_cls
    if name not in available():
        raise UserError(f"recipe.method = '{name}' is not a method; available: {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{name}").METHOD


def build_method(cfg: dict) -> Method:
    return method_class(cfg["recipe"]["method"])(cfg)


def method_defaults(cfg: dict) -> dict[str, Any]:
    """The recipe's method's `defaults` as dotted keys, e.g. {"method.fused_views": True}."""
    defaults = method_class(cfg["recipe"]["method"]).defaults
    return {f"{section}.{key}": value for section, table in defaults.items() for key, value in table.items()}
