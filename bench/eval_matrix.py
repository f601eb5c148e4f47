"""Part 3 (evaluation matrix): every stage checkpoint of a finished run on every task of its card (the T x T matrix),
evaluated the way MCITlib's scripts do it and the way mcit does, on the same checkpoints and test samples.

Both sides generate free-form answers greedily with the same `max_new_tokens`, EOS and autocast (no likelihood
ranking: the mcit side runs with `constrained` off, so both compute the same thing):

- **mcitlib**: per checkpoint, the model is built from disk again (`load_checkpoint`: base model, adapters, method
  state), then every task's samples are answered one at a time: the processor renders the chat template, the image is
  opened and preprocessed, `model.generate` runs on that one sample (a routed method routes it alone), the new tokens
  are decoded (`bench.eval_speed.one_at_a_time`). Nothing is kept between samples or checkpoints. Each task's answers
  are then scored with the card's scorer, as MCITlib's per-task scoring scripts do (`scoring_seconds`, apart from
  `generation_seconds`).
- **mcit**: `mcit.workflows.suite.evaluate_cells`, the body of `mcit eval SUITE --checkpoints ...`: the run's stages
  are loaded onto one model in stage order (one base-model build per run), preprocessed images are shared by all
  checkpoints, each task is generated in length-sorted batches of the run's `eval.batch_size` that stop at EOS. Its
  per-checkpoint `generation_seconds` include scoring and writing the cells and prediction files (its whole path).

Both sides' `seconds` are wall time from the first model build to the last score. On a CPU with the tiny base the
caption scorer's tokenizer (a Java process per call) costs about as much as the generation itself, so the ratio there
says little; it is meant for a GPU and a real base model.

Before either side is timed, one model is built and one sample answered on both paths (imports and first-call
allocations, which would otherwise land on whichever side runs first). The predictions of every (checkpoint, task,
sample id) are compared string by string, and the prompt token ids of the one-at-a-time path are checked against
mcit's `Encoder` (the two sides must read the same input to be comparable).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import child_main
from bench.eval_speed import one_at_a_time

SIDES = ("mcitlib", "mcit")


def matrix_setup(run_dir: Path, per_task: int | None):
    """(recipe, stage folders in order, the run's card limited to `per_task` test samples per task)."""
    from mcit.config import load_recipe
    from mcit.runs.folder import RunFolder
    from mcit.workflows.load import prepare_card

    folder = RunFolder(run_dir)
    if not folder.recipe.is_file():
        raise SystemExit(f"{run_dir}: not a run folder (no recipe.yaml); pass the output_dir of a finished mcit train")
    recipe = load_recipe(folder.recipe)
    found = folder.stage_dirs()
    stages = [found[k] for k in sorted(found)]
    if not stages:
        raise SystemExit(f"{run_dir}: no stage checkpoints (checkpoints/stage-XX-*); finish the run first")
    card = prepare_card(recipe)
    if per_task is not None:
        for spec in card.tasks:
            spec.max_test = min(spec.max_test or per_task, per_task)
    return recipe, stages, card


def _free() -> None:
    """Release a dropped model before the next one is built (MCITlib runs a process per checkpoint)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mcitlib_side(stages: list[Path], card, max_new_tokens: int) -> dict[str, Any]:
    """Per checkpoint: rebuild from disk, then one `generate` per sample of every task, then the task's scorer (as
    MCITlib's per-task scoring scripts run after its answers are written; the mcit side scores too)."""
    from mcit.data.collate import Encoder
    from mcit.evaluation.scorers import get_scorer
    from mcit.workflows.load import align_boxes, load_checkpoint

    load_s: dict[str, float] = {}
    gen_s: dict[str, float] = {}
    score_s: dict[str, float] = {}
    predictions: dict[str, dict[str, dict[str, str]]] = {}
    scores: dict[str, dict[str, float]] = {}
    first_prompts: dict[str, list] = {}
    start = time.perf_counter()
    for stage in stages:
        t0 = time.perf_counter()
        model, processor, method, recipe = load_checkpoint(str(stage))
        load_s[stage.name] = time.perf_counter() - t0
        gen_s[stage.name] = score_s[stage.name] = 0.0
        predictions[stage.name], scores[stage.name] = {}, {}
        for task in card.task_names:
            t0 = time.perf_counter()
            samples = card.load_task(task, "test", seed=recipe.seed)
            align_boxes(card, recipe, processor, {task: samples})
            answers, prompts = one_at_a_time(model, processor, samples, max_new_tokens, recipe.model.autocast,
                                             method=method, pad_to_square=recipe.benchmark.pad_to_square)
            t1 = time.perf_counter()
            spec = card.task(task)
            result = get_scorer(spec.scorer, **spec.scorer_options)(answers, [s.answer for s in samples],
                                                                    [s.meta for s in samples])
            gen_s[stage.name] += t1 - t0
            score_s[stage.name] += time.perf_counter() - t1
            predictions[stage.name][task] = {s.id: a for s, a in zip(samples, answers, strict=True)}
            scores[stage.name][task] = min(100.0, result.score)
            if stage == stages[0]:
                first_prompts[task] = list(zip(samples, prompts, strict=True))
        if stage != stages[-1]:
            del model, method
            _free()
    seconds = time.perf_counter() - start
    # outside the timed part: the one-at-a-time prompts are the token ids mcit's batched path feeds
    encoder = Encoder.from_recipe(processor, recipe)
    pairs = [pair for task in first_prompts for pair in first_prompts[task]]
    same = sum(prompt == encoder.prompt_ids(sample) for sample, prompt in pairs)
    del model, method
    _free()
    return {"seconds": round(seconds, 3), "load_seconds": _rounded(load_s), "generation_seconds": _rounded(gen_s),
            "scoring_seconds": _rounded(score_s), "model_builds": len(stages), "identical_inputs": same,
            "inputs_checked": len(pairs), "scores": scores, "predictions": predictions}


def mcit_side(stages: list[Path], card, max_new_tokens: int, batch_size: int, workdir: Path) -> dict[str, Any]:
    """`evaluate_cells` over the run's stages, into a fresh output folder (no cell of an earlier run is reused)."""
    from mcit.evaluation.suites import SuiteGeneration
    from mcit.workflows.suite import CheckpointItem, ItemTiming, evaluate_cells, predictions_file

    out = workdir / "mcit-eval"
    shutil.rmtree(out, ignore_errors=True)
    items = [CheckpointItem(stage.name, str(stage)) for stage in stages]
    resolved = [(card, task) for task in card.task_names]
    generation = SuiteGeneration(max_new_tokens=max_new_tokens, batch_size=batch_size, constrained=False)
    timings: list[ItemTiming] = []
    start = time.perf_counter()
    cells = evaluate_cells(items, resolved, generation, out, timings)
    seconds = time.perf_counter() - start
    _free()
    predictions: dict[str, dict[str, dict[str, str]]] = {}
    for item in items:
        predictions[item.label] = {}
        for task in card.task_names:
            rows = [json.loads(line) for line in predictions_file(out, item.label, task).read_text().splitlines()]
            predictions[item.label][task] = {row["id"]: row["prediction"] for row in rows}
    scores = {item.label: {task: cells[(item.label, task)].score for task in card.task_names} for item in items}
    return {"seconds": round(seconds, 3), "load_seconds": _rounded({t.label: t.load_seconds for t in timings}),
            "generation_seconds": _rounded({t.label: t.eval_seconds for t in timings}),
            "model_builds": sum(not t.advanced for t in timings),
            "advanced": [t.label for t in timings if t.advanced], "batch": batch_size,
            "vision_rows": {t.label: t.vision_rows for t in timings}, "scores": scores,
            "predictions": predictions}


def warm_up(stages: list[Path], card, max_new_tokens: int, batch_size: int) -> float:
    """Build one model and answer one sample on both paths (untimed by the sides)."""
    from mcit.data.collate import Encoder, PixelCache
    from mcit.evaluation.generate import generate
    from mcit.workflows.load import load_checkpoint

    t0 = time.perf_counter()
    model, processor, method, recipe = load_checkpoint(str(stages[0]))
    sample = card.load_task(card.task_names[0], "test", seed=recipe.seed)[:1]
    one_at_a_time(model, processor, sample, max_new_tokens, recipe.model.autocast, method=method,
                  pad_to_square=recipe.benchmark.pad_to_square)
    for context, indices in method.eval_groups(model, sample):
        with context:
            generate(model, Encoder.from_recipe(processor, recipe), [sample[i] for i in indices],
                     PixelCache.from_recipe(processor, recipe), batch_size=batch_size,
                     max_new_tokens=max_new_tokens, autocast=recipe.model.autocast)
    method.routing_report()
    del model, method
    _free()
    return time.perf_counter() - t0


def compare(sides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Identical predictions over every (checkpoint, task, sample id) both sides answered, with the first few
    differences."""
    a, b = (sides[name]["predictions"] for name in SIDES)
    total = same = 0
    differences = []
    for label in a:
        for task in a[label]:
            for sample_id, answer in a[label][task].items():
                other = b.get(label, {}).get(task, {}).get(sample_id)
                total += 1
                same += answer == other
                if answer != other and len(differences) < 5:
                    differences.append({"checkpoint": label, "task": task, "id": sample_id, "mcitlib": answer,
                                        "mcit": other})
    scored = [(label, task) for label in a for task in a[label]]
    same_scores = sum(sides["mcitlib"]["scores"][label][task] == sides["mcit"]["scores"].get(label, {}).get(task)
                      for label, task in scored)
    return {"compared": total, "identical": same, "differences": differences, "cells_compared": len(scored),
            "identical_scores": same_scores,
            "ratio": round(sides["mcitlib"]["seconds"] / sides["mcit"]["seconds"], 2)}


def run(args) -> dict[str, Any]:
    import torch

    run_dir = Path(args.run).expanduser().resolve()
    recipe, stages, card = matrix_setup(run_dir, args.per_task)
    max_new_tokens = args.max_new_tokens or recipe.eval.max_new_tokens
    sides = [s for s in args.sides.split(",") if s]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown or not sides:
        raise SystemExit(f"--sides: expected a comma-separated subset of {', '.join(SIDES)}, got {args.sides!r}")
    workdir = Path(args.out).with_suffix("")
    samples = {task: len(card.load_task(task, "test", seed=recipe.seed)) for task in card.task_names}
    result: dict[str, Any] = {
        "run": str(run_dir), "recipe": recipe.name, "method": recipe.method.name, "card": card.name,
        "tasks": card.task_names, "checkpoints": [s.name for s in stages], "cells": len(stages) * len(samples),
        "per_task": args.per_task, "samples_per_task": samples,
        "generations_per_side": len(stages) * sum(samples.values()), "max_new_tokens": max_new_tokens,
        "batch": recipe.eval.batch_size, "autocast": recipe.model.autocast, "base": recipe.model.name_or_path,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "warmup_seconds": round(warm_up(stages, card, max_new_tokens, recipe.eval.batch_size), 3),
        "sides": {},
    }
    for side in sides:
        if side == "mcitlib":
            result["sides"][side] = mcitlib_side(stages, card, max_new_tokens)
        else:
            result["sides"][side] = mcit_side(stages, card, max_new_tokens, recipe.eval.batch_size, workdir)
    if all(side in result["sides"] for side in SIDES):
        result.update(compare(result["sides"]))
    return result


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in values.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished `mcit train` run folder")
    parser.add_argument("--per-task", type=int, default=None,
                        help="test samples per task (the first N as the card loads them; default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the run recipe's eval value")
    parser.add_argument("--sides", default=",".join(SIDES))
    child_main(parser, run, argv)


if __name__ == "__main__":
    main()
