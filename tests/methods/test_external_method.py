"""A method from outside the package (tests/methods/plugin_method.py): named in a recipe as `package.module:Class`
it trains through `python -m mcit train` with its own per-stage settings; registered under the `mcit.methods`
entry-point group it is found by name; a spec that does not name a Method subclass is refused naming `method.name`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mcit.config import recipe_from_dict
from mcit.errors import RecipeError
from mcit.methods import base
from mcit.methods.base import ENTRY_POINT_GROUP, build_method, method_class
from mcit.workflows.train import stage_settings
from tests.methods import plugin_method
from tests.methods.plugin_method import ADAPTER, STAGE2_LR, STAGE2_STEPS, OwnStageSettings
from tests.recipes import write_recipe

ROOT = Path(__file__).resolve().parents[2]
SPEC = "tests.methods.plugin_method:OwnStageSettings"
RECIPE_LR = 1e-3
RECIPE_STEPS = 2


def _mcit(*args: str) -> subprocess.CompletedProcess:
    """`python -m mcit ARGS` from the repository root, with the root on PYTHONPATH so `tests` imports."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "mcit", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _recipe(name: str, **train):
    return recipe_from_dict({"output_dir": "unused", "method": {"name": name, "lora": {"r": 4, "alpha": 8}},
                             "train": {"lr": RECIPE_LR, "max_steps": RECIPE_STEPS, **train}})


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory, synthcit_root) -> Path:
    folder = tmp_path_factory.mktemp("plugin")
    recipe = write_recipe(folder / "recipe.yaml", synthcit_root, output_dir=folder / "out",
                          method={"name": SPEC, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                          train={"batch_size": 8, "lr": RECIPE_LR, "max_steps": RECIPE_STEPS, "save_steps": 0,
                                 "log_steps": 1},
                          benchmark={"max_train": 32, "max_test": 8})
    proc = _mcit("train", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "out"


@pytest.mark.slow
def test_the_run_finishes_under_the_spec(plugin_run):
    results = json.loads((plugin_run / "results.json").read_text())
    assert results["method"] == SPEC
    assert results["stages"] == ["zero-shot", "shape", "mc-color"]
    assert len(results["matrix"]) == 3 and all(row is not None and len(row) == 2 for row in results["matrix"])
    assert set(results["metrics"]) >= {"MFT", "MFN", "MAA", "BWT"}
    stage = plugin_run / "checkpoints" / "stage-02-mc-color"
    assert json.loads((stage / "method.json").read_text())["method"] == SPEC
    saved = load_file(str(stage / "model.safetensors"))
    assert saved and all(f".{ADAPTER}." in k for k in saved)  # the plugin's own adapter was trained and saved


@pytest.mark.slow
def test_the_second_stage_trains_with_the_plugins_settings(plugin_run):
    records = [json.loads(line) for line in (plugin_run / "log.jsonl").read_text().splitlines()]
    train = {label: [r for r in records if r["event"] == "train" and r["task"] == label]
             for label in ("shape", "mc-color")}
    # stage 1: the recipe's train settings
    assert [r["step"] for r in train["shape"]] == [1, 2]
    assert {r["steps"] for r in train["shape"]} == {RECIPE_STEPS}
    assert max(r["lr"] for r in train["shape"]) == pytest.approx(RECIPE_LR)  # the peak of warmup + cosine
    # stage 2: the method's stage_training overrides
    assert [r["step"] for r in train["mc-color"]] == list(range(1, STAGE2_STEPS + 1))
    assert {r["steps"] for r in train["mc-color"]} == {STAGE2_STEPS}
    assert max(r["lr"] for r in train["mc-color"]) == pytest.approx(STAGE2_LR)
    timing = json.loads((plugin_run / "timing.json").read_text())
    assert timing["train"]["shape"]["steps"] == RECIPE_STEPS and timing["train"]["mc-color"]["steps"] == STAGE2_STEPS


def test_the_spec_builds_the_plugin_and_its_stage_settings():
    recipe = _recipe(SPEC)
    method = build_method(recipe)
    assert type(method) is OwnStageSettings
    assert stage_settings(method, recipe, 0, [0]) == recipe.train
    second = stage_settings(method, recipe, 1, [1])
    assert (second.lr, second.max_steps) == (STAGE2_LR, STAGE2_STEPS)
    assert second.batch_size == recipe.train.batch_size  # the keys it does not override stay the recipe's



def test_stage_settings_refuse_unknown_keys_and_engine_keys_under_deepspeed(monkeypatch):
    recipe = _recipe(SPEC)
    method = build_method(recipe)
    monkeypatch.setattr(method, "stage_training", lambda stage, ids: {"learning_rate": 1e-3})
    with pytest.raises(RecipeError, match=r"unknown train keys \['learning_rate'\]"):
        stage_settings(method, recipe, 1, [1])
    monkeypatch.setattr(method, "stage_training", lambda stage, ids: {"lr": 1e-3, "grad_accum": 4})
    assert stage_settings(method, recipe, 1, [1]).grad_accum == 4  # one process: the loop reads it per stage
    with pytest.raises(RecipeError, match=r"stage 2 changes train\.grad_accum.*DeepSpeed engine"):
        stage_settings(method, recipe, 1, [1], deepspeed=True)
    monkeypatch.setattr(method, "stage_training", lambda stage, ids: {"lr": 1e-3})
    assert stage_settings(method, recipe, 1, [1], deepspeed=True).lr == 1e-3  # lr lives in the optimizer groups

def _entry_points(**targets: str):
    """A stand-in for importlib.metadata.entry_points with `targets` (name -> value) in mcit's group."""
    points = [EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP) for name, value in targets.items()]

    def entry_points(*, group: str | None = None, **_):
        return [p for p in points if group is None or p.group == group]

    return entry_points


def test_an_entry_point_names_the_plugin(monkeypatch):
    monkeypatch.setattr(base, "entry_points", _entry_points(**{"own-stage-settings": SPEC}))
    assert method_class("own-stage-settings") is OwnStageSettings
    method = build_method(_recipe("own-stage-settings"))
    assert type(method) is OwnStageSettings
    assert method_class("lora_ft").name == "lora_ft"  # built-ins are still found by name


def test_an_entry_point_that_is_not_a_method_is_refused(monkeypatch):
    monkeypatch.setattr(base, "entry_points", _entry_points(broken="tests.methods.plugin_method:NotAMethod"))
    with pytest.raises(RecipeError, match=r"method\.name.*NotAMethod.*not a subclass"):
        build_method(_recipe("broken"))


def test_an_unknown_name_without_an_entry_point_is_refused(monkeypatch):
    monkeypatch.setattr(base, "entry_points", _entry_points())
    with pytest.raises(RecipeError, match=r"method\.name: unknown method 'own-stage-settings'.*package\.module"):
        build_method(_recipe("own-stage-settings"))


@pytest.mark.parametrize(("spec", "says"), [
    ("nope.module:X", r"method\.name: cannot import 'nope\.module'"),
    ("tests.methods.plugin_method:NotAMethod", r"method\.name: .*NotAMethod.* is not a subclass"),
    ("tests.methods.plugin_method:Missing", r"method\.name: .*Missing.* is not a subclass"),
    ("tests.methods.plugin_method:ADAPTER", r"method\.name: .*ADAPTER.* is not a subclass"),
])
def test_a_bad_spec_is_refused_naming_method_name(spec, says):
    assert hasattr(plugin_method, "NotAMethod")  # the module itself imports: only the class is wrong
    with pytest.raises(RecipeError, match=says):
        build_method(_recipe(spec))


@pytest.mark.slow
def test_mcit_train_refuses_a_bad_spec_before_training(tmp_path, synthcit_root):
    recipe = write_recipe(tmp_path / "recipe.yaml", synthcit_root, output_dir=tmp_path / "out",
                          method={"name": "tests.methods.plugin_method:NotAMethod"})
    proc = _mcit("train", str(recipe))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "method.name" in proc.stderr and "NotAMethod" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before the run folder was claimed
