"""Build what a run or a checkpoint needs, in one place: the recipe's card and data, the base model under the run's
DeepSpeed context, the method attached to it, and a model rebuilt from any checkpoint kind.

Accepted checkpoints (`load_checkpoint`):
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
from mcit.data import synthcit
from mcit.data.asd import ASDStats, build_rewriter, diversify_with_stats
from mcit.data.boxes import align_box_answers, seen_frame
from mcit.data.cards import DataCard, load_card
from mcit.data.images import probe_image
from mcit.data.validate import filter_valid, validate_card
from mcit.errors import CheckpointError, DataError
from mcit.methods.base import Checkpoint, Method, RunContext, TaskData, build_method
from mcit.models.loading import load_base
from mcit.runs.folder import RunFolder, has_stage_state
from mcit.runtime.seeding import seed_everything
from mcit.train import deepspeed as ds
from mcit.train.stages import load_stage, stage_meta

ADAPTER_INIT_SEED = 1
"""Offset of the seed set right before `setup`: adapter init must not depend on what ran before (resume = same
numbers)."""


def prepare_card(recipe: Recipe) -> DataCard:
    """The recipe's data card with its `benchmark:` and `eval:` limits applied (SynthCIT is built on first use)."""
    card = load_card(recipe.benchmark.card)
    if recipe.benchmark.root:
        card.root = recipe.benchmark.root
    if recipe.benchmark.layout:
        card.layout = recipe.benchmark.layout
        card.layout_named(card.layout)  # raises with a suggestion for an unknown layout
    if recipe.benchmark.tasks:
        card = card.select(recipe.benchmark.tasks)
    for task in card.tasks:
        if recipe.benchmark.max_train:
            task.max_train = min(task.max_train or recipe.benchmark.max_train, recipe.benchmark.max_train)
        if recipe.benchmark.max_test:
            task.max_test = min(task.max_test or recipe.benchmark.max_test, recipe.benchmark.max_test)
        if recipe.eval.max_test:
            task.max_test = min(task.max_test or recipe.eval.max_test, recipe.eval.max_test)
    if card.generator == "synthcit":
        synthcit.ensure_built(card.root_dir)
    return card


def load_task_data(card: DataCard, recipe: Recipe, log, run_folder: RunFolder | None = None) -> TaskData:
    """Validated training and test samples of every task (ASD applied to training samples when the recipe asks).

    `run_folder`: the run this data is for; ASD writes its conversion counts there (asd_stats.json, for the report)
    and an LLM rewriter caches its answers there (asd/rewrites.jsonl). None (tests, tools) writes nothing.
    """
    asd = recipe.benchmark.asd
    # built first, so a rewriter folder that is not there fails before any data is read
    rewriter = build_rewriter(asd.rewriter, seed=recipe.seed,
                              cache_file=run_folder.asd_rewrites if run_folder else None) if asd.enabled else None
    asd_stats = ASDStats()
    report = validate_card(card)
    skipped = 0
    if not report.ok and not recipe.benchmark.skip_invalid:
        raise DataError(f"data card {card.name!r} has problems; fix them or set benchmark.skip_invalid=true to train "
                        f"on the valid samples only:\n{report.format()}")
    train, test = {}, {}
    try:
        for task in card.tasks:
            samples = card.load_task(task.name, "train", seed=recipe.seed,
                                     skip_malformed=recipe.benchmark.skip_invalid)
            tests = card.load_task(task.name, "test", seed=recipe.seed, skip_malformed=recipe.benchmark.skip_invalid)
            if not report.ok:
                samples, n1 = filter_valid(samples, report)
                tests, n2 = filter_valid(tests, report)
                skipped += n1 + n2
            if asd.enabled:
                samples, stats = diversify_with_stats(samples, asd.fraction, styles=asd.styles, seed=recipe.seed,
                                                      rewriter=rewriter)
                asd_stats.merge(stats)
                log({"event": "asd", "task": task.name, **stats.to_dict()})
            train[task.name], test[task.name] = samples, tests
    finally:
        if hasattr(rewriter, "close"):
            rewriter.close()  # an LLM rewriter frees its model before the training model is loaded
    if asd.enabled:
        print(f"[mcit] {asd_stats.summary()}", file=sys.stderr)
        if run_folder is not None:
            run_folder.write_asd_stats({"rewriter": asd.rewriter, "fraction": asd.fraction, "styles": list(asd.styles),
                                        "seed": recipe.seed, **asd_stats.to_dict()})
    if skipped:
        log({"event": "skipped_invalid", "count": skipped})
        print(f"[mcit] skipped {skipped} invalid samples (benchmark.skip_invalid=true)", file=sys.stderr)
    return TaskData(card.task_names, train, test)


def load_test_data(card: DataCard, recipe: Recipe) -> dict:
    """Test samples of every task of `card`, validated as `mcit train` validates them (paths confined, bombs
    refused)."""
    report = validate_card(card, splits=("test",))
    if not report.ok:
        raise DataError(f"data card {card.name!r} has problems in its test splits:\n{report.format()}")
    return {t.name: card.load_task(t.name, "test", seed=recipe.seed) for t in card.tasks}


