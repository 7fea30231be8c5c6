"""Where sslctl's own files are: the embedded dataset and the recipes folder."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
EMBEDDED_DATASET = PACKAGE_DIR / "_data" / "fashion-mnist-mini"


def _recipes_dir() -> Path:
    """The top-level recipes/ of a checkout (editable install), else the copy a wheel ships.

    recipes/ is the only source: pyproject.toml maps it into the wheel as the data package
    sslctl._recipes, so a `pip install .` finds it next to this file. The checkout is recognised
    by its pyproject.toml, so a stray `recipes` folder in site-packages is never taken."""
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "recipes").is_dir():
        return checkout / "recipes"
    return PACKAGE_DIR / "_recipes"


RECIPES_DIR = _recipes_dir()
