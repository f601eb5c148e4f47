"""`mcit eval`: evaluate any checkpoint on any benchmark card, including tasks the model never trained on.

Accepted checkpoints:
- a run's stage folder (`RUN/checkpoints/stage-03-count`): the run's recipe rebuilds the model and the method
  (adapters, routers, prototypes) exactly as the runner left it after that stage;
- an expert-set export (`mcit export RUN --experts`): the same as the stage folder it was exported from;
- a PEFT adapter folder (`adapter_config.json`): loaded onto its base model with plain PEFT;
- a full model: an HF model id, a local `save_pretrained` folder, or `builtin:tiny-llava`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mcit.config import Recipe, load_recipe, recipe_from_dict
from mcit.data.collate import Encoder, PixelCache
from mcit.errors import CheckpointError, DataError
from mcit.evaluation.evaluate import evaluate_tasks
from mcit.methods.base import Method, NoOptions, RunContext, TaskData, build_method
from mcit.models.loading import load_base
from mcit.train import checkpoint as ckpt
from mcit.train.loop import AUTOCAST


def _stage_model(folder: Path, recipe: Recipe):
    """Rebuild a run's model after the stage in `folder`: setup, prepare every stage up to it, load tensors."""
    from mcit.train.runner import ContinualRunner, seed_everything

    ckpt.open_checkpoint(folder)
    meta = json.loads((folder / "method.json").read_text(encoding="utf-8"))
    stage = int(meta["stage"]) - 1
    method = build_method(recipe)
    model, processor = load_base(recipe.model)
    seed_everything(recipe.seed + 1)
    model = method.setup(model, RunContext(processor=processor, recipe=recipe, data=TaskData([], {}, {})))
    names = _run_task_names(folder)
    for s, ids in enumerate(method.schedule(len(names))[:stage + 1]):
        method.prepare(model, s, ids)
    ContinualRunner(recipe)._load_stage(model, method, folder)
    return model, processor, method


def _run_task_names(folder: Path) -> list[str]:
    results = folder.parent.parent / "results.json"
    if results.is_file():
        return json.loads(results.read_text(encoding="utf-8"))["tasks"]
    raise CheckpointError(f"{folder}: the run's results.json (task order) is missing from {results.parent}")


def _plain_method(recipe: Recipe) -> Method:
    method = Method(recipe, NoOptions())
    method.name = "checkpoint"
    return method


def exported_stage(path: Path) -> Path | None:
    """The stage folder of an `mcit export --experts` folder (recipe.yaml + checkpoints/ with one stage), else None."""
    stages = sorted(path.glob("checkpoints/stage-*")) if (path / "recipe.yaml").is_file() else []
    return stages[-1] if len(stages) == 1 and (stages[0] / "method.json").is_file() else None


def load_for_eval(checkpoint: str, recipe: Recipe | None):
    """(model, processor, method, recipe) for any accepted checkpoint kind."""
    path = Path(checkpoint).expanduser()
    path = exported_stage(path) or path
    if (path / "method.json").is_file():
        run_recipe = path.parent.parent / "recipe.yaml"
        if not run_recipe.is_file():
            raise CheckpointError(f"{path}: stage checkpoint without its run's recipe.yaml at {run_recipe}")
        recipe = load_recipe(run_recipe)
        model, processor, method = _stage_model(path, recipe)
        return model, processor, method, recipe
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        recipe = recipe or recipe_from_dict({"output_dir": str(path), "model": {"name_or_path": base}})
        model, processor = load_base(recipe.model)
        model = PeftModel.from_pretrained(model, str(path))
        return model, processor, _plain_method(recipe), recipe
    recipe = recipe or recipe_from_dict({"output_dir": ".", "model": {"name_or_path": checkpoint}})
    recipe.model.name_or_path = checkpoint
    model, processor = load_base(recipe.model)
    return model, processor, _plain_method(recipe), recipe


def default_output(checkpoint: Path, card: str) -> Path:
    """Where `mcit eval` writes without `--output`: `<run>/eval/<stage>-<card>` for a run's stage folder (the stage
    folder itself stays exactly what its manifest lists), `<folder>/eval-<card>` for any other folder, else
    `./eval-<card>` (a Hub id or `builtin:` name)."""
    if checkpoint.is_dir() and checkpoint.parent.name == "checkpoints" and (checkpoint / "method.json").is_file():
        return checkpoint.parent.parent / "eval" / f"{checkpoint.name}-{card}"
    return (checkpoint if checkpoint.is_dir() else Path(".")) / f"eval-{card}"


def evaluate_checkpoint(checkpoint: str, benchmark: str, *, tasks: list[str] | None = None,
                        output_dir: str | None = None, recipe_path: str | None = None, max_test: int | None = None,
                        batch_size: int = 64, constrained: bool = True) -> Path:
    from mcit.data.validate import validate_card
    from mcit.train.runner import prepare_card

    recipe = load_recipe(recipe_path, settings_only=True) if recipe_path else None
    model, processor, method, recipe = load_for_eval(checkpoint, recipe)
    recipe.benchmark.card = benchmark
    recipe.benchmark.tasks = tasks
    recipe.benchmark.max_test = max_test
    recipe.benchmark.asd.enabled = False
    card = prepare_card(recipe)
    report = validate_card(card, splits=("test",))  # as `mcit train` does: image paths confined, bombs refused
    if not report.ok:
        raise DataError(f"data card {card.name!r} has problems in its test splits:\n{report.format()}")
    test = {t.name: card.load_task(t.name, "test", seed=recipe.seed) for t in card.tasks}
    encoder = Encoder(processor, recipe.train.max_length)
    out = Path(output_dir) if output_dir else default_output(Path(checkpoint), card.name)
    out.mkdir(parents=True, exist_ok=True)
    rows = evaluate_tasks(model, method, encoder, PixelCache(processor), card.tasks, test, batch_size=batch_size,
                          max_new_tokens=recipe.eval.max_new_tokens, autocast=AUTOCAST[recipe.model.autocast],
                          constrained=constrained, predictions_dir=out / "predictions",
                          log=lambda r: print(json.dumps(r), file=sys.stderr))
    results = {
        "checkpoint": str(checkpoint), "benchmark": card.name, "tasks": card.task_names,
        "stages": ["checkpoint"], "stage_tasks": [[]],
        "matrix": [[r.score for r in rows]], "format_matrix": [[r.format_rate for r in rows]],
        "superficial": [[r.superficial for r in rows]], "essential": [[r.essential for r in rows]],
        "constrained_matrix": [[r.constrained for r in rows]], "details": [[r.details for r in rows]],
        "router": method.routing_report(),
    }
    ckpt.write_json_atomic(out / "results.json", results)
    lines = ["| task | score | format % | superficial % | essential % | constrained |", "|---|---|---|---|---|---|"]
    for r in rows:
        c = f"{r.constrained:.1f}" if r.constrained is not None else "-"
        lines.append(f"| {r.task} | {r.score:.1f} | {r.format_rate:.1f} | {r.superficial:.1f} | {r.essential:.1f} "
                     f"| {c} |")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return out / "results.json"
