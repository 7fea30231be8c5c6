"""Recipes: TOML files that describe a whole pretraining run (DESIGN.md §2).

A recipe has one section per part (augment, encoder, head, method, loss) plus optim and
schedule. `[variants.NAME.SECTION]` tables override keys for a setting such as small images, so a
recipe's CIFAR-size version lives in the same file. Resolution order:

    file  ->  variant (auto: "small" when the images are <= 64 px)  ->  --set key=value overrides

The resolved dict has no `variants` table and records the chosen variant in `recipe.variant`;
`recipe_to_toml` writes it back so a run directory holds its own reproducible recipe.

Validation is by example: the keys a recipe lists, and its method's `defaults` (methods/base.py)
for the keys it leaves out, are the keys it accepts. A per-view table `[augment.viewN]` may take
any plain key of `[augment]`.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Iterable

from sslctl.errors import UserError
from sslctl.paths import RECIPES_DIR

REQUIRED_SECTIONS = ("recipe", "augment", "encoder", "head", "method", "loss", "optim", "schedule")

# Keys whose value must be one of a few words; checked at load time so a typo fails before training.
CHOICES = {
    "optim.name": ("sgd", "lars", "adamw", "adam"),
    "optim.scaling": ("linear", "sqrt", "none"),
    "schedule.lr_schedule": ("cosine", "step", "constant"),
    "schedule.per": ("step", "epoch"),
    "augment.normalize": ("imagenet", "manifest"),
    "augment.jitter_brightness": ("multiplicative", "additive"),
    "augment.interpolation": ("bilinear", "bicubic"),
}

_VIEW_TABLE = re.compile(r"view(\d+)$")


# ---------------------------------------------------------------------------------------------
# loading


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe name (`moco_v2` -> recipes/moco_v2.toml) or a path to a .toml file."""
    text = str(name_or_path)
    by_name = RECIPES_DIR / f"{text}.toml"
    if "/" not in text and not text.endswith(".toml") and by_name.is_file():
        return by_name
    path = Path(text).expanduser()
    if path.is_file():
        return path
    names = [n for n, _ in list_recipes()]
    close = difflib.get_close_matches(text, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(
        f"recipe '{text}' not found: neither {by_name} nor a file at that path.{hint} "
        f"Available recipes: {', '.join(names) or '(none)'} (`sslctl recipes` lists them)."
    )


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every recipe in the recipes folder, sorted by name."""
    out = []
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        try:
            desc = tomllib.loads(path.read_text()).get("recipe", {}).get("description", "")
        except tomllib.TOMLDecodeError as err:
            desc = f"(unreadable: {err})"
        out.append((path.stem, desc))
    return out


def load_recipe(
    name_or_path: str | Path,
    *,
    variant: str = "auto",
    overrides: Iterable[str] = (),
    image_size: int | None = None,
) -> dict:
    """Resolve a recipe: read the TOML, apply a variant, then `section.key=value` overrides.

    variant: "auto" (the "small" variant when `image_size` <= 64 and the recipe has one),
    "none", or a variant's name. Raises UserError naming the file and key for any mistake."""
    path = recipe_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a TOML text file (byte {err.start} is not UTF-8 text); a recipe is a "
                        f".toml file like {RECIPES_DIR / 'moco_v2.toml'}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the recipe: {err}") from None

    variants = raw.pop("variants", {})
    if not isinstance(variants, dict):
        raise UserError(f"{path}: `variants` must be a table of [variants.NAME.SECTION] tables")
    cfg = copy.deepcopy(raw)
    _check_sections(cfg, path)
    _check_known_keys(cfg, path)
    _fill_defaults(cfg)
    recorded = cfg["recipe"].get("variant")  # a resolved recipe (run dir) already chose one

    chosen = _pick_variant(variant, variants, image_size, recorded, path)
    if chosen in variants:
        table = variants[chosen]
        if not isinstance(table, dict):
            raise UserError(f"{path}: [variants.{chosen}] must hold section tables like [variants.{chosen}.optim]")
        for section, values in table.items():
            if not isinstance(values, dict):
                raise UserError(f"{path}: variants.{chosen}.{section} must be a table of overrides of [{section}]")
            for key, value in _flatten(values):
                _assign(cfg, f"{section}.{key}", value, path, origin=f"[variants.{chosen}]")
    cfg["recipe"]["variant"] = chosen

    for item in overrides:
        key, value = parse_override(item, path)
        _assign(cfg, key, value, path, origin="--set")

    _check_views(cfg, path)
    _check_choices(cfg, path)
    _check_ranges(cfg, path)
    return cfg


