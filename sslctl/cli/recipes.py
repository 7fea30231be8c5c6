"""`sslctl recipes`: list the recipes, or print one resolved (variant and --set applied) as TOML."""

from __future__ import annotations

from typing import List, Optional

import typer

from sslctl.cli._bounds import at_least


def command(
    name: Optional[str] = typer.Argument(None, help="Recipe name (recipes/NAME.toml) or path; omit to list all."),
    variant: str = typer.Option("auto", "--variant", help="Variant to apply: none, auto, or a [variants.NAME] of the recipe (e.g. small)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: section.key=value (repeatable)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", callback=at_least(1), help="With --variant auto: pick the small variant for images <= 64 px."),
) -> None:
    """List recipes (one line each), or print the resolved recipe NAME as TOML on stdout.

    Example:

    \b
        sslctl recipes moco_v2 --variant small --set optim.lr=0.1
    """
    from sslctl.recipes import list_recipes, load_recipe, recipe_to_toml, scaled_lr
    from sslctl import console

    if name is None:
        recipes = list_recipes()
        width = max((len(n) for n, _ in recipes), default=0)
        for recipe, description in recipes:
            print(f"{recipe:<{width}}  {description}")
        return
    cfg = load_recipe(name, variant=variant, overrides=set_ or (), image_size=image_size)
    console.log(scaled_lr(cfg)[1])
    print(recipe_to_toml(cfg), end="")
