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
from mcit.runtime import failpoints

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


def evaluate_task(model, method, encoder: Encoder, pixels: PixelCache, spec: TaskSpec, samples: Sequence[Sample], *,
                  batch_size: int, max_new_tokens: int, autocast, constrained: bool,
                  predictions_file: Path | None = None) -> TaskResult:
    if not samples:
        raise EvalError(f"task {spec.name!r}: no test samples to evaluate")
    t0 = time.time()
    predictions: list[str | None] = [None] * len(samples)
    routed: list[Any] = [None] * len(samples)
    for context, indices in method.eval_groups(model, samples):
        group = [samples[i] for i in indices]
        with context:
            outs = generate(model, encoder, group, pixels, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            autocast=autocast, progress=None)
        routes = getattr(context, "routes", None) or [None] * len(indices)
        for i, out, route in zip(indices, outs, routes, strict=True):
            predictions[i] = out
            routed[i] = route
    preds = [p or "" for p in predictions]
    scorer = get_scorer(spec.scorer, **spec.scorer_options)
    result = scorer(preds, [s.answer for s in samples], [s.meta for s in samples])
    labels = [label_prediction(spec.answer_style, score >= 0.5, pred, s.meta)
              for score, pred, s in zip(result.per_sample, preds, samples)]
    constrained_ok: list[bool | None] = [None] * len(samples)
    constrained_score = None
    if constrained and spec.answer_style in CLOSED_STYLES:
        cands = [_candidates(s) for s in samples]
        usable = [i for i, c in enumerate(cands) if c]
        if usable:
            sub = [samples[i] for i in usable]
            hits = []
            for context, indices in method.eval_groups(model, sub):
                with context:
                    lp = candidate_logprobs(model, encoder, [sub[j] for j in indices], [cands[usable[j]] for j in
                                                                                          indices],
                                            pixels, batch_size=batch_size, autocast=autocast)
                choices = constrained_predictions(lp, [cands[usable[j]] for j in indices])
                for j, choice in zip(indices, choices, strict=True):
                    ok = _constrained_hit(sub[j].answer, choice)
                    constrained_ok[usable[j]] = ok
                    hits.append(ok)
            constrained_score = 100.0 * sum(hits) / len(hits)
    n = len(samples)
    if predictions_file is not None:
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
                   constrained: bool, predictions_dir: Path | None = None, log=None) -> list[TaskResult]:
    results = []
    for spec in specs:
        path = predictions_dir / f"{spec.name}.jsonl" if predictions_dir is not None else None
        res = evaluate_task(model, method, encoder, pixels, spec, test[spec.name], batch_size=batch_size,
                            max_new_tokens=max_new_tokens, autocast=autocast, constrained=constrained,
                            predictions_file=path)
        if log is not None:
            log({"event": "eval", "task": spec.name, "score": round(res.score, 2),
                 "format": round(res.format_rate, 1), "constrained": res.constrained,
                 "seconds": res.seconds})
        results.append(res)
        failpoints.hit("eval.task")
    return results
