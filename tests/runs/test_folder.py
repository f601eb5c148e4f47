"""The run folder: stage folder names parse back to what formatted them, stage folders are recognised by name or by
their files (never temporary siblings), and a folder holding one recipe's run refuses another recipe, naming what
changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcit.config import recipe_from_dict
from mcit.errors import RecipeError
from mcit.runs.folder import RunFolder, is_stage_folder, parse_stage_folder, stage_folder_name


@pytest.mark.parametrize(("number", "label"), [(1, "shape"), (3, "mc-color"), (12, "shape+count"), (100, "joint"),
                                               (2, "stage-01-x")])
def test_stage_folder_name_round_trip(number, label):
    name = stage_folder_name(number, label)
    assert name.startswith(f"stage-{number:02d}-")
    assert parse_stage_folder(Path(name)) == (number, label)
    assert parse_stage_folder(Path("/runs/a/checkpoints") / name) == (number, label)  # a whole path: its name


def test_stage_folder_name_pads_to_two_digits():
    assert stage_folder_name(3, "count") == "stage-03-count"


@pytest.mark.parametrize("name", ["stage-01", "stage--shape", "stage-x-shape", "last-step", "checkpoints",
                                  ".stage-01-shape.tmp-123", ".stage-01-shape.old-123", "old-stage-01-shape"])
def test_other_names_are_not_stage_folders(name):
    assert parse_stage_folder(Path(name)) is None


def test_is_stage_folder_by_name_or_by_its_files(tmp_path):
    named = tmp_path / "stage-02-count"
    named.mkdir()
    assert is_stage_folder(named)  # an interrupted stage is still a stage: its name says so
    for marker in ("method.json", "model.safetensors", "MANIFEST.json"):
        folder = tmp_path / f"export-{marker}"
        folder.mkdir()
        (folder / marker).write_text("{}")
        assert is_stage_folder(folder), marker
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "results.json").write_text("{}")
    assert not is_stage_folder(plain)
    assert not is_stage_folder(tmp_path / "missing")


def test_layout_paths(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.root == (tmp_path / "run").resolve()
    stage = run.stage_dir(0, "shape")
    assert stage == run.root / "checkpoints" / "stage-01-shape"
    assert RunFolder.of_stage(stage).root == run.root
    assert run.predictions_dir(0) == run.root / "predictions" / "stage-00"
    assert run.eval_dir(stage, "synthcit") == run.root / "eval" / "stage-01-shape-synthcit"


def test_stage_dirs_lists_stage_folders_only(tmp_path):
    run = RunFolder(tmp_path)
    for name in ("stage-02-mc-color", "stage-01-shape", "last-step", ".stage-03-x.tmp-9"):
        (run.checkpoints / name).mkdir(parents=True)
    (run.checkpoints / "stage-03-file").write_text("not a folder")
    assert run.stage_dirs() == {1: run.checkpoints / "stage-01-shape", 2: run.checkpoints / "stage-02-mc-color"}


def _recipe(out: Path, lr: float = 1e-3, r: int = 4, source: str | None = None):
    recipe = recipe_from_dict({"output_dir": str(out), "name": "folder-test",
                               "method": {"name": "lora_ft", "lora": {"r": r}}, "train": {"lr": lr}})
    recipe.source = source
    return recipe


def test_claim_writes_the_recipe_and_accepts_the_same_one_again(tmp_path):
    out = tmp_path / "run"
    run = RunFolder(out)
    run.claim(_recipe(out, source="/a/recipe.yaml"), {"seed": 0})
    assert run.recipe.is_file() and run.checkpoints.is_dir()
    assert json.loads(run.env.read_text()) == {"seed": 0}
    (run.checkpoints / ".stage-01-shape.tmp-77").mkdir()  # left by a killed writer
    run.claim(_recipe(out, source="/elsewhere/copy.yaml"), {"seed": 0, "again": True})  # the file's place is no key
    assert json.loads(run.env.read_text()) == {"seed": 0, "again": True}
    assert not (run.checkpoints / ".stage-01-shape.tmp-77").exists()


def test_claim_refuses_another_recipe_naming_the_changed_keys(tmp_path):
    out = tmp_path / "run"
    run = RunFolder(out)
    run.claim(_recipe(out), {})
    saved = run.recipe.read_text()
    with pytest.raises(RecipeError) as caught:
        run.claim(_recipe(out, lr=5e-4, r=8), {})
    message = str(caught.value)
    assert "different recipe" in message and str(run.root) in message
    assert "(changed: method.lora.r, train.lr)" in message  # exactly the keys that differ, as dotted paths
    assert run.recipe.read_text() == saved  # the run's own recipe stays


def test_claim_fills_keys_added_to_the_schema_after_the_run_started(tmp_path):
    import yaml

    out = tmp_path / "run"
    run = RunFolder(out)
    run.claim(_recipe(out), {})
    older = yaml.safe_load(run.recipe.read_text())
    del older["benchmark"]["vision_feature_cache_mb"]  # the key a later version added, with its default
    run.recipe.write_text(yaml.safe_dump(older, sort_keys=False))
    run.claim(_recipe(out), {})  # resuming under the newer version: the same recipe
    with pytest.raises(RecipeError, match=r"\(changed: train\.lr\)"):
        run.claim(_recipe(out, lr=5e-4), {})


def test_prediction_dirs_map_rows_to_their_folders(tmp_path):
    run = RunFolder(tmp_path)
    for row in (0, 2, 11):
        run.predictions_dir(row).mkdir(parents=True)
    (tmp_path / "predictions" / "stage-xx").mkdir()  # not a row
    (tmp_path / "predictions" / "stage-03").write_text("a file, not a folder")
    assert run.prediction_dirs() == {0: run.predictions_dir(0), 2: run.predictions_dir(2), 11: run.predictions_dir(11)}
