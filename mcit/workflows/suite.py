"""`mcit eval SUITE --checkpoints A B ...`: every checkpoint on every task of an evaluation suite (eval/*.yaml), one
results.json (checkpoints x tasks) and a report with plots.

A checkpoint item is a run folder (expanded to its base model, the reference row, then every stage folder), a stage
folder, an exported expert set, a PEFT adapter, an HF model (id or folder) or `builtin:...`. Each (checkpoint, task)
cell is written atomically to `<out>/cells/` as soon as it is scored, and a re-run after a kill reuses every cell it
finds, so an interrupted evaluation finishes with the results.json an uninterrupted one writes (greedy decoding is
deterministic). Retention: for a run, each stage's score minus its base model's, per task and on average.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from mcit.config import load_recipe
from mcit.data.collate import Encoder, PixelCache
from mcit.data.validate import validate_card
from mcit.errors import CheckpointError, DataError, EvalError
from mcit.evaluation.evaluate import TaskResult, evaluate_task
from mcit.evaluation.suites import EvalSuite, load_suite
from mcit.report import plots
from mcit.report.render import Document, fmt
from mcit.runs.folder import RunFolder
from mcit.runtime import dist, failpoints
from mcit.runtime.files import write_json_atomic, write_text_atomic
from mcit.workflows.load import align_boxes, load_checkpoint

COLUMNS = {"score": "score", "format": "format_rate", "superficial": "superficial", "essential": "essential",
           "constrained": "constrained"}


@dataclasses.dataclass
class CheckpointItem:
    label: str
    """The row's name: `<run>/base`, `<run>/<stage folder>`, or the item's folder name."""
    checkpoint: str
    recipe_path: Path | None = None
    """A run's recipe: model settings for its base-model row."""
    run: str | None = None
    """The run folder's name for rows of a run (their retention is measured against `<run>/base`)."""


def expand_checkpoints(items: list[str]) -> list[CheckpointItem]:
    """The rows to evaluate, in order: a run folder becomes its base model and every stage folder."""
    out: list[CheckpointItem] = []
    for item in items:
        path = Path(item).expanduser()
        folder = RunFolder(path)
        if path.is_dir() and folder.recipe.is_file() and folder.checkpoints.is_dir():
            stages = folder.stage_dirs()
            if not stages:
                raise CheckpointError(f"{path}: a run folder without stage checkpoints (checkpoints/stage-XX-*)")
            recipe = load_recipe(folder.recipe, settings_only=True)
            name = path.resolve().name
            out.append(CheckpointItem(f"{name}/base", recipe.model.name_or_path, folder.recipe, name))
            out += [CheckpointItem(f"{name}/{stages[k].name}", str(stages[k]), None, name) for k in sorted(stages)]
        else:
            out.append(CheckpointItem(path.resolve().name if path.exists() else item, item))
    labels = [c.label for c in out]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            raise EvalError(f"two checkpoints are both called {label!r}; pass folders with different names")
    return out


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def _read_cell(path: Path) -> TaskResult | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return TaskResult(**{f.name: data[f.name] for f in dataclasses.fields(TaskResult)})
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise EvalError(f"{path}: an unreadable result cell from an earlier run ({type(exc).__name__}); cells are "
                        f"written atomically, so something else changed it: delete it to evaluate that cell again"
                        ) from exc


def evaluate_suite(suite_ref: str, checkpoints: list[str], *, output_dir: str | Path,
                   max_test: int | None = None) -> Path:
    """Evaluate every checkpoint on every suite task; returns the path of results.json."""
    dist.init_distributed()
    suite = load_suite(suite_ref)
    resolved = suite.resolve()
    items = expand_checkpoints(checkpoints)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [task for _, task in resolved]
    for card, _ in resolved:  # every test split is checked once, before any model is built
        if max_test is not None:
            for spec in card.tasks:
                spec.max_test = min(spec.max_test or max_test, max_test)
        report = validate_card(card, splits=("test",))
        if not report.ok:
            raise DataError(f"suite {suite.name!r}: card {card.name!r} has problems in its test split:\n"
                            f"{report.format()}")
    cells: dict[tuple[str, str], TaskResult] = {}
    for item in items:
        done = {task: _read_cell(out / "cells" / _safe(item.label) / f"{task}.json") for task in tasks}
        cells.update({(item.label, t): r for t, r in done.items() if r is not None})
        if all(r is not None for r in done.values()):
            print(f"[mcit] {item.label}: every task already evaluated", file=sys.stderr)
            continue
        recipe = load_recipe(item.recipe_path, settings_only=True) if item.recipe_path else None
        model, processor, method, recipe = load_checkpoint(item.checkpoint, recipe)
        encoder = Encoder(processor, recipe.train.max_length)
        pixels = PixelCache.from_recipe(processor, recipe)
        for card, task in resolved:
            if done[task] is not None:
                continue
            spec = card.task(task)
            samples = card.load_task(task, "test", seed=recipe.seed)
            align_boxes(card, recipe, processor, {task: samples})
            result = evaluate_task(model, method, encoder, pixels, spec, samples,
                                   batch_size=suite.generation.batch_size,
                                   max_new_tokens=suite.generation.max_new_tokens, autocast=recipe.model.autocast,
                                   constrained=suite.generation.constrained,
                                   predictions_file=out / "predictions" / _safe(item.label) / f"{task}.jsonl",
                                   shard=dist.is_distributed())
            if dist.is_main():
                cell = out / "cells" / _safe(item.label) / f"{task}.json"
                cell.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(cell, dataclasses.asdict(result))
            cells[(item.label, task)] = result
            print(f"[mcit] {item.label} {task}: {result.score:.1f}", file=sys.stderr)
            failpoints.hit("suite.cell")
        del model, method
    results = suite_results(suite, items, tasks, cells)
    if dist.is_main():
        write_json_atomic(out / "results.json", results)
        write_suite_report(results, out)
    dist.barrier()
    return out / "results.json"


