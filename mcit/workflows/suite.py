"""`mcit eval SUITE --checkpoints A B ...`: every checkpoint on every task of an evaluation suite (eval/*.yaml), one
results.json (checkpoints x tasks) and a report with plots.

A checkpoint item is a run folder (expanded to its base model, the reference row, then every stage folder), a stage
folder, an exported expert set, a PEFT adapter, an HF model (id or folder) or `builtin:...`. Each (checkpoint, task)
cell is written atomically to `<out>/cells/` as soon as it is scored, and a re-run after a kill reuses every cell it
finds, so an interrupted evaluation finishes with the results.json an uninterrupted one writes (greedy decoding is
deterministic). Retention: for a run, each stage's score minus its base model's, per task and on average.

A run's rows are loaded onto one model in order (the base model is built once per run, for its base row, and every
stage is loaded onto it) and every row shares the preprocessed images (`evaluate_cells`); the cells are those of a
fresh model per row.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from mcit.config import load_recipe
from mcit.data.cards import DataCard
from mcit.data.collate import Encoder, PixelCache
from mcit.data.validate import validate_card
from mcit.errors import CheckpointError, DataError, EvalError
from mcit.evaluation.evaluate import TaskResult, evaluate_task
from mcit.evaluation.suites import EvalSuite, SuiteGeneration, load_suite
from mcit.report import plots
from mcit.report.render import Document, fmt
from mcit.runs.folder import RunFolder
from mcit.runtime import dist, failpoints
from mcit.runtime.files import write_json_atomic, write_text_atomic
from mcit.workflows.load import CheckpointLoader, align_boxes, eval_pixels, exported_stage

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
    run_dir: Path | None = None
    """The run folder itself: the suite's rows of the run are also filed there, for `mcit report`."""


def expand_checkpoints(items: list[str]) -> list[CheckpointItem]:
    """The rows to evaluate, in order: a run folder becomes its base model and every stage folder."""
    out: list[CheckpointItem] = []
    for item in items:
        path = Path(item).expanduser()
        folder = RunFolder(path)
        if path.is_dir() and folder.recipe.is_file() and folder.checkpoints.is_dir() and not _expert_export(path):
            stages = folder.stage_dirs()
            if not stages:
                raise CheckpointError(f"{path}: a run folder without stage checkpoints (checkpoints/stage-XX-*)")
            recipe = load_recipe(folder.recipe, settings_only=True)
            name = path.resolve().name
            out.append(CheckpointItem(f"{name}/base", recipe.model.name_or_path, folder.recipe, name, folder.root))
            out += [CheckpointItem(f"{name}/{stages[k].name}", str(stages[k]), None, name, folder.root)
                    for k in sorted(stages)]
        else:
            out.append(CheckpointItem(path.resolve().name if path.exists() else item, item))
    labels = [c.label for c in out]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            raise EvalError(f"two checkpoints are both called {label!r}; pass folders with different names")
    return out


