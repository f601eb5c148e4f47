"""`mcit eval`: evaluate any checkpoint (workflows.load) on any benchmark card, including tasks the model never
trained on; results.json (one row), results.md and the prediction files go to one folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mcit.config import load_recipe
from mcit.data.collate import Encoder
from mcit.evaluation.evaluate import evaluate_tasks
from mcit.runs.folder import RunFolder, has_stage_state
from mcit.runs.results import checkpoint_results
from mcit.runtime.files import write_json_atomic
from mcit.workflows.load import align_boxes, eval_pixels, load_checkpoint, load_test_data, prepare_card


def default_output(checkpoint: Path, card: str) -> Path:
    """Where `mcit eval` writes without `--output`: `<run>/eval/<stage>-<card>` for a run's stage folder (the stage
    folder itself stays exactly what its manifest lists), `<folder>/eval-<card>` for any other folder, else
    `./eval-<card>` (a Hub id or `builtin:` name)."""
    if checkpoint.is_dir() and has_stage_state(checkpoint) and \
            checkpoint.resolve().parent == RunFolder.of_stage(checkpoint).checkpoints:
        return RunFolder.of_stage(checkpoint).eval_dir(checkpoint, card)
    return (checkpoint if checkpoint.is_dir() else Path(".")) / f"eval-{card}"


def evaluate_checkpoint(checkpoint: str, benchmark: str, *, tasks: list[str] | None = None,
                        output_dir: str | None = None, recipe_path: str | None = None, max_test: int | None = None,
                        batch_size: int = 64, constrained: bool = True) -> Path:
    """Evaluate `checkpoint` on the card `benchmark`; returns the path of the results.json written."""
    recipe = load_recipe(recipe_path, settings_only=True) if recipe_path else None
    model, processor, method, recipe = load_checkpoint(checkpoint, recipe)
    recipe.benchmark.card = benchmark
    recipe.benchmark.tasks = tasks
    recipe.benchmark.max_test = max_test
    recipe.benchmark.asd.enabled = False
    card = prepare_card(recipe)
    test = load_test_data(card, recipe)
    align_boxes(card, recipe, processor, test)
    encoder = Encoder.from_recipe(processor, recipe)
    out = Path(output_dir) if output_dir else default_output(Path(checkpoint), card.name)
    out.mkdir(parents=True, exist_ok=True)
    pixels = eval_pixels(processor, recipe)
    rows = evaluate_tasks(model, method, encoder, pixels, card.tasks, test, batch_size=batch_size,
                          max_new_tokens=recipe.eval.max_new_tokens, autocast=recipe.model.autocast,
                          constrained=constrained, predictions_dir=out / "predictions",
                          log=lambda r: print(json.dumps(r), file=sys.stderr))
    write_json_atomic(RunFolder(out).results,
                      checkpoint_results(str(checkpoint), card.name, card.task_names, rows, method.routing_report()))
    lines = ["| task | score | format % | superficial % | essential % | constrained |", "|---|---|---|---|---|---|"]
    for r in rows:
        c = f"{r.constrained:.1f}" if r.constrained is not None else "-"
        lines.append(f"| {r.task} | {r.score:.1f} | {r.format_rate:.1f} | {r.superficial:.1f} | {r.essential:.1f} "
                     f"| {c} |")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return RunFolder(out).results