def suite_results(suite: EvalSuite, items: list[CheckpointItem], tasks: list[str],
                  cells: dict[tuple[str, str], TaskResult]) -> dict[str, Any]:
    """results.json of a suite evaluation: one grid per reported column (rows = checkpoints, columns = tasks), and
    the retention of every run's stages against its base row. No timings: the file is the same after a resume."""
    labels = [i.label for i in items]
    grids = {column: [[getattr(cells[(label, task)], attr) for task in tasks] for label in labels]
             for column, attr in COLUMNS.items() if column in suite.report or column == "score"}
    retention: dict[str, Any] = {}
    for run in dict.fromkeys(i.run for i in items if i.run):
        base = labels.index(f"{run}/base")
        rows = [k for k, i in enumerate(items) if i.run == run and k != base]
        drops = {labels[k]: [grids["score"][k][j] - grids["score"][base][j] for j in range(len(tasks))]
                 for k in rows}
        retention[run] = {"base": labels[base], "per_task": drops,
                          "mean": {label: sum(d) / len(d) for label, d in drops.items()}}
    return {"suite": suite.name, "suite_description": suite.description, "checkpoints": labels,
            "paths": [i.checkpoint for i in items], "tasks": tasks, **grids, "retention": retention,
            "details": {label: {task: cells[(label, task)].details for task in tasks} for label in labels},
            "n": {task: cells[(labels[0], task)].n for task in tasks}}


def write_suite_report(results: dict[str, Any], out: Path) -> Path:
    """report.md / report.html with a heatmap (checkpoints x tasks), per-task curves over each run's stages and the
    retention table."""
    doc = Document(out)
    labels, tasks = results["checkpoints"], results["tasks"]
    doc.heading(1, f"Suite {results['suite']}")
    if results.get("suite_description"):
        doc.para(results["suite_description"])
    columns = [c for c in COLUMNS if c in results]
    for column in columns:
        doc.heading(2, {"score": "Scores", "format": "Answers in the task's format (%)",
                        "superficial": "Superficial: wrong format (%)", "essential": "Essential: right format, "
                        "wrong content (%)", "constrained": "Constrained (likelihood-ranked) scores"}[column])
        doc.table(["checkpoint", *tasks, "mean"],
                  [[label, *map(fmt, row), fmt(_mean(row))] for label, row in zip(labels, results[column])])
    doc.image(plots.accuracy_heatmap(results["score"], labels, tasks, [], out / "suite_heatmap.png"),
              "scores, checkpoints x tasks")
    for run, ret in results["retention"].items():
        rows = [k for k, label in enumerate(labels) if label == ret["base"] or label in ret["per_task"]]
        doc.heading(2, f"Run {run}: scores over its stages and retention against its base model")
        doc.image(plots.scores_over_stages([results["score"][k] for k in rows], [labels[k].split("/", 1)[1]
                                                                                  for k in rows], tasks,
                                           out / f"suite_curves_{_safe(run)}.png"), f"per-task scores over {run}")
        doc.table(["stage", *[f"Δ {t}" for t in tasks], "Δ mean"],
                  [[label.split("/", 1)[1], *map(fmt, d), fmt(ret["mean"][label])]
                   for label, d in ret["per_task"].items()])
    md = out / "report.md"
    write_text_atomic(md, doc.markdown())
    write_text_atomic(out / "report.html", doc.html(f"mcit suite {results['suite']}"))
    return md


def _mean(row: list[float | None]) -> float | None:
    values = [v for v in row if v is not None]
    return sum(values) / len(values) if values else None
