"""Recipe resolution: variants, --set overrides, validation messages, TOML round trip, lr scaling."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from sslctl.errors import UserError
from sslctl.paths import RECIPES_DIR
from sslctl.recipes import REQUIRED_SECTIONS, list_recipes, load_recipe, parse_override, recipe_to_toml, scaled_lr
from tests.conftest import run_cli

ALL = [name for name, _ in list_recipes()]


def test_moco_v2_defaults_and_auto_small_variant():
    full = load_recipe("moco_v2")
    assert full["recipe"]["variant"] == "none"
    assert full["encoder"]["name"] == "resnet50" and full["method"]["queue_size"] == 65536
    assert "variants" not in full
    small = load_recipe("moco_v2", image_size=32)  # auto -> small at <= 64 px
    assert small["recipe"]["variant"] == "small"
    assert small["encoder"] == {"name": "resnet18", "small_stem": True}
    assert small["method"]["queue_size"] == 4096 and small["loss"]["temperature"] == 0.1
    # keys the variant does not touch keep the top-level value
    assert small["method"]["momentum"] == 0.99 and small["method"]["bn_splits"] == 8
    assert load_recipe("moco_v2", image_size=224)["recipe"]["variant"] == "none"
    assert load_recipe("moco_v2", image_size=32, variant="none")["encoder"]["name"] == "resnet50"
    assert load_recipe("moco_v2", variant="small")["encoder"]["name"] == "resnet18"


def test_unknown_variant_names_the_choices():
    with pytest.raises(UserError, match=r"moco_v2\.toml.*unknown variant 'tiny'.*small"):
        load_recipe("moco_v2", variant="tiny")


def test_by_path(tmp_path: Path):
    path = tmp_path / "mine.toml"
    path.write_text((RECIPES_DIR / "moco_v2.toml").read_text().replace('name = "moco_v2"', 'name = "mine"'))
    assert load_recipe(str(path))["recipe"]["name"] == "mine"
    with pytest.raises(UserError, match="not found.*moco_v2"):
        load_recipe("moco_v3")


def test_set_overrides_types_and_nesting():
    cfg = load_recipe(
        "moco_v2",
        overrides=[
            "optim.lr=0.3",
            "schedule.epochs=50",
            "optim.weight_decay=0",  # int where float is expected -> float
            "optim.name=lars",  # bare word -> string
            "schedule.milestones=[120, 160]",
            "augment.crop_scale=[0.08, 1]",
            "augment.view2.blur_p=0.1",  # per-view table created on demand
            "method.symmetric=true",
        ],
    )
    assert cfg["optim"]["lr"] == 0.3 and cfg["schedule"]["epochs"] == 50
    assert cfg["optim"]["weight_decay"] == 0.0 and isinstance(cfg["optim"]["weight_decay"], float)
    assert cfg["optim"]["name"] == "lars" and cfg["schedule"]["milestones"] == [120, 160]
    assert cfg["augment"]["crop_scale"] == [0.08, 1.0] and all(isinstance(v, float) for v in cfg["augment"]["crop_scale"])
    assert cfg["augment"]["view2"] == {"blur_p": 0.1} and cfg["method"]["symmetric"] is True
    # overrides apply after the variant
    assert load_recipe("moco_v2", image_size=32, overrides=["loss.temperature=0.3"])["loss"]["temperature"] == 0.3


@pytest.mark.parametrize(
    "item, pattern",
    [
        ("optim.lrr=0.1", r"unknown key 'optim.lrr'.*Closest valid key: optim.lr\b"),
        ("optm.lr=0.1", r"unknown section 'optm.lr'.*Closest valid key: optim.lr\b"),
        ("augment.blur=0.5", r"Closest valid key: augment.blur_p\b"),
        ("augment.view1.blurp=1", r"augment.view1.blurp.*Closest valid key: augment.view1.blur_p\b"),
        ("optim.lr=fast", r"optim.lr .*must be a float like 0.03, got \"fast\""),
        ("schedule.epochs=1.5", r"schedule.epochs .*must be an int like 200, got 1.5"),
        ("method.symmetric=1", r"method.symmetric .*must be a bool"),
        ("augment.jitter=0.4", r"augment.jitter .*must be a list"),
        ("augment.jitter=[0.4, \"a\", 0.4, 0.1]", r"augment.jitter .*list of float"),
        ("augment.view3.blur_p=1", r"view3.*augment.views = 2"),
        ("optim.name=lasr", r"optim.name .*one of sgd, lars.*did you mean 'lars'"),
        ("lr=0.1", r"needs a section"),
        ("optim.lr", r"expected section.key=value"),
        ("head=1", r"needs a section"),
    ],
)
def test_bad_overrides_name_file_key_and_closest(item, pattern):
    with pytest.raises(UserError, match=pattern) as err:
        load_recipe("moco_v2", overrides=[item])
    if "=" in item and "." in item.split("=")[0]:
        assert "moco_v2.toml" in str(err.value)


def test_table_cannot_be_set_whole(tmp_path: Path):
    cfg = load_recipe("moco_v2", overrides=["augment.view1.blur_p=1.0"])
    path = tmp_path / "r.toml"
    path.write_text(recipe_to_toml(cfg))
    with pytest.raises(UserError, match="is a table; set its keys instead: augment.view1.blur_p"):
        load_recipe(str(path), overrides=["augment.view1=1"])


def test_parse_override_values():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a.b = 0.5") == ("a.b", 0.5)
    assert parse_override("a.b=[1, 2.5]") == ("a.b", [1, 2.5])
    assert parse_override('a.b="x y"') == ("a.b", "x y")
    assert parse_override("a.b=resnet18") == ("a.b", "resnet18")
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_missing_section_and_bad_toml(tmp_path: Path):
    text = (RECIPES_DIR / "moco_v2.toml").read_text()
    path = tmp_path / "nohead.toml"
    path.write_text(text.replace("[head]", "[heads]"))
    with pytest.raises(UserError, match=r"nohead.toml: missing section\(s\) \[head\]"):
        load_recipe(str(path))
    path.write_text("[recipe\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(str(path))


def test_variant_with_an_unknown_key_is_an_error(tmp_path: Path):
    path = tmp_path / "v.toml"
    path.write_text((RECIPES_DIR / "moco_v2.toml").read_text() + "\n[variants.small.optim2]\nlr = 1.0\n")
    with pytest.raises(UserError, match=r"\[variants.small\].*Closest valid key: optim.lr"):
        load_recipe(str(path), variant="small")


def test_per_view_table_in_file_is_validated(tmp_path: Path):
    text = (RECIPES_DIR / "moco_v2.toml").read_text()
    path = tmp_path / "pv.toml"
    path.write_text(text.replace("# 2. encoder", "[augment.view1]\nblur_p = 1\nsolarize = 0.2\n\n# 2. encoder"))
    with pytest.raises(UserError, match=r"augment.view1.solarize.*Closest valid key: augment.view1.solarize_p"):
        load_recipe(str(path))
    path.write_text(text.replace("# 2. encoder", "[augment.view1]\nblur_p = 1\n\n# 2. encoder"))
    assert load_recipe(str(path))["augment"]["view1"] == {"blur_p": 1.0}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("variant", ["none", "auto32"])
def test_every_recipe_resolves_and_round_trips(name, variant, tmp_path: Path):
    cfg = load_recipe(name, image_size=32 if variant == "auto32" else None, variant="auto" if variant == "auto32" else variant)
    assert set(REQUIRED_SECTIONS) <= set(cfg)
    text = recipe_to_toml(cfg)
    assert tomllib.loads(text) == cfg
    # a run dir's recipe.toml loads back to the same recipe, variant kept
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    assert load_recipe(str(path)) == cfg
    lr, message = scaled_lr(cfg)
    assert lr > 0 and message


def test_recipe_to_toml_value_types():
    cfg = {
        "recipe": {"name": 'q"uote\\back', "tab": "a\tb\x7f", "u": "é"},
        "x": {"f": 1e-6, "big": 1e300, "i": -3, "b": False, "l": [[1, 2], ["a"]], "e": [], "inf": math.inf},
        "y": {"sub": {"k": 1}},
        "z": {},
    }
    assert tomllib.loads(recipe_to_toml(cfg)) == cfg


def test_scaled_lr_rules():
    base = load_recipe("moco_v2")
    lr, msg = scaled_lr({**base, "optim": {**base["optim"], "batch_size": 512}})
    assert lr == pytest.approx(0.06)
    assert msg == "lr 0.03 x 512/256 (linear scaling) = 0.06"
    lr, msg = scaled_lr({**base, "optim": {**base["optim"], "lr": 0.075, "batch_size": 4096, "scaling": "sqrt"}})
    assert lr == pytest.approx(4.8) and "sqrt(4096)" in msg  # docs/spec/methods.md §0.4: 0.075 sqrt = 0.3 linear at 4096
    lr, msg = scaled_lr({**base, "optim": {**base["optim"], "batch_size": 4096, "scaling": "none"}})
    assert lr == 0.03 and "no scaling" in msg


def test_cli_lists_and_prints(tmp_path: Path):
    listing = run_cli("recipes")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert len(lines) == len(ALL) and lines[0].split()[0] == ALL[0] and "MoCo v2" in listing.stdout
    shown = run_cli("recipes", "moco_v2", "--variant", "small", "--set", "optim.lr=0.12")
    assert shown.returncode == 0, shown.stderr
    cfg = tomllib.loads(shown.stdout)
    assert cfg["optim"]["lr"] == 0.12 and cfg["recipe"]["variant"] == "small"
    assert "(linear scaling)" in shown.stderr
    bad = run_cli("recipes", "moco_v2", "--set", "optim.lrr=1")
    assert bad.returncode == 2 and "optim.lr" in bad.stderr and "Traceback" not in bad.stderr and bad.stdout == ""


def _moco_file(tmp_path: Path, old: str, new: str) -> Path:
    text = (RECIPES_DIR / "moco_v2.toml").read_text()
    assert old in text
    path = tmp_path / "mine.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old, new, pattern", [
    ("lr = 0.03 ", "lrr = 0.03 ", r"mine.toml: unknown key 'optim.lrr' \(from the file\)\. Closest valid key: optim.lr\b"),
    ("[optim]", "[optimizer]", r"missing section\(s\) \[optim\] \(a typo: \[optimizer\]\?\)"),
    ("[optim]", "[optimizer]\nwarmup = 1\n[optim]", r"unknown section 'optimizer' \(from the file\)\. Closest valid section: \[optim\]\."),
    ("flip_p = 0.5", "flip_p = 0.5\nflip_prob = 0.5", r"unknown key 'augment.flip_prob'.*Closest valid key: augment.flip_p\b"),
    ("symmetric = false", "symmetric = false\n[method.extra]\nx = 1", r"unknown key 'method.extra.x'"),
])
def test_unknown_keys_in_a_recipe_file_name_the_closest_valid_key(tmp_path: Path, old, new, pattern):
    with pytest.raises(UserError, match=pattern):
        load_recipe(str(_moco_file(tmp_path, old, new)))


def test_per_view_tables_and_a_plugin_method_pass_the_file_key_check(tmp_path: Path, monkeypatch):
    path = _moco_file(tmp_path, "# 2. encoder", "[augment.view2]\nblur_p = 0.1\n\n# 2. encoder")  # per-view: [augment]'s keys
    assert load_recipe(str(path))["augment"]["view2"] == {"blur_p": 0.1}
    # a method sslctl ships no recipe for (a plugin's): nothing to compare against, no check
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "methods.py").write_text("from sslctl.methods.moco import METHOD\n\nclass Mine(METHOD):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _moco_file(tmp_path, 'method = "moco"', 'method = "mypkg.methods:Mine"')
    path.write_text(path.read_text().replace("lr = 0.03 ", "my_lr = 0.03\nlr = 0.03 "))
    assert load_recipe(str(path))["optim"]["my_lr"] == 0.03


@pytest.mark.parametrize("override, pattern", [
    ("loss.temperature=0", r"loss.temperature = 0.0 must be > 0"),
    ("loss.temperature=-0.1", r"loss.temperature = -0.1 must be > 0"),
    ("optim.lr=-0.1", r"optim.lr = -0.1 must be > 0"),
    ("optim.lr=nan", r"optim.lr = nan must be > 0"),
    ("optim.batch_size=0", r"optim.batch_size = 0 must be >= 1"),
    ("schedule.epochs=-1", r"schedule.epochs = -1 must be >= 1"),
    ("schedule.warmup_epochs=-2", r"schedule.warmup_epochs = -2 must be >= 0"),
    ("optim.weight_decay=-1e-4", r"optim.weight_decay = -0.0001 must be >= 0"),
    ("augment.blur_p=1.5", r"augment.blur_p = 1.5 must be in \[0, 1\]"),
    ("augment.view2.solarize_p=-0.2", r"augment.view2.solarize_p = -0.2 must be in \[0, 1\]"),
    ("method.momentum=1.2", r"method.momentum = 1.2 must be in \[0, 1\]"),
])
def test_values_out_of_range_are_refused(override, pattern):
    with pytest.raises(UserError, match=r"moco_v2.toml: " + pattern):
        load_recipe("moco_v2", overrides=[override])


def test_a_zero_temperature_in_a_file_is_refused(tmp_path: Path):
    with pytest.raises(UserError, match=r"mine.toml: loss.temperature = 0.0 must be > 0"):
        load_recipe(str(_moco_file(tmp_path, "temperature = 0.2", "temperature = 0.0")))


def test_a_binary_recipe_file_is_a_user_error(tmp_path: Path):
    path = tmp_path / "weights.toml"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError, match=r"weights.toml: not a TOML text file"):
        load_recipe(str(path))
    res = run_cli("recipes", str(path))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "weights.toml" in res.stderr, res.stderr
