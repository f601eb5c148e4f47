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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcit.config import Recipe, load_recipe, recipe_from_dict
from mcit.data import synthcit
from mcit.data.asd import ASDStats, build_rewriter, diversify_with_stats
from mcit.data.boxes import align_box_answers, seen_frame
from mcit.data.cards import DataCard, load_card
from mcit.data.collate import MIB, PixelCache
from mcit.data.images import probe_image
from mcit.data.validate import filter_valid, validate_card
from mcit.errors import CheckpointError, DataError, RecipeError
from mcit.methods.base import Checkpoint, Method, RunContext, TaskData, build_method
from mcit.models.loading import load_base
from mcit.models.vision_cache import VisionFeatureCache
from mcit.runs.folder import METHOD_META, RunFolder, has_stage_state
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


def eval_pixels(processor, recipe: Recipe) -> PixelCache:
    """The pixel cache of an evaluation (`benchmark.image_cache_mb`) carrying the vision feature cache
    (`benchmark.vision_feature_cache_mb`), so each test image goes through a frozen tower once across checkpoints."""
    pixels = PixelCache.from_recipe(processor, recipe)
    pixels.features = VisionFeatureCache(recipe.benchmark.vision_feature_cache_mb * MIB)
    return pixels


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
    meta = stage_meta(folder)  # verified before the base model is built: a damaged folder fails fast
    stage = int(meta["stage"]) - 1
    method = build_method(recipe)
    model, processor = load_base(recipe.model)
    model = attach_method(method, model, processor, recipe, TaskData([], {}, {}))
    names = _run_task_names(folder)
    for s, ids in enumerate(method.schedule(len(names))[:stage + 1]):
        method.prepare(model, s, ids)
    load_stage(model, method, folder, meta)
    return model, processor, method


def _run_task_names(folder: Path) -> list[str]:
    try:
        return RunFolder.of_stage(folder).task_names()
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: the run's results.json (task order) is missing from "
                              f"{RunFolder.of_stage(folder).root}") from None


ADVANCES_IN_PLACE = frozenset({"lora_ft", "joint", "replay", "moelora", "olora", "reglora", "sefe", "keeplora",
                               "cl_moe", "disco", "hide", "mr_lora", "smolora", "modalprompt"})
"""Built-in methods whose later stage checkpoints may be loaded onto the model of an earlier stage of the same run
(`CheckpointLoader`), with the result `rebuild_stage` gives. What makes that safe, read from each method: every
tensor a stage changes is in its `state_tensors` (LoRA factors, `mcit_` gates/routers/prompt banks, the trained
projector, and for reglora/sefe/keeplora the merged base weights of every adapted matrix from the first merge on),
so `load_stage` overwrites all of the earlier stage's values; `load_state` replaces (never appends to) the method's
state; `prepare` only adds the structure of later stages (adapters, prompts) and sets trainable flags, whatever the
weights hold; per-row caches (router features, routing answers) are dropped by `routing_report` before advancing.
Random initialisations in `prepare` run in another RNG state than in a rebuild, but every one of them is overwritten
by the loaded tensors. A method from another package (`package.module:Class`, entry points) is rebuilt per stage:
nothing says its hooks keep those rules."""


@dataclass
class Loaded:
    """What `CheckpointLoader.load` returns: `load_checkpoint`'s four values and how they were obtained."""

    model: Any
    processor: Any
    method: Method
    recipe: Recipe
    advanced: bool
    """True when the checkpoint was loaded onto the model of the previous stage of its run, False for a rebuild."""


@dataclass
class _Held:
    loaded: Loaded
    run_root: Path | None = None
    """The run of a stage folder loaded by path (None for anything else: nothing to advance from)."""
    recipe_text: str = ""
    stage: int = -1
    names: list[str] = field(default_factory=list)
    run_recipe: Recipe | None = None
    """Set when the held model is the run's bare base model (stage -1): its method is attached on the first advance."""
    run_method: Method | None = None


