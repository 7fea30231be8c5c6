"""Where sslctl's own files are: the embedded datasets and the recipes folder."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# Fashion-MNIST, 5,000 + 1,000 gray 28x28 images as idx files: what the fast tests train on.
EMBEDDED_DATASET = PACKAGE_DIR / "_data" / "fashion-mnist-mini"
# EuroSAT RGB, colour class folders split train/ test/: the main job's (shell/quickstart.sh).
EUROSAT_MINI = PACKAGE_DIR / "_data" / "eurosat-mini"


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
