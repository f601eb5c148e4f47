"""Evaluate a model on the tasks of a benchmark: generation, scoring, format labels, constrained scores, and the
prediction files that let any number be recomputed.

Every score in `results.json` comes from here. The task score is the card's scorer on [0, 100]; caption scores
(CIDEr x 100) can exceed 100, so the accuracy matrix stores them clipped at 100 and keeps the raw value in
`details`. A prediction is labelled correct when its per-sample score is >= 0.5 (for captions: per-image CIDEr >= 0.5),
else wrong format (superficial forgetting) or right format but wrong content (essential forgetting).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcit.data.cards import TaskSpec
from mcit.data.collate import Encoder, PixelCache
from mcit.data.records import Sample
from mcit.errors import EvalError
from mcit.evaluation.formats import label_prediction
from mcit.evaluation.generate import candidate_logprobs, constrained_predictions, generate
from mcit.evaluation.normalize import Normalizer
from mcit.evaluation.scorers import get_scorer
from mcit.runtime import dist, failpoints

CLOSED_STYLES = ("word", "number", "letter", "yesno")


@dataclass
class TaskResult:
    task: str
    score: float
    """Task score on [0, 100] (captions clipped at 100; raw in details)."""
    format_rate: float
    superficial: float
    essential: float
    constrained: float | None
    details: dict[str, Any] = field(default_factory=dict)
    n: int = 0
    seconds: float = 0.0
    """Wall-clock time of the evaluation (kept out of `details` so that results.json is deterministic)."""


def _candidates(sample: Sample) -> list[str] | None:
    """The valid answers constrained scoring ranks: letters for multiple choice, else ``meta["candidates"]``."""
    meta = sample.meta
    if meta.get("style") == "letter":
        choices = meta.get("choices")
        if choices is not None and not (isinstance(choices, list | tuple) and 0 < len(choices) <= 26):
            raise EvalError(f"sample {sample.id!r} (task {sample.task!r}): meta['choices'] must be a list of 1-26 "
                            f"options, got {type(choices).__name__}")
        count = len(choices) if choices else 4
        return [chr(ord("A") + i) for i in range(count)]
    cands = meta.get("candidates")
    if cands is None:
        return None
    if not isinstance(cands, list | tuple) or not all(isinstance(c, str) and c for c in cands):
        raise EvalError(f"sample {sample.id!r} (task {sample.task!r}): meta['candidates'] must be a list of "
                        f"non-empty strings, got {cands!r:.80}")
    return list(cands) or None


def _constrained_hit(reference: str, choice: str) -> bool:
    norm = Normalizer()
    return norm(reference) == norm(choice)


def _answers(model, method, encoder: Encoder, pixels: PixelCache, samples: Sequence[Sample], *, batch_size: int,
             max_new_tokens: int, autocast) -> tuple[list[str], list[Any]]:
    """Greedy answers and the method's route of every sample (None where the method does not route)."""
    predictions: list[str] = [""] * len(samples)
    routed: list[Any] = [None] * len(samples)
    for context, indices in method.eval_groups(model, samples):
        group = [samples[i] for i in indices]
        with context:
            outs = generate(model, encoder, group, pixels, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            autocast=autocast, progress=None)
        routes = getattr(context, "routes", None) or [None] * len(indices)
        for i, out, route in zip(indices, outs, routes, strict=True):
            predictions[i] = out or ""
            routed[i] = route
    return predictions, routed


def _ranked(model, method, encoder: Encoder, pixels: PixelCache, samples: Sequence[Sample], *, batch_size: int,
            autocast) -> list[bool | None]:
    """Whether the most likely candidate of each sample is its reference (None for a sample without candidates)."""
    cands = [_candidates(s) for s in samples]
    usable = [i for i, c in enumerate(cands) if c]
    correct: list[bool | None] = [None] * len(samples)
    if not usable:
        return correct
    sub = [samples[i] for i in usable]
    for context, indices in method.eval_groups(model, sub):
        lists = [cands[usable[j]] for j in indices]
        with context:
            lp = candidate_logprobs(model, encoder, [sub[j] for j in indices], lists, pixels, batch_size=batch_size,
                                    autocast=autocast)
        for j, choice in zip(indices, constrained_predictions(lp, lists), strict=True):
            correct[usable[j]] = _constrained_hit(sub[j].answer, choice)
    return correct