def parse_override(item: str, path: Path | str = "recipe") -> tuple[str, Any]:
    """`section.key=value` -> (dotted key, value parsed as a TOML value, else the bare string)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set '{item}': expected section.key=value, e.g. --set optim.lr=0.3 (recipe {path})")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words: --set optim.name=lars
    return key, value


def _pick_variant(variant: str, variants: dict, image_size: int | None, recorded: str | None, path: Path) -> str:
    if variant == "auto":
        if image_size is not None and image_size <= 64 and "small" in variants:
            return "small"
        return recorded if (recorded and not variants) else "none"
    if variant == "none" or variant in variants or (variant == recorded and not variants):
        return variant
    known = ", ".join(["none", *variants]) if variants else "none (this recipe has no [variants])"
    raise UserError(f"{path}: unknown variant '{variant}'; this recipe has: {known}")


def _check_sections(cfg: dict, path: Path) -> None:
    missing = [s for s in REQUIRED_SECTIONS if not isinstance(cfg.get(s), dict)]
    if missing:
        extra = [s for s in cfg if s not in REQUIRED_SECTIONS]
        typos = [f"[{close[0]}]" for s in missing if (close := difflib.get_close_matches(s, extra, n=1))]
        hint = f" (a typo: {', '.join(typos)}?)" if typos else ""
        raise UserError(
            f"{path}: missing section(s) {', '.join('[' + s + ']' for s in missing)}{hint}; every recipe has "
            f"{', '.join('[' + s + ']' for s in REQUIRED_SECTIONS)} (see recipes/moco_v2.toml)"
        )
    for key in ("name", "method"):
        if not isinstance(cfg["recipe"].get(key), str):
            raise UserError(f"{path}: [recipe] needs a string `{key}` (e.g. {key} = \"moco\")")


def _fill_defaults(cfg: dict) -> None:
    """Keys the recipe's method reads that the file does not list take the method's defaults
    (Method.defaults), so a key added to a method needs no change to existing recipes."""
    from sslctl.methods import method_defaults  # the methods import this module

    for dotted, value in method_defaults(cfg).items():
        section, key = dotted.split(".", 1)
        cfg.setdefault(section, {}).setdefault(key, copy.deepcopy(value))


def _flatten(table: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested tables -> dotted keys, so a variant's [x.augment.view2] is checked key by key."""
    out = []
    for key, value in table.items():
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _valid_keys(cfg: dict) -> list[str]:
    return [f"{s}.{k}" for s, table in cfg.items() if isinstance(table, dict) for k, _ in _flatten(table)]


def _unknown(key: str, cfg: dict, path: Path, origin: str, what: str = "key") -> UserError:
    m = re.match(r"augment\.(view\d+)\.(.+)$", key)
    if m:  # a per-view key: the candidates are [augment]'s plain keys, inside that view's table
        valid = [f"augment.{m.group(1)}.{k}" for k, v in cfg["augment"].items() if not isinstance(v, dict)]
    else:
        valid = _valid_keys(cfg)
    return UserError(f"{path}: unknown {what} '{key}' (from {origin}).{_closest(key, valid)} "
                     f"`sslctl recipes {path.stem}` lists every key.")