def _expert_export(path: Path) -> bool:
    """An `mcit export --experts` folder: a run's shape (recipe.yaml, checkpoints/ with its one stage), one checkpoint
    (its PROVENANCE.json says so; a one-task run folder has the same shape and stands for two rows)."""
    provenance = path / "PROVENANCE.json"
    if exported_stage(path) is None or not provenance.is_file():
        return False
    try:
        return json.loads(provenance.read_text(encoding="utf-8")).get("artifact") == "experts"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def _read_cell(path: Path, inputs: dict[str, Any]) -> TaskResult | None:
    """A finished cell of an earlier (interrupted) evaluation into the same folder, or None. A cell written for other
    inputs (another checkpoint path, sample limit, task definition or generation setting) is refused: reusing it would
    mix two evaluations in one results.json."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        result = TaskResult(**{f.name: data[f.name] for f in dataclasses.fields(TaskResult)})
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise EvalError(f"{path}: an unreadable result cell from an earlier run ({type(exc).__name__}); cells are "
                        f"written atomically, so something else changed it: delete it to evaluate that cell again"
                        ) from exc
    before = data.get("inputs")
    if before != inputs:
        changed = sorted(k for k in set(inputs) | set(before or {}) if (before or {}).get(k) != inputs.get(k))
        raise EvalError(f"{path}: this output folder holds a cell of a different evaluation ({', '.join(changed)} "
                        f"changed, e.g. {changed[0]}: {(before or {}).get(changed[0])!r} then, "
                        f"{inputs.get(changed[0])!r} now); pass another --output, or delete {path.parent} to "
                        f"evaluate this checkpoint again")
    return result


def _cell_inputs(item: CheckpointItem, card, task: str, generation: SuiteGeneration) -> dict[str, Any]:
    """What a cell's result depends on besides the weights: written into the cell and compared on resume."""
    path = Path(item.checkpoint).expanduser()
    inputs = {"checkpoint": str(path.resolve()) if path.exists() else item.checkpoint,
              "card": card.name, "root": str(card.root_dir), "task": dataclasses.asdict(card.task(task)),
              "generation": dataclasses.asdict(generation)}
    return json.loads(json.dumps(inputs))  # as it reads back from the cell (tuples become lists)


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
    cells = evaluate_cells(items, resolved, suite.generation, out)
    results = suite_results(suite, items, tasks, cells)
    if dist.is_main():
        write_json_atomic(out / "results.json", results)
        write_suite_report(results, out)
        for run_dir in dict.fromkeys(i.run_dir for i in items if i.run_dir):
            file_in_run(results, run_dir, out)
    dist.barrier()
    return out / "results.json"


@dataclasses.dataclass
class ItemTiming:
    """Where one checkpoint row's time went (for benchmarks; results.json holds no timings)."""

    label: str
    load_seconds: float = 0.0
    """Building the model, or advancing the held one to this stage (0 when every cell was already done)."""
    eval_seconds: float = 0.0
    """Its cells: loading the test samples, generating, scoring, writing predictions and cells."""
    advanced: bool = False
    """Loaded onto the previous stage's model (mcit.workflows.load.CheckpointLoader) instead of rebuilt."""
    vision_rows: dict[str, int] = dataclasses.field(default_factory=dict)
    """Images whose vision features this row read from the cache (`hits`) or computed (`misses`)."""