def _on_my_shard(run, samples: Sequence[Sample], ranks: int) -> list:
    """`run(samples)` (one list entry per sample) with the samples split over the ranks: rank r computes samples
    r, r + W, r + 2W, ... and every rank gets every entry back in sample order. One process: `run(samples)`."""
    if ranks <= 1:
        return run(samples)
    mine = list(range(dist.rank(), len(samples), ranks))
    local = run([samples[i] for i in mine]) if mine else []
    merged: list = [None] * len(samples)
    for indices, values in dist.all_gather_objects((mine, local)):
        for i, value in zip(indices, values, strict=True):
            merged[i] = value
    return merged


def evaluate_task(model, method, encoder: Encoder, pixels: PixelCache, spec: TaskSpec, samples: Sequence[Sample], *,
                  batch_size: int, max_new_tokens: int, autocast, constrained: bool,
                  predictions_file: Path | None = None, shard: bool = False) -> TaskResult:
    """Score one task. With `shard`, the ranks of a launched run split its samples (each generates and ranks its
    share; the answers are gathered on every rank and scored there, so every rank returns the same result and only
    the main rank writes the predictions file): the same predictions as one process up to batch-composition float
    noise, W times faster."""
    if not samples:
        raise EvalError(f"task {spec.name!r}: no test samples to evaluate")
    t0 = time.time()
    ranks = dist.world_size() if shard and dist.is_distributed() else 1

    def answer(part):
        preds, routes = _answers(model, method, encoder, pixels, part, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, autocast=autocast)
        return list(zip(preds, routes, strict=True))

    answered = _on_my_shard(answer, samples, ranks)
    preds = [pred for pred, _ in answered]
    routed = [route for _, route in answered]
    scorer = get_scorer(spec.scorer, **spec.scorer_options)
    # Every rank holds every answer; one scores (a caption scorer starts java processes) and shares the result.
    result = dist.on_main(lambda: scorer(preds, [s.answer for s in samples], [s.meta for s in samples]))
    labels = [label_prediction(spec.answer_style, score >= 0.5, pred, s.meta)
              for score, pred, s in zip(result.per_sample, preds, samples)]
    constrained_ok: list[bool | None] = [None] * len(samples)
    constrained_score = None
    if constrained and spec.answer_style in CLOSED_STYLES:
        constrained_ok = _on_my_shard(lambda part: _ranked(model, method, encoder, pixels, part,
                                                           batch_size=batch_size, autocast=autocast), samples, ranks)
        hits = [ok for ok in constrained_ok if ok is not None]
        if hits:
            constrained_score = 100.0 * sum(hits) / len(hits)
    n = len(samples)
    if predictions_file is not None and dist.is_main():
        predictions_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = predictions_file.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for i, s in enumerate(samples):
                f.write(json.dumps({"id": s.id, "prompt": s.question, "prediction": preds[i], "reference": s.answer,
                                    "score": result.per_sample[i], "label": labels[i],
                                    "constrained_correct": constrained_ok[i], "route": routed[i]}) + "\n")
        tmp.replace(predictions_file)
    details = dict(result.details)
    details["raw_score"] = result.score
    return TaskResult(
        task=spec.name, score=min(100.0, result.score), n=n,
        format_rate=100.0 * sum(lab != "wrong_format" for lab in labels) / n,
        superficial=100.0 * sum(lab == "wrong_format" for lab in labels) / n,
        essential=100.0 * sum(lab == "wrong_content" for lab in labels) / n,
        constrained=constrained_score, details=details, seconds=round(time.time() - t0, 2),
    )


def evaluate_tasks(model, method, encoder: Encoder, pixels: PixelCache, specs: Sequence[TaskSpec],
                   test: dict[str, list[Sample]], *, batch_size: int, max_new_tokens: int, autocast,
                   constrained: bool, predictions_dir: Path | None = None, log=None,
                   shard: bool = False) -> list[TaskResult]:
    results = []
    for spec in specs:
        path = predictions_dir / f"{spec.name}.jsonl" if predictions_dir is not None else None
        res = evaluate_task(model, method, encoder, pixels, spec, test[spec.name], batch_size=batch_size,
                            max_new_tokens=max_new_tokens, autocast=autocast, constrained=constrained,
                            predictions_file=path, shard=shard)
        if log is not None:
            log({"event": "eval", "task": spec.name, "score": round(res.score, 2),
                 "format": round(res.format_rate, 1), "constrained": res.constrained,
                 "seconds": res.seconds})
        results.append(res)
        failpoints.hit("eval.task")
    return results
