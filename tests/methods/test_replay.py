"""Experience replay (`replay`): `per_task` sample ids kept per finished task, chosen by the seed alone (same seed ->
same buffer, another seed -> another), exactly those samples mixed into later stages, `fraction` instead of a count,
option checks that name the key, and the buffer surviving state() -> JSON -> load_state()."""

from __future__ import annotations

import json

import pytest

from mcit.config import recipe_from_dict
from mcit.errors import RecipeError
from mcit.methods.base import build_method
from mcit.methods.replay import Replay
from mcit.workflows.load import load_task_data, prepare_card

TASKS = ["shape", "mc-color", "caption"]


def _recipe(root, seed: int = 0, **options):
    return recipe_from_dict({
        "output_dir": "unused", "seed": seed,
        "benchmark": {"card": "synthcit", "root": str(root), "tasks": TASKS, "max_train": 24, "max_test": 6},
        "method": {"name": "replay", **options}})


@pytest.fixture(scope="module")
def data(synthcit_root):
    """The tasks' samples, loaded once: every method below sees the same data, so only its seed can differ."""
    recipe = _recipe(synthcit_root)
    return load_task_data(prepare_card(recipe), recipe, lambda _r: None)


def _replay(root, seed: int = 0, **options) -> Replay:
    method = build_method(_recipe(root, seed, **options))
    assert isinstance(method, Replay)
    return method


def _finish(method: Replay, data, stages: int) -> None:
    """after_task of the first `stages` stages (the buffer needs no model)."""
    for stage in range(stages):
        method.after_task(None, stage, [stage], data)


def test_a_finished_task_keeps_per_task_of_its_own_ids(synthcit_root, data):
    method = _replay(synthcit_root, per_task=5)
    assert method.buffer == {}
    _finish(method, data, 1)
    assert list(method.buffer) == ["shape"]
    kept = method.buffer["shape"]
    assert len(kept) == len(set(kept)) == 5
    assert set(kept) <= {s.id for s in data.train["shape"]}
    _finish(method, data, 2)
    assert list(method.buffer) == ["shape", "mc-color"] and method.buffer["shape"] == kept
    assert len(method.buffer["mc-color"]) == 5


def test_the_seed_alone_chooses_the_buffer(synthcit_root, data):
    buffers = []
    for seed in (0, 0, 1):
        method = _replay(synthcit_root, seed=seed, per_task=5)
        _finish(method, data, 2)
        buffers.append(method.buffer)
    assert buffers[0] == buffers[1]
    assert buffers[0]["shape"] != buffers[2]["shape"] or buffers[0]["mc-color"] != buffers[2]["mc-color"]


def test_later_stages_mix_in_exactly_the_buffered_samples(synthcit_root, data):
    method = _replay(synthcit_root, per_task=4)
    first = method.train_samples(0, [0], data)
    assert [s.id for s in first] == [s.id for s in data.train["shape"]]  # nothing to replay yet
    _finish(method, data, 1)
    second = method.train_samples(1, [1], data)
    current = data.train["mc-color"]
    assert second[:len(current)] == current  # the stage's own task, all of it
    replayed = second[len(current):]
    assert [s.task for s in replayed] == ["shape"] * 4
    assert sorted(s.id for s in replayed) == method.buffer["shape"]
    _finish(method, data, 2)
    third = method.train_samples(2, [2], data)
    replayed = third[len(data.train["caption"]):]
    assert len(third) == len(data.train["caption"]) + 8
    assert {(s.task, s.id) for s in replayed} == {(task, i) for task, ids in method.buffer.items() for i in ids}


def test_fraction_keeps_that_share_of_each_task(synthcit_root, data):
    method = _replay(synthcit_root, per_task=2, fraction=0.25)  # fraction wins over per_task
    _finish(method, data, 2)
    for task in ("shape", "mc-color"):
        assert len(method.buffer[task]) == round(len(data.train[task]) * 0.25) == 6
    everything = _replay(synthcit_root, fraction=1.0)
    _finish(everything, data, 1)
    assert everything.buffer["shape"] == sorted(s.id for s in data.train["shape"])


def test_per_task_beyond_the_task_keeps_the_whole_task(synthcit_root, data):
    method = _replay(synthcit_root, per_task=1000)
    _finish(method, data, 1)
    assert len(method.buffer["shape"]) == len(data.train["shape"])
    none = _replay(synthcit_root, per_task=0)
    _finish(none, data, 1)
    assert none.buffer["shape"] == [] and len(none.train_samples(1, [1], data)) == len(data.train["mc-color"])


@pytest.mark.parametrize(("options", "key"), [
    ({"per_task": -1}, "method.per_task"),
    ({"fraction": 0.0}, "method.fraction"),
    ({"fraction": 1.5}, "method.fraction"),
    ({"per_task": "many"}, "method.per_task"),
    ({"per_tsk": 5}, "method.per_tsk"),
])
def test_bad_options_name_the_key(synthcit_root, options, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        build_method(_recipe(synthcit_root, **options))


def test_the_buffer_survives_a_json_round_trip(synthcit_root, data):
    method = _replay(synthcit_root, per_task=3)
    _finish(method, data, 2)
    state = json.loads(json.dumps(method.state()))  # as a checkpoint's method.json holds it
    resumed = _replay(synthcit_root, per_task=3)
    resumed.load_state(state, {})
    assert resumed.buffer == method.buffer
    assert [s.id for s in resumed.train_samples(2, [2], data)] == [s.id for s in method.train_samples(2, [2], data)]
    fresh = _replay(synthcit_root)
    fresh.load_state({}, {})  # a checkpoint without replay state: an empty buffer
    assert fresh.buffer == {}