class CheckpointLoader:
    """`load_checkpoint` for a sequence of checkpoints that reuses the model between stages of one run.

    Evaluating a run's stages in order rebuilt the base model and every adapter once per stage: T full model loads
    for T stages, which for a 7B model is most of the time of a small evaluation. Here a stage folder that follows the
    stage held (same run folder, unchanged recipe.yaml, a later stage, a method in `ADVANCES_IN_PLACE`) is loaded
    onto the held model instead: `prepare` for the schedule entries in between, then `load_stage`, exactly the steps
    `rebuild_stage` runs after its own `prepare` calls. Anything else (another run, an earlier stage, an expert-set
    export, a base model, a PEFT adapter, an HF model) drops the held model first and goes through
    `load_checkpoint`, so at most one model is in memory. The held model is the one the caller evaluated: a caller
    must not change its weights (evaluation does not).
    """

    def __init__(self):
        self._held: _Held | None = None
        self.builds = 0
        """Models built from scratch (`load_checkpoint` calls)."""
        self.advances = 0
        """Checkpoints loaded onto the held model."""

    def load(self, checkpoint: str, recipe: Recipe | None = None, run_dir: Path | None = None) -> Loaded:
        """`run_dir`: `checkpoint` is the base model of that run (its base row), loaded with `recipe`, the run's own
        recipe.yaml: the run's stages that follow may then be loaded onto it."""
        path = Path(checkpoint).expanduser()
        stage = self._next_stage(path)
        if stage is not None:
            try:
                return self._advance(path, stage)
            except BaseException:
                self._held = None  # half advanced: never reuse it
                raise
        self._held = None  # the old model is released before the new one is built
        model, processor, method, recipe = load_checkpoint(checkpoint, recipe)
        self.builds += 1
        loaded = Loaded(model, processor, method, recipe, advanced=False)
        held = _Held(loaded)
        if has_stage_state(path) and exported_stage(path) is None and method.name in ADVANCES_IN_PLACE:
            run = RunFolder.of_stage(path)
            held = _Held(loaded, run.root, run.recipe.read_text(encoding="utf-8"), _stage_number(path) - 1,
                         _run_task_names(path))
        elif run_dir is not None and not has_stage_state(path) and not (path / "adapter_config.json").is_file():
            held = self._base_of_run(loaded, RunFolder(Path(run_dir))) or held
        self._held = held
        return loaded

    def release(self) -> None:
        """Drop the held model (its memory is freed once the caller's references are gone too)."""
        self._held = None

    @staticmethod
    def _base_of_run(loaded: Loaded, run: RunFolder) -> _Held | None:
        """The held base model as stage -1 of `run`, when the run's stages can start from it: its method advances in
        place and the model was built with the run's own model settings (anything else is rebuilt per stage)."""
        try:
            run_recipe = load_recipe(run.recipe)
            names = run.task_names()
        except (OSError, RecipeError):
            return None
        if run_recipe.model != loaded.recipe.model or run_recipe.method.name not in ADVANCES_IN_PLACE:
            return None
        return _Held(loaded, run.root, run.recipe.read_text(encoding="utf-8"), -1, names, run_recipe,
                     build_method(run_recipe))

    def _next_stage(self, path: Path) -> int | None:
        """The 0-based stage of `path` when it can be loaded onto the held model, else None."""
        held = self._held
        if held is None or held.run_root is None or not has_stage_state(path) or exported_stage(path) is not None:
            return None
        run = RunFolder.of_stage(path)
        if run.root != held.run_root or not run.recipe.is_file():
            return None
        if run.recipe.read_text(encoding="utf-8") != held.recipe_text:
            return None
        stage = _stage_number(path) - 1
        method = held.run_method or held.loaded.method
        return stage if held.stage < stage < len(method.schedule(len(held.names))) else None

    def _advance(self, path: Path, stage: int) -> Loaded:
        held = self._held
        assert held is not None
        model, method, recipe = held.loaded.model, held.loaded.method, held.loaded.recipe
        if held.run_recipe is not None:  # the run's base model: the method is attached as rebuild_stage attaches it
            method, recipe = held.run_method, held.run_recipe
            model = attach_method(method, model, held.loaded.processor, recipe, TaskData([], {}, {}))
            held.run_recipe = held.run_method = None
        method.routing_report()  # drops the per-row caches (router features and answers) of the stage evaluated
        schedule = method.schedule(len(held.names))
        for s in range(held.stage + 1, stage + 1):
            method.prepare(model, s, schedule[s])
        load_stage(model, method, path)  # verifies the folder against its manifest before anything is loaded
        check_tokenizer_fits(model, held.loaded.processor, path)
        held.stage = stage
        self.advances += 1
        held.loaded = Loaded(model, held.loaded.processor, method, recipe, advanced=True)
        return held.loaded


def _stage_number(folder: Path) -> int:
    """The 1-based stage of a stage folder, from its method.json (read before the manifest check, which
    `load_stage` runs once, instead of hashing a large checkpoint twice)."""
    meta = Path(folder) / METHOD_META
    try:
        return int(json.loads(meta.read_text(encoding="utf-8"))["stage"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta}: unreadable stage metadata ({type(exc).__name__}); the checkpoint is damaged "
                              f"or was not written by `mcit train`") from None


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
