"""A run's stages evaluated in order load onto one model (mcit.workflows.load.CheckpointLoader): the model after
advancing is the one a rebuild gives (every tensor, the method's state), the suite's cells and prediction files are
those of a rebuild per stage, the base model is built once for the run, and anything that is not the next stage of
the same run is rebuilt. Checked for sequential LoRA and for an expert method that adds an adapter per stage."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mcit.config import load_recipe
from mcit.evaluation.suites import SuiteGeneration
from mcit.workflows import load as load_module
from mcit.workflows.load import CheckpointLoader, load_checkpoint, prepare_card
from mcit.workflows.suite import CheckpointItem, ItemTiming, evaluate_cells
from mcit.workflows.train import ContinualRunner
from tests.recipes import write_recipe

pytestmark = pytest.mark.slow

METHODS = {"lora_ft": {"name": "lora_ft"}, "disco": {"name": "disco", "reuse_threshold": None}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are too small to gain from threads, and on a shared machine two threads per process
    cost up to 7x more wall time (measured on this file)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(folder, root, method: str):
    recipe = write_recipe(folder / "r.yaml", root, output_dir=folder / "run",
                          model={"name_or_path": "builtin:tiny-llava", "autocast": None},
                          benchmark={"max_train": 24, "max_test": 4},
                          method={**METHODS[method], "lora": {"r": 4, "alpha": 8}},
                          train={"batch_size": 8, "lr": 2e-2, "max_steps": 2, "save_steps": 0, "max_length": 160},
                          eval={"batch_size": 8, "max_new_tokens": 4, "zero_shot": False, "constrained": False})
    return ContinualRunner(load_recipe(recipe)).run().parent


@pytest.fixture(scope="module", params=sorted(METHODS))
def run(request, tmp_path_factory, synthcit_root):
    return _train(tmp_path_factory.mktemp(f"advance-{request.param}"), synthcit_root, request.param)


def _stages(run):
    return sorted((run / "checkpoints").glob("stage-*"))


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_advancing_gives_the_rebuilt_model(run):
    loader = CheckpointLoader()
    first, second = _stages(run)
    one = loader.load(str(first))
    before = _tensors(one.model)
    two = loader.load(str(second))
    assert (one.advanced, two.advanced) == (False, True) and two.model is one.model
    assert (loader.builds, loader.advances) == (1, 1)
    advanced = _tensors(two.model)
    fresh, _, fresh_method, _ = load_checkpoint(str(second))
    rebuilt = _tensors(fresh)
    assert sorted(advanced) == sorted(rebuilt)
    assert all(torch.equal(advanced[k], rebuilt[k]) for k in rebuilt)
    assert json.dumps(two.method.state(), sort_keys=True) == json.dumps(fresh_method.state(), sort_keys=True)
    # the stages differ (otherwise the comparison above would prove nothing): stage 2 trained something, in the
    # shared adapter (lora_ft) or in a slot of its own (disco)
    changed = [k for k in advanced if k not in before or not torch.equal(before[k], advanced[k])]
    assert any("lora_B" in k for k in changed)
    if two.method.name == "disco":  # a slot per task: stage 2 added an adapter to the held model
        assert list(two.model.peft_config) == list(fresh.peft_config) == ["slot0", "slot1"]


def test_anything_but_the_next_stage_of_the_held_run_is_rebuilt(run, count_builds):
    first, second = _stages(run)
    loader = CheckpointLoader()
    assert not loader.load(str(second)).advanced
    assert not loader.load(str(first)).advanced  # an earlier stage: the held model is past it
    assert not loader.load(str(first)).advanced  # the same stage again
    assert loader.load(str(second)).advanced
    assert not loader.load("builtin:tiny-llava").advanced
    assert not loader.load(str(second)).advanced  # a base model held: nothing to advance from
    assert (loader.builds, loader.advances) == (5, 1) and len(count_builds) == 5


def test_suite_cells_equal_a_rebuild_per_stage_with_one_base_build(run, tmp_path, monkeypatch, count_builds):
    recipe = load_recipe(run / "recipe.yaml")
    card = prepare_card(recipe)
    resolved = [(card, task) for task in card.task_names]
    items = [CheckpointItem(f"run/{stage.name}", str(stage)) for stage in _stages(run)]
    generation = SuiteGeneration(max_new_tokens=6, batch_size=3, constrained=True)
    timings: list[ItemTiming] = []
    advanced = evaluate_cells(items, resolved, generation, tmp_path / "advanced", timings)
    assert len(count_builds) == 1  # the base model is built once for the run's two stages
    assert [t.advanced for t in timings] == [False, True]
    monkeypatch.setattr(load_module, "ADVANCES_IN_PLACE", frozenset())  # every stage rebuilt, as before
    rebuilt = evaluate_cells(items, resolved, generation, tmp_path / "rebuilt")
    assert len(count_builds) == 3
    assert sorted(advanced) == sorted(rebuilt) and len(advanced) == 4
    for cell, result in advanced.items():
        assert dataclasses.replace(result, seconds=0) == dataclasses.replace(rebuilt[cell], seconds=0), cell
    files = sorted(p.relative_to(tmp_path / "advanced") for p in (tmp_path / "advanced" / "predictions").rglob("*.jsonl"))
    assert len(files) == 4
    for name in files:
        assert (tmp_path / "advanced" / name).read_text() == (tmp_path / "rebuilt" / name).read_text()


def test_a_runs_base_row_and_its_stages_share_one_build(run, tmp_path, monkeypatch, count_builds):
    """`mcit eval SUITE --checkpoints RUN`: the base row's model becomes stage 1 (the method attached to it as a
    rebuild attaches it to a fresh base) instead of being dropped and built again; every cell as with a build per row."""
    from mcit.workflows.suite import expand_checkpoints

    recipe = load_recipe(run / "recipe.yaml")
    card = prepare_card(recipe)
    resolved = [(card, task) for task in card.task_names]
    items = expand_checkpoints([str(run)])
    assert [i.label.split("/")[1] for i in items] == ["base", *(s.name for s in _stages(run))]
    generation = SuiteGeneration(max_new_tokens=6, batch_size=3, constrained=True)
    timings: list[ItemTiming] = []
    shared = evaluate_cells(items, resolved, generation, tmp_path / "shared", timings)
    assert len(count_builds) == 1 and [t.advanced for t in timings] == [False, True, True]
    monkeypatch.setattr(load_module, "ADVANCES_IN_PLACE", frozenset())  # a build per row, as before
    rebuilt = evaluate_cells(items, resolved, generation, tmp_path / "rebuilt")
    assert len(count_builds) == 4
    assert sorted(shared) == sorted(rebuilt) and len(shared) == 6
    for cell, result in shared.items():
        assert dataclasses.replace(result, seconds=0) == dataclasses.replace(rebuilt[cell], seconds=0), cell
    # the model advanced from the base row is the rebuilt stage 1, every tensor and the method's state
    monkeypatch.undo()
    loader = CheckpointLoader()
    base = loader.load(items[0].checkpoint, load_recipe(items[0].recipe_path, settings_only=True), run_dir=run)
    assert base.method.name != recipe.method.name  # the base row has no method attached
    one = loader.load(str(_stages(run)[0]))
    assert one.advanced and one.method.name == recipe.method.name
    fresh, _, fresh_method, _ = load_checkpoint(str(_stages(run)[0]))
    advanced, rebuilt = _tensors(one.model), _tensors(fresh)
    assert sorted(advanced) == sorted(rebuilt) and all(torch.equal(advanced[k], rebuilt[k]) for k in rebuilt)
    assert json.dumps(one.method.state(), sort_keys=True) == json.dumps(fresh_method.state(), sort_keys=True)


def test_a_base_row_built_with_other_model_settings_is_not_advanced(run, count_builds):
    loader = CheckpointLoader()
    recipe = load_recipe(run / "recipe.yaml", ["model.autocast=bf16"])  # not the settings the run's stages used
    assert not loader.load(recipe.model.name_or_path, recipe, run_dir=run).advanced
    assert not loader.load(str(_stages(run)[0])).advanced
    assert loader.builds == 2
