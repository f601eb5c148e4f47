"""Every shipped recipe loads (extends resolved, every key validated) and builds its method, so a typo in a recipe
fails here instead of at the start of a multi-GPU job."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcit.config import load_recipe
from mcit.methods.base import build_method

RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(p.parents[1])) for p in RECIPES])
def test_a_shipped_recipe_loads_and_builds_its_method(path):
    recipe = load_recipe(path, settings_only=path.name == "base.yaml")
    if path.name != "base.yaml":
        build_method(recipe)
        assert recipe.output_dir