def evaluate_cells(items: list[CheckpointItem], resolved: list[tuple[DataCard, str]], generation: SuiteGeneration,
                   out: Path, timings: list[ItemTiming] | None = None) -> dict[tuple[str, str], TaskResult]:
    """Every (checkpoint, task) cell not already in `out/cells/`: scored, written as a cell and its predictions file.

    What is shared between rows, because it does not depend on the weights: the model itself between a run's base
    row and its consecutive stages (`CheckpointLoader`: one base-model build per run instead of one per row) and the
    preprocessed images (one `PixelCache` per processor configuration, so a run's T stages preprocess each test image
    once, not T times) with the frozen vision tower's features of them (`benchmark.vision_feature_cache_mb`: each
    test image goes through the tower once per run, not T times; mcit/models/vision_cache.py). Greedy decoding makes every cell the same as with a fresh model and cache. `timings` (when
    given) receives one `ItemTiming` per item.
    """
    tasks = [task for _, task in resolved]
    loader = CheckpointLoader()
    caches: dict[tuple, PixelCache] = {}
    cells: dict[tuple[str, str], TaskResult] = {}
    for item in items:
        timing = ItemTiming(item.label)
        if timings is not None:
            timings.append(timing)
        inputs = {task: _cell_inputs(item, card, task, generation) for card, task in resolved}
        # The main rank decides which cells are done and every rank follows, so all ranks of a launched evaluation
        # take part in the same cells (a rank skipping a cell another evaluates would hang its collectives).
        done = dist.all_gather_objects(
            {task: _read_cell(out / "cells" / _safe(item.label) / f"{task}.json", inputs[task])
             for task in tasks} if dist.is_main() else None)[0]
        cells.update({(item.label, t): r for t, r in done.items() if r is not None})
        if all(r is not None for r in done.values()):
            print(f"[mcit] {item.label}: every task already evaluated", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        recipe = load_recipe(item.recipe_path, settings_only=True) if item.recipe_path else None
        loaded = loader.load(item.checkpoint, recipe, run_dir=item.run_dir if item.recipe_path else None)
        model, processor, method, recipe = loaded.model, loaded.processor, loaded.method, loaded.recipe
        timing.load_seconds, timing.advanced = time.perf_counter() - t0, loaded.advanced
        t0 = time.perf_counter()
        encoder = Encoder.from_recipe(processor, recipe)
        key = _pixel_key(processor, recipe)
        if key not in caches:
            caches[key] = eval_pixels(processor, recipe)
        pixels = caches[key]
        before = (pixels.features.hits, pixels.features.misses) if pixels.features else (0, 0)
        for card, task in resolved:
            if done[task] is not None:
                continue
            spec = card.task(task)
            samples = card.load_task(task, "test", seed=recipe.seed)
            align_boxes(card, recipe, processor, {task: samples})
            result = evaluate_task(model, method, encoder, pixels, spec, samples,
                                   batch_size=generation.batch_size,
                                   max_new_tokens=generation.max_new_tokens, autocast=recipe.model.autocast,
                                   constrained=generation.constrained,
                                   predictions_file=predictions_file(out, item.label, task),
                                   shard=dist.is_distributed())
            if dist.is_main():
                cell = out / "cells" / _safe(item.label) / f"{task}.json"
                cell.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(cell, {**dataclasses.asdict(result), "inputs": inputs[task]})
            cells[(item.label, task)] = result
            print(f"[mcit] {item.label} {task}: {result.score:.1f}", file=sys.stderr)
            failpoints.hit("suite.cell")
        timing.eval_seconds = time.perf_counter() - t0
        if pixels.features:
            timing.vision_rows = {"hits": pixels.features.hits - before[0], "misses": pixels.features.misses - before[1]}
        del model, method, loaded  # the loader keeps the model only while the next item may be its next stage
    loader.release()
    return cells


def predictions_file(out: Path, label: str, task: str) -> Path:
    """The predictions (JSON lines: id, prompt, prediction, reference, score, ...) of one cell of an evaluation."""
    return out / "predictions" / _safe(label) / f"{task}.jsonl"


def _pixel_key(processor, recipe) -> tuple:
    """What preprocessed pixels (and the token types `generate` reads from the cache's processor) depend on: the
    processor's image settings and tokenizer, `benchmark.pad_to_square`, and the cache budgets."""
    image = getattr(processor, "image_processor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    settings = image.to_json_string() if hasattr(image, "to_json_string") else repr(image)
    return (type(processor).__name__, settings, getattr(tokenizer, "name_or_path", None),
            len(tokenizer) if tokenizer is not None else None, recipe.benchmark.pad_to_square,
            recipe.benchmark.image_cache_mb, recipe.benchmark.vision_feature_cache_mb)


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


def run_extract(results: dict[str, Any], run: str, output: Path) -> dict[str, Any]:
    """A run's rows of a suite evaluation (its base model and stages, every column, its retention): what `mcit report`
    of the run shows, with the path of the whole evaluation."""
    rows = [k for k, label in enumerate(results["checkpoints"]) if label == results["retention"][run]["base"]
            or label in results["retention"][run]["per_task"]]
    return {"suite": results["suite"], "suite_description": results.get("suite_description", ""),
            "evaluation": str(output.resolve()), "tasks": results["tasks"], "n": results["n"],
            "checkpoints": [results["checkpoints"][k].split("/", 1)[1] for k in rows],
            **{c: [results[c][k] for k in rows] for c in COLUMNS if c in results},
            "retention": results["retention"][run]}


def file_in_run(results: dict[str, Any], run_dir: Path, output: Path) -> Path | None:
    """Write the run's extract to `<run>/suites/<suite>.json` (None, with a warning, where the run folder is not
    writable: the evaluation's own results.json is complete without it)."""
    folder = RunFolder(run_dir)
    target = folder.suites / f"{_safe(results['suite'])}.json"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(target, run_extract(results, run_dir.name, output))
    except OSError as exc:
        print(f"[mcit] could not file the suite's results in {run_dir} ({exc}); `mcit report` of the run will not "
              f"show them", file=sys.stderr)
        return None
    return target


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
