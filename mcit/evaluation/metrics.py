"""Continual-learning metrics from the stage x task accuracy matrix (docs/DESIGN.md, "Metrics").

``matrix[s][i]`` is the score (0-100) on task i after stage s; row 0 is the zero-shot model. ``stage_tasks[s]`` lists
the task indices trained at stage s (``[]`` for row 0). The classic definitions assume one task per stage; here they
are written with first(i) = the first stage that trained task i and "last" = the final row, so joint training (one
stage training every task) and partial runs (results.json is rewritten after every stage) use the same code:

- MFT = mean_i A[first(i)][i]                         (learning ability)
- MFN = mean_i A[last][i]                             ("Last")
- MAA = mean over stages s >= 1 of mean_{i seen by s} A[s][i]   ("Avg")
- BWT = mean over i not trained at the last stage of (A[last][i] - A[first(i)][i])
- forgetting = mean over the same i of (max_{first(i) <= s < last} A[s][i] - A[last][i])
- FWT = mean over i with first(i) > 1 of (A[first(i) - 1][i] - A[0][i])

Only tasks trained by the last row count (a task not trained yet has no first(i)). A metric is None when no task
qualifies (BWT, forgetting and FWT of joint training) or when a cell it needs is None (not evaluated): a mean over a
silently shrunk set of tasks would not be comparable across runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from mcit.errors import EvalError

METRIC_MEANINGS = {
    "MFT": "mean of each task's score right after training it",
    "MFN": "mean score over all tasks after the last stage ('Last')",
    "MAA": "mean over stages of the mean score on the tasks seen so far ('Avg')",
    "BWT": "backward transfer: mean change from right-after-training to the end (negative = forgetting)",
    "forgetting": "mean drop from a task's best earlier score to its final score",
    "FWT": "forward transfer: score before training a task minus the zero-shot score",
}
"""Each continual metric in one line (model cards and reports); the definitions are in the module docstring."""
METRICS = tuple(METRIC_MEANINGS)
"""The continual metrics `continual_metrics` returns, in table order: the one list report, export and bench read."""

Matrix = Sequence[Sequence[float | None]]


class _Missing(Exception):
    """A cell a metric needs was not evaluated."""


def validate_matrix(matrix: Matrix, stage_tasks: Sequence[Sequence[int]]) -> int:
    """Check shapes and values; return the number of tasks. Errors name the offending row/column."""
    if not matrix:
        raise EvalError("accuracy matrix is empty; it needs at least the zero-shot row")
    n_tasks = len(matrix[0])
    for s, row in enumerate(matrix):
        if len(row) != n_tasks:
            raise EvalError(f"accuracy matrix row {s} has {len(row)} columns, row 0 has {n_tasks}")
        for i, value in enumerate(row):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise EvalError(f"accuracy matrix cell [row {s}][column {i}] is {value!r}; expected a number or None")
    if len(stage_tasks) != len(matrix):
        raise EvalError(f"stage_tasks has {len(stage_tasks)} entries but the matrix has {len(matrix)} rows")
    if list(stage_tasks[0]) != []:
        raise EvalError(f"stage_tasks[0] must be [] (row 0 is the zero-shot model), got {list(stage_tasks[0])}")
    for s, tasks in enumerate(stage_tasks[1:], start=1):
        if not tasks:
            raise EvalError(f"stage_tasks[{s}] is empty; every stage after zero-shot trains at least one task")
        for i in tasks:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_tasks:
                raise EvalError(f"stage_tasks[{s}] names task {i!r}; valid task indices are 0..{n_tasks - 1}")
    return n_tasks


def first_stages(stage_tasks: Sequence[Sequence[int]]) -> dict[int, int]:
    """Task index -> first stage that trained it (tasks not trained yet are absent)."""
    first: dict[int, int] = {}
    for s, tasks in enumerate(stage_tasks):
        for i in tasks:
            first.setdefault(i, s)
    return first


def continual_metrics(matrix: Matrix, stage_tasks: Sequence[Sequence[int]],
                      columns: Sequence[int] | None = None) -> dict[str, float | None]:
    """MFT, MFN, MAA, BWT, forgetting and FWT of an accuracy matrix (definitions in the module docstring).

    ``columns`` restricts every metric to those tasks (e.g. the closed-answer tasks of a constrained-score matrix,
    whose caption columns are None); MAA then averages over the stages that had seen at least one of them.
    """
    validate_matrix(matrix, stage_tasks)
    first = first_stages(stage_tasks)
    if columns is not None:
        first = {i: s for i, s in first.items() if i in set(columns)}
    last = len(matrix) - 1
    tasks = sorted(first)
    kept = [i for i in tasks if i not in stage_tasks[last]]  # tasks that had a chance to be forgotten

    def cell(s: int, i: int) -> float:
        value = matrix[s][i]
        if value is None:
            raise _Missing
        return float(value)

    def mean_or_none(compute: Callable[[int], float], items: Sequence[int]) -> float | None:
        if not items:
            return None
        try:
            values = [compute(x) for x in items]
        except _Missing:
            return None
        return sum(values) / len(values)

    def seen_by(s: int) -> list[int]:
        return sorted({i for tasks_s in stage_tasks[1 : s + 1] for i in tasks_s if i in first})

    def stage_average(s: int) -> float:
        seen = seen_by(s)
        return sum(cell(s, i) for i in seen) / len(seen)

    return {
        "MFT": mean_or_none(lambda i: cell(first[i], i), tasks),
        "MFN": mean_or_none(lambda i: cell(last, i), tasks),
        "MAA": mean_or_none(stage_average, [s for s in range(1, last + 1) if seen_by(s)]),
        "BWT": mean_or_none(lambda i: cell(last, i) - cell(first[i], i), kept),
        "forgetting": mean_or_none(lambda i: max(cell(s, i) for s in range(first[i], last)) - cell(last, i), kept),
        "FWT": mean_or_none(lambda i: cell(first[i] - 1, i) - cell(0, i), [i for i in tasks if first[i] > 1]),
    }


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _escape(text: str) -> str:
    return str(text).replace("|", r"\|")


def matrix_to_markdown(matrix: Matrix, stages: Sequence[str], tasks: Sequence[str], digits: int = 1) -> str:
    """The accuracy matrix as a markdown table: one row per stage, one column per task, "–" where not evaluated."""
    if len(stages) != len(matrix):
        raise EvalError(f"{len(stages)} stage labels for a matrix of {len(matrix)} rows")
    for s, row in enumerate(matrix):
        if len(row) != len(tasks):
            raise EvalError(f"accuracy matrix row {s} ({stages[s]!r}) has {len(row)} columns for {len(tasks)} tasks")
    lines = [
        "| stage | " + " | ".join(_escape(t) for t in tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for label, row in zip(stages, matrix):
        lines.append(f"| {_escape(label)} | " + " | ".join(_fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def metrics_to_markdown(
    metrics: Mapping[str, float | None] | Mapping[str, Mapping[str, float | None]], digits: int = 1
) -> str:
    """Metrics as a markdown table, columns in `METRICS` order (other keys follow).

    ``metrics`` is either one result of `continual_metrics` or a mapping label -> result (e.g. {"free": ...,
    "constrained": ...}), which gives one labelled row each.
    """
    nested = any(isinstance(v, Mapping) for v in metrics.values())
    rows: dict[str, Mapping[str, float | None]] = dict(metrics) if nested else {"": metrics}  # type: ignore[arg-type]
    for label, row in rows.items():
        if not isinstance(row, Mapping):
            raise EvalError(f"metrics_to_markdown: entry {label!r} is {row!r}; give all rows as dicts or none")
    keys = [k for k in METRICS if any(k in r for r in rows.values())]
    keys += [k for r in rows.values() for k in r if k not in keys]
    keys = list(dict.fromkeys(keys))
    header = ("| |" if nested else "|") + "".join(f" {_escape(k)} |" for k in keys)
    rule = ("|---|" if nested else "|") + "---:|" * len(keys)
    lines = [header, rule]
    for label, row in rows.items():
        cells = "".join(f" {_fmt(row.get(k), digits)} |" for k in keys)
        lines.append((f"| {_escape(label)} |" if nested else "|") + cells)
    return "\n".join(lines)
