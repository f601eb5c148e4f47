"""The results.json document (schema in docs/DESIGN.md): rows of per-task columns, one row per evaluated stage.

A training run's document has the zero-shot row and one row per stage; `mcit eval` writes a one-row document for
a checkpoint. Both are assembled here from the evaluator's per-task results, so the two never differ in shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ROW_FIELDS: tuple[tuple[str, str], ...] = (
    ("matrix", "score"), ("format_matrix", "format_rate"), ("superficial", "superficial"),
    ("essential", "essential"), ("constrained_matrix", "constrained"), ("details", "details"))
"""results.json key of each per-task row and the attribute of an evaluation result it is read from."""


def empty_results(*, recipe: str, method: str, benchmark: str, seed: int, tasks: Sequence[str],
                  labels: Sequence[str], schedule: Sequence[Sequence[int]]) -> dict[str, Any]:
    """A run's document before any row is evaluated: the zero-shot row, then one row per stage of `schedule`."""
    rows = len(schedule) + 1
    doc: dict[str, Any] = {
        "recipe": recipe, "method": method, "benchmark": benchmark, "seed": seed, "tasks": list(tasks),
        "stages": ["zero-shot", *labels], "stage_tasks": [[], *[list(ids) for ids in schedule]]}
    doc.update({key: [None] * rows for key, _ in ROW_FIELDS})
    doc.update({"metrics": {}, "metrics_constrained": {}, "router": {"accuracy": [None] * rows}})
    return doc


def set_row(results: dict[str, Any], row: int, task_results: Sequence[Any], routing: dict | None = None) -> None:
    """Fill row `row` from the evaluator's per-task results (and the router's report of that evaluation)."""
    for key, attribute in ROW_FIELDS:
        results[key][row] = [getattr(r, attribute) for r in task_results]
    if routing is not None:
        results["router"]["accuracy"][row] = routing.get("accuracy")
        confusion = results["router"].setdefault("confusion", [None] * len(results["stages"]))
        confusion[row] = routing.get("confusion")
        # anything else a router reports (experts, expert confusion, MR-LoRA's answers without a valid letter and
        # routing generations) is kept per row under its own key; `tasks` repeats the document's own
        for key, value in routing.items():
            if key not in ("accuracy", "confusion", "tasks"):
                results["router"].setdefault(key, [None] * len(results["stages"]))[row] = value


def checkpoint_results(checkpoint: str, benchmark: str, tasks: Sequence[str], task_results: Sequence[Any],
                       routing: dict | None) -> dict[str, Any]:
    """`mcit eval`'s document: one row ("checkpoint") evaluated on a card's tasks."""
    doc: dict[str, Any] = {"checkpoint": checkpoint, "benchmark": benchmark, "tasks": list(tasks),
                           "stages": ["checkpoint"], "stage_tasks": [[]]}
    doc.update({key: [[getattr(r, attribute) for r in task_results]] for key, attribute in ROW_FIELDS})
    doc["router"] = routing
    return doc
