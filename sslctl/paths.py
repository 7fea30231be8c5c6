"""Where sslctl's own files are: the embedded dataset and the recipes folder."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
EMBEDDED_DATASET = PACKAGE_DIR / "_data" / "fashion-mnist-mini"
# recipes/ sits at the repository top level (sslctl is installed editable from the checkout).
RECIPES_DIR = PACKAGE_DIR.parent / "recipes"