def align_boxes(card: DataCard, recipe: Recipe, processor, *splits: dict[str, list]) -> dict[str, int]:
    """Rewrite the box answers of the card's box tasks (train and test samples alike) from the frame the release
    uses (`box_frame`) into the frame this run's preprocessing shows the model (mcit/data/boxes.py); returns the
    number rewritten per task. Sizes come from the record's `size` (CoIN keeps it) or the image header."""
    target = seen_frame(processor, recipe.benchmark.pad_to_square)
    counts: dict[str, int] = {}
    for task in card.tasks:
        spec = card.task(task.name)
        if spec.answer_style != "box" or spec.box_frame == target:
            continue
        root = card.image_root(task.name)

        def size(sample, root=root) -> tuple[int, int]:
            given = (sample.meta.get("source") or {}).get("size")
            if isinstance(given, list) and len(given) == 2 and all(isinstance(v, (int, float)) for v in given):
                return int(given[0]), int(given[1])
            return probe_image(sample.image, root)

        counts[task.name] = sum(align_box_answers(split.get(task.name, []), spec.box_frame, target, size)
                                for split in splits)
    return counts


def build_model(recipe: Recipe, ds_config: dict | None = None):
    """(model, processor) of the recipe's base model; under ZeRO-3 created already sharded (`ds_config`)."""
    with ds.hf_deepspeed_context(ds_config):
        return load_base(recipe.model)


def attach_method(method: Method, model, processor, recipe: Recipe, data: TaskData, output_dir=None):
    """`method.attach` with the run's context, after the seed every run and every rebuild use for adapter init."""
    seed_everything(recipe.seed + ADAPTER_INIT_SEED)
    return method.attach(model, RunContext(processor=processor, recipe=recipe, data=data, output_dir=output_dir))


def rebuild_stage(folder: Path, recipe: Recipe):
    """(model, processor, method) as the runner left them after the stage in `folder`: attach the method, prepare
    every stage up to it, load the stage's tensors."""
    stage = int(stage_meta(folder)["stage"]) - 1
    method = build_method(recipe)
    model, processor = load_base(recipe.model)
    model = attach_method(method, model, processor, recipe, TaskData([], {}, {}))
    try:
        names = RunFolder.of_stage(folder).task_names()
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: the run's results.json (task order) is missing from "
                              f"{RunFolder.of_stage(folder).root}") from None
    for s, ids in enumerate(method.schedule(len(names))[:stage + 1]):
        method.prepare(model, s, ids)
    load_stage(model, method, folder)
    return model, processor, method


def exported_stage(path: Path) -> Path | None:
    """The stage folder of an `mcit export --experts` folder (recipe.yaml + checkpoints/ with one stage), else None."""
    run = RunFolder(path)
    stages = list(run.stage_dirs().values()) if run.recipe.is_file() else []
    return stages[-1] if len(stages) == 1 and has_stage_state(stages[0]) else None


def load_checkpoint(checkpoint: str, recipe: Recipe | None = None):
    """(model, processor, method, recipe) for any accepted checkpoint kind (module docstring)."""
    path = Path(checkpoint).expanduser()
    path = exported_stage(path) or path
    if has_stage_state(path):
        run_recipe = RunFolder.of_stage(path).recipe
        if not run_recipe.is_file():
            raise CheckpointError(f"{path}: stage checkpoint without its run's recipe.yaml at {run_recipe}")
        recipe = load_recipe(run_recipe)
        model, processor, method = rebuild_stage(path, recipe)
        check_tokenizer_fits(model, processor, path)
        return model, processor, method, recipe
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        recipe = recipe or recipe_from_dict({"output_dir": str(path), "model": {"name_or_path": base}})
        model, processor = load_base(recipe.model)
        try:
            model = PeftModel.from_pretrained(model, str(path))
        except RuntimeError as exc:  # torch's "size mismatch for ..." when the adapter was trained on another base
            if "size mismatch" not in str(exc):
                raise
            first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
            raise CheckpointError(f"{path}: the adapter does not fit the base model {recipe.model.name_or_path!r} "
                                  f"(adapter_config.json names {base!r}): {first}; it was trained on a base of "
                                  f"other dimensions") from None
        check_tokenizer_fits(model, processor, path)
        return model, processor, Checkpoint(recipe, None), recipe
    recipe = recipe or recipe_from_dict({"output_dir": ".", "model": {"name_or_path": checkpoint}})
    recipe.model.name_or_path = checkpoint
    model, processor = load_base(recipe.model)
    check_tokenizer_fits(model, processor, checkpoint)
    return model, processor, Checkpoint(recipe, None), recipe


def check_tokenizer_fits(model, processor, where: str | Path) -> None:
    """A tokenizer with more tokens than the model has embedding rows (a checkpoint folder holding another base's
    tokenizer, or added tokens without `resize_token_embeddings`) would index past the embedding table: an index error
    on CPU, a device-side assert on a GPU, in the middle of an evaluation. Refused when loaded instead."""
    tokenizer = getattr(processor, "tokenizer", processor)
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None or tokenizer is None:
        return
    if len(tokenizer) > rows:
        raise CheckpointError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding table "
                              f"{rows} rows; the tokenizer belongs to another base (or tokens were added without "
                              f"resizing the embeddings)")