def _closest(key: str, valid: list[str]) -> str:
    """' Closest valid key: X.' for a typo, or ''."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # e.g. a misspelt section: compare the last parts
        tails = [v.rsplit(".", 1)[-1] for v in valid]
        best = difflib.get_close_matches(key.rsplit(".", 1)[-1], tails, n=1)
        close = [valid[tails.index(best[0])]] if best else []
    return f" Closest valid key: {close[0]}." if close else ""


def _assign(cfg: dict, key: str, value: Any, path: Path, origin: str) -> None:
    """Set a dotted key that must already exist (or be a per-view augment key), type-checked."""
    parts = key.split(".")
    if len(parts) < 2:
        raise UserError(f"{path}: '{key}' (from {origin}) needs a section, e.g. optim.lr")
    section = parts[0]
    if section not in cfg or not isinstance(cfg[section], dict):
        raise _unknown(key, cfg, path, origin, what="section")
    table = cfg[section]
    # per-view table: augment.viewN.KEY takes any plain key of [augment]
    if section == "augment" and len(parts) == 3 and _VIEW_TABLE.match(parts[1]):
        base = table.get(parts[2])
        if parts[2] not in table or isinstance(base, dict):
            raise _unknown(key, cfg, path, origin)
        view = table.setdefault(parts[1], {})
        view[parts[2]] = _typed(value, base, key, path, origin)
        return
    for part in parts[1:-1]:
        if not isinstance(table.get(part), dict):
            raise _unknown(key, cfg, path, origin)
        table = table[part]
    last = parts[-1]
    if last not in table:
        raise _unknown(key, cfg, path, origin)
    if isinstance(table[last], dict):
        keys = ", ".join(f"{key}.{k}" for k in table[last])
        raise UserError(f"{path}: '{key}' (from {origin}) is a table; set its keys instead: {keys}")
    table[last] = _typed(value, table[last], key, path, origin)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def _typed(value: Any, current: Any, key: str, path: Path, origin: str) -> Any:
    """`value` converted to the type of `current` (int -> float allowed), else UserError."""
    want, got = _kind(current), _kind(value)
    if want == got:
        if want == "list":
            return _typed_list(value, current, key, path, origin)
        return value
    if want == "float" and got == "int":
        return float(value)
    if want == "string" and got in ("int", "float", "bool"):
        return str(value)  # --set recipe.description=2024 means the text
    article = "an" if want[0] in "aeiou" else "a"
    raise UserError(
        f"{path}: {key} (from {origin}) must be {article} {want} like {_toml_value(current)}, got {_toml_value(value)} ({got})"
    )


def _typed_list(value: list, current: list, key: str, path: Path, origin: str) -> list:
    kinds = {_kind(v) for v in current}
    if not kinds:  # an empty list in the recipe (milestones = []) takes numbers
        kinds = {"int", "float"}
    out = []
    for item in value:
        k = _kind(item)
        if k in kinds:
            out.append(item)
        elif k == "int" and "float" in kinds:
            out.append(float(item))
        else:
            example = _toml_value(current) if current else "[30, 40]"
            raise UserError(f"{path}: {key} (from {origin}) must be a list of {'/'.join(sorted(kinds))} like {example}, got {_toml_value(value)}")
    return out


def _check_views(cfg: dict, path: Path) -> None:
    aug = cfg["augment"]
    n = aug.get("views", 2)
    for name, table in aug.items():
        if isinstance(table, dict):
            m = _VIEW_TABLE.match(name)
            if not m:
                raise UserError(f"{path}: [augment.{name}] is not a per-view table; use [augment.view1] .. [augment.view{n}]")
            if not 1 <= int(m.group(1)) <= n:
                raise UserError(f"{path}: [augment.{name}] but augment.views = {n}; per-view tables are view1 .. view{n}")
            for key, value in table.items():
                if key not in aug or isinstance(aug[key], dict):
                    raise _unknown(f"augment.{name}.{key}", cfg, path, origin=f"[augment.{name}]")
                table[key] = _typed(value, aug[key], f"augment.{name}.{key}", path, f"[augment.{name}]")


def _check_choices(cfg: dict, path: Path) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        tables = [(dotted, cfg.get(section, {}))]
        if section == "augment":
            tables += [(f"augment.{n}.{key}", t) for n, t in cfg["augment"].items() if isinstance(t, dict)]
        for name, table in tables:
            if key in table and table[key] not in allowed:
                close = difflib.get_close_matches(str(table[key]), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise UserError(f"{path}: {name} = {_toml_value(table[key])} must be one of {', '.join(allowed)}{hint}")


def _shipped_keys(method: str) -> tuple[list[str], list[str]]:
    """(every dotted key of sslctl's own recipes for `method`, their names). Empty for a method
    sslctl ships no recipe for (a plugin's): then there is nothing to compare a file against."""
    keys, names = set(), []
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        raw = tomllib.loads(path.read_text())
        if raw.get("recipe", {}).get("method") == method:
            raw.pop("variants", None)
            keys.update(_valid_keys(raw))
            names.append(path.stem)
    return sorted(keys), names


def _check_known_keys(cfg: dict, path: Path) -> None:
    """A recipe file may only use keys that sslctl's recipes of its method or the method's
    defaults have (together every key the method reads), so a typo in a file fails like a typo
    in --set."""
    from sslctl.methods import method_defaults  # the methods import this module

    shipped, names = _shipped_keys(cfg["recipe"]["method"])
    if not shipped:
        return
    valid = sorted(set(shipped) | set(method_defaults(cfg)))
    sections = {key.split(".", 1)[0] for key in valid}
    for section, table in cfg.items():
        pairs = _flatten(table) if isinstance(table, dict) else [(None, table)]
        for key, _ in pairs:
            dotted = section if key is None else f"{section}.{key}"
            per_view = section == "augment" and key is not None and _VIEW_TABLE.match(key.split(".")[0]) and "." in key
            if dotted in valid or dotted == "recipe.variant" or per_view:  # per-view keys: _check_views
                continue
            if section in sections:
                what, name, hint = "key", dotted, _closest(dotted, valid)
            else:
                close = difflib.get_close_matches(section, sorted(sections), n=1)
                what, name, hint = "section", section, f" Closest valid section: [{close[0]}]." if close else ""
            raise UserError(f"{path}: unknown {what} '{name}' (from the file).{hint} `sslctl recipes {names[0]}` "
                            f"prints a {cfg['recipe']['method']} recipe with its keys.")


# Bounds of numeric keys, by the key's last part: (pattern, test, what the value must be).
RANGES = [
    (r"temperature", lambda v: v > 0, "> 0"),
    (r"(batch_size|base_batch|epochs|views|crop_size)", lambda v: v >= 1, ">= 1"),
    (r"lr", lambda v: v > 0, "> 0"),
    (r"(.*weight_decay|warmup_epochs|warmup_steps|final_lr|warmup_start_lr)", lambda v: v >= 0, ">= 0"),
    (r"(.*_p|.*momentum|base_tau)", lambda v: 0 <= v <= 1, "in [0, 1]"),
]


def _check_ranges(cfg: dict, path: Path) -> None:
    for section, table in cfg.items():
        if not isinstance(table, dict):
            continue
        for key, value in _flatten(table):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            for pattern, ok, expected in RANGES:
                if re.fullmatch(pattern, key.rsplit(".", 1)[-1]):
                    if not (math.isfinite(value) and ok(value)):
                        dotted = f"{section}.{key}"
                        raise UserError(f"{path}: {dotted} = {_toml_value(value)} must be {expected}; change it in "
                                        f"the recipe or override it with --set {dotted}=VALUE")
                    break


# ---------------------------------------------------------------------------------------------
# learning rate scaling


def scaled_lr(cfg: dict) -> tuple[float, str]:
    """The peak lr for the recipe's global batch under its scaling rule, and a line saying how."""
    optim = cfg["optim"]
    lr, batch, rule = float(optim["lr"]), int(optim["batch_size"]), optim.get("scaling", "none")
    if rule == "linear":
        base = int(optim["base_batch"])
        out = lr * batch / base
        return out, f"lr {lr:g} x {batch}/{base} (linear scaling) = {out:.6g}"
    if rule == "sqrt":
        out = lr * math.sqrt(batch)
        return out, f"lr {lr:g} x sqrt({batch}) (sqrt scaling) = {out:.6g}"
    if rule == "none":
        return lr, f"lr {lr:g} at batch {batch} (no scaling)"
    raise UserError(f"optim.scaling = '{rule}' must be one of linear, sqrt, none")


# ---------------------------------------------------------------------------------------------
# writing


def recipe_to_toml(cfg: dict) -> str:
    """The resolved recipe as TOML text; `tomllib.loads` of it gives back `cfg`."""
    lines: list[str] = []
    _emit_table(cfg, [], lines)
    return "\n".join(lines).strip() + "\n"


def _emit_table(table: dict, prefix: list[str], lines: list[str]) -> None:
    plain = {k: v for k, v in table.items() if not isinstance(v, dict)}
    subs = {k: v for k, v in table.items() if isinstance(v, dict)}
    if prefix and (plain or not subs):
        lines.append(f"[{'.'.join(_toml_key(p) for p in prefix)}]")
    for key, value in plain.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    if prefix and (plain or not subs):
        lines.append("")
    for key, value in subs.items():
        _emit_table(value, [*prefix, key], lines)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, str):
        # JSON's string escapes are valid TOML; TOML also forbids a raw DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")
