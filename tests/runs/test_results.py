"""The results.json document: a run's rows before evaluation, a row filled from the evaluator's per-task results,
and `mcit eval`'s one-row document with the same per-task keys."""

from __future__ import annotations

import json
from types import SimpleNamespace

from mcit.runs.results import ROW_FIELDS, checkpoint_results, empty_results, set_row

TASKS = ["shape", "mc-color", "caption"]


def _task_result(k: int) -> SimpleNamespace:
    """What the evaluator returns for one task; every field distinct so a swapped field shows."""
    return SimpleNamespace(score=10.0 + k, format_rate=0.5 + k / 10, superficial=20.0 + k, essential=30.0 + k,
                           constrained=40.0 + k, details={"n": k})


def _empty(schedule=([0], [1], [2]), labels=("shape", "mc-color", "caption")) -> dict:
    return empty_results(recipe="r", method="replay", benchmark="synthcit", seed=3, tasks=TASKS, labels=list(labels),
                         schedule=[list(ids) for ids in schedule])


def test_empty_results_has_a_row_per_stage_and_the_zero_shot_row():
    doc = _empty()
    assert (doc["recipe"], doc["method"], doc["benchmark"], doc["seed"], doc["tasks"]) == (
        "r", "replay", "synthcit", 3, TASKS)
    assert doc["stages"] == ["zero-shot", "shape", "mc-color", "caption"]
    assert doc["stage_tasks"] == [[], [0], [1], [2]]
    for key, _ in ROW_FIELDS:
        assert doc[key] == [None] * 4, key
    assert doc["router"] == {"accuracy": [None] * 4}
    assert doc["metrics"] == {} and doc["metrics_constrained"] == {}
    json.dumps(doc)  # written as JSON as it is


def test_empty_results_of_a_joint_schedule_has_two_rows():
    doc = _empty(schedule=([0, 1, 2],), labels=("joint",))
    assert doc["stages"] == ["zero-shot", "joint"] and doc["stage_tasks"] == [[], [0, 1, 2]]
    assert all(doc[key] == [None, None] for key, _ in ROW_FIELDS)


def test_set_row_fills_one_row_from_the_task_results():
    doc = _empty()
    set_row(doc, 2, [_task_result(k) for k in range(3)])
    assert doc["matrix"][2] == [10.0, 11.0, 12.0]
    assert doc["format_matrix"][2] == [0.5, 0.6, 0.7]
    assert doc["superficial"][2] == [20.0, 21.0, 22.0]
    assert doc["essential"][2] == [30.0, 31.0, 32.0]
    assert doc["constrained_matrix"][2] == [40.0, 41.0, 42.0]
    assert doc["details"][2] == [{"n": 0}, {"n": 1}, {"n": 2}]
    for key, _ in ROW_FIELDS:  # the other rows are untouched
        assert [doc[key][row] for row in (0, 1, 3)] == [None] * 3, key
    assert doc["router"] == {"accuracy": [None] * 4}  # no routing report: no confusion key either


def test_set_row_records_the_routing_report_of_that_row():
    doc = _empty()
    confusion = [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
    set_row(doc, 1, [_task_result(k) for k in range(3)], {"accuracy": 83.3, "confusion": confusion})
    set_row(doc, 3, [_task_result(k) for k in range(3)], {"accuracy": 100.0})
    assert doc["router"]["accuracy"] == [None, 83.3, None, 100.0]
    assert doc["router"]["confusion"] == [None, confusion, None, None]


def test_set_row_keeps_the_other_keys_of_a_routing_report_per_row():
    doc = _empty()
    set_row(doc, 2, [_task_result(k) for k in range(3)], {"accuracy": 50.0, "confusion": [[1]], "tasks": list(TASKS),
                                                          "fallbacks": 3, "routing_generations": 24})
    assert doc["router"]["fallbacks"] == [None, None, 3, None]
    assert doc["router"]["routing_generations"] == [None, None, 24, None]
    assert "tasks" not in doc["router"]


def test_checkpoint_results_is_one_row_with_the_run_documents_row_keys():
    results = [_task_result(k) for k in range(2)]
    doc = checkpoint_results("runs/x/checkpoints/stage-02-mc-color", "synthcit", TASKS[:2], results, None)
    assert doc["checkpoint"] == "runs/x/checkpoints/stage-02-mc-color" and doc["benchmark"] == "synthcit"
    assert doc["tasks"] == TASKS[:2] and doc["stages"] == ["checkpoint"] and doc["stage_tasks"] == [[]]
    assert doc["matrix"] == [[10.0, 11.0]] and doc["constrained_matrix"] == [[40.0, 41.0]]
    assert doc["router"] is None
    run_doc = _empty()
    set_row(run_doc, 1, [_task_result(k) for k in range(3)])
    for key, _ in ROW_FIELDS:  # the same per-task row under the same key in both documents
        assert key in doc and len(doc[key]) == 1 and len(doc[key][0]) == 2, key
        assert doc[key][0] == run_doc[key][1][:2], key
    routed = checkpoint_results("c", "synthcit", TASKS[:2], results, {"accuracy": 50.0})
    assert routed["router"] == {"accuracy": 50.0}
