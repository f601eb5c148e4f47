"""Recipe loading: every mistake names its key path and what was expected."""

from __future__ import annotations

import pytest

from mcit.config import load_recipe, recipe_from_dict
from mcit.errors import RecipeError
from mcit.methods.base import build_method


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_suggests_the_closest(tmp_path):
    path = _write(tmp_path, "r.yaml", "output_dir: x\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(RecipeError, match=r"train\.lrr: unknown key; did you mean 'lr'"):
        load_recipe(path)


def test_wrong_type_names_the_path_and_type(tmp_path):
    path = _write(tmp_path, "r.yaml", "output_dir: x\ntrain:\n  lr: fast\n")
    with pytest.raises(RecipeError, match=r"train\.lr: expected number, got str"):
        load_recipe(path)


def test_missing_extends_file_names_the_path(tmp_path):
    path = _write(tmp_path, "r.yaml", "extends: nowhere.yaml\noutput_dir: x\n")
    with pytest.raises(RecipeError, match="nowhere.yaml"):
        load_recipe(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "r.yaml", "output_dir: x\ntrain:\n  lr: [1,\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: line \d+"):
        load_recipe(path)


def test_extends_merges_and_overrides_win(tmp_path):
    _write(tmp_path, "base.yaml", "output_dir: a\ntrain: {lr: 0.1, epochs: 2}\nmethod: {name: replay, per_task: 5}\n")
    path = _write(tmp_path, "r.yaml", "extends: base.yaml\ntrain: {lr: 0.2}\n")
    recipe = load_recipe(path, ["train.epochs=3", "output_dir=/tmp/elsewhere", "train.lr=1e-4"])
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.train.epochs == 3
    assert recipe.output_dir == "/tmp/elsewhere"
    assert recipe.method.options == {"per_task": 5}


def test_scientific_notation_is_a_number():
    recipe = recipe_from_dict({"output_dir": "x", "train": {"lr": "2e-4"}})
    assert recipe.train.lr == pytest.approx(2e-4)


def test_value_ranges_are_checked():
    with pytest.raises(RecipeError, match=r"train\.batch_size"):
        recipe_from_dict({"output_dir": "x", "train": {"batch_size": 0}})


def test_output_dir_is_required():
    with pytest.raises(RecipeError, match="output_dir"):
        recipe_from_dict({})


def test_method_options_are_validated_by_the_method():
    recipe = recipe_from_dict({"output_dir": "x", "method": {"name": "replay", "per_taks": 3}})
    with pytest.raises(RecipeError, match=r"method\.per_taks: unknown key; did you mean 'per_task'"):
        build_method(recipe)
    with pytest.raises(RecipeError, match=r"unknown method 'lora_fft'; did you mean 'lora_ft'"):
        build_method(recipe_from_dict({"output_dir": "x", "method": {"name": "lora_fft"}}))


def test_to_dict_round_trips():
    recipe = recipe_from_dict({"output_dir": "x", "method": {"name": "replay", "per_task": 7}})
    again = recipe_from_dict(recipe.to_dict())
    assert again == recipe


def test_a_settings_recipe_needs_no_output_dir_but_a_training_recipe_does():
    from pathlib import Path

    base = Path(__file__).resolve().parents[1] / "recipes" / "synthcit" / "base.yaml"
    with pytest.raises(RecipeError, match="output_dir"):
        load_recipe(base)
    recipe = load_recipe(base, settings_only=True)
    assert recipe.model.name_or_path == "builtin:tiny-llava" and recipe.eval.max_new_tokens == 24
