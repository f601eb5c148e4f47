"""Scorers that reproduce a published benchmark's own evaluation, quirks included, so our numbers sit in its tables.

`mllm_dcl` scores the five MLLM-DCL domains (MLLM-CL's domain continual learning track) the way MCITlib's released
evaluation does: Ghy0501/MCITlib @2956dfd, ``<Method>/llava/eval/CoIN/eval_{ai2d,pvqa,sci,finvis}.py``, run by
``<Method>/scripts/*/Eval_MLLM_DCL/eval_{rs,med,ad,sci,fin}.sh`` (the four scorers are the same files in all eight
method folders and in bjzhb666/MLLM-CL ``ETrain/Eval/LLaVA/CoIN/``). The data card picks the rule per task:

====== =========== ===========================================================================================
rule   domains     a prediction is right when (both sides lower-cased unless said otherwise)
====== =========== ===========================================================================================
ai2d   RS, AD      answer with a space: it is a substring of the prediction. One-word answer: its periods are
                   removed; then, if the prediction has a space, one of " a", "a ", "a.", "a," occurs in it
                   (a rough word boundary), else the answer is a substring of the prediction.
pvqa   Med         the answer is a substring of the prediction.
sci    Sci         by the source, the image file name's prefix before the first "_": AI2D, TQA, VQA, SciVerse:
                   prediction == answer. Anything else is MapQA: if the question contains "Which states"
                   (case-sensitive), answer and prediction are split on "," (no trimming) and the score is the
                   share of answer items found among the prediction items (partial credit); otherwise the answer
                   is a substring of the prediction.
finvis Fin         the prediction with every " " and "." removed equals the answer (answer not trimmed).
====== =========== ===========================================================================================

Common rule: a prediction containing "Unanswerable" (case-sensitive) scores 0 and still counts in the denominator;
task score = 100 * mean per-sample score. The prediction is ``.strip()``-ed first, as MCITlib's inference scripts
do before writing it (our generation already does; this keeps predictions read back from a file equal).

The `sci` rule reads ``meta["image_name"]`` (the image's basename; a path is cut at its last "/", as the reference
does) for every sample, and ``meta["question"]`` (the question text) for MapQA samples; the card loader puts both in
the test samples' meta.

Kept on purpose, because the published numbers include them: "category" alone is right for "cat" (no space in the
prediction, so plain substring), and so is "the answer is category" (" cat" occurs); a one-word answer "2.5" becomes
"25" and no longer matches "2.5"; MapQA lists compare untrimmed items, so "texas,ohio" earns only "texas" of
"texas, ohio"; sci's exact match keeps a trailing period ("b." is wrong for "B").

Deviations from the reference:
- a prediction without a letter or digit (empty, whitespace, punctuation) scores 0, as for every mcit scorer. The
  reference differs only when a MapQA answer list has an empty item ("texas,,ohio"), which "" or "," would match;
- an answer without a letter or digit is an EvalError naming the sample (the reference would count an empty answer
  right for every prediction, as "" is a substring of anything);
- a missing ``rule`` option or meta key is an EvalError naming it (the reference has no such inputs to miss).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from mcit.errors import EvalError
from mcit.evaluation.normalize import has_content
from mcit.evaluation.scorers import Scorer, ScoreResult, register_scorer

MLLM_DCL_RULES = ("ai2d", "pvqa", "sci", "finvis")
"""The rule names, after the reference scorer files (eval_<rule>.py); RS/AD use ai2d, Med pvqa, Sci sci, Fin finvis."""

UNANSWERABLE = "Unanswerable"
SCI_EXACT_SOURCES = ("AI2D", "TQA", "VQA", "SciVerse")
"""Sci sources scored by exact match; every other image prefix is MapQA."""
MAPQA = "MapQA"
MAPQA_LIST_CUE = "Which states"


def ai2d_score(prediction: str, reference: str) -> float:
    """eval_ai2d (RS, AD): substring for multi-word answers, a rough word boundary for one-word answers."""
    pred, gt = prediction.lower(), reference.lower()
    if " " in gt:
        return float(gt in pred)
    gt = gt.replace(".", "")
    if " " in pred:
        return float(any(form in pred for form in (" " + gt, gt + " ", gt + ".", gt + ",")))
    return float(gt in pred)


def pvqa_score(prediction: str, reference: str) -> float:
    """eval_pvqa (Med): the answer is a substring of the prediction, case-insensitively."""
    return float(reference.lower() in prediction.lower())


def finvis_score(prediction: str, reference: str) -> float:
    """eval_finvis (Fin): spaces and periods dropped from the prediction ("B." -> "b"), then exact match."""
    return float(prediction.lower().replace(" ", "").replace(".", "") == reference.lower())


def sci_source(image_name: str) -> str:
    """The Sci sub-dataset of a sample: its image file name's prefix before the first "_" if that is one of
    `SCI_EXACT_SOURCES` (case-sensitive, as in the reference), else MapQA."""
    prefix = image_name.rsplit("/", 1)[-1].split("_", 1)[0]
    return prefix if prefix in SCI_EXACT_SOURCES else MAPQA


def sci_score(prediction: str, reference: str, source: str, question: str | None) -> float:
    """eval_sci (Sci): exact match for AI2D/TQA/VQA/SciVerse; MapQA: list partial credit or substring.

    ``question`` is needed for MapQA only (may be None otherwise)."""
    pred, gt = prediction.lower(), reference.lower()
    if source != MAPQA:
        return float(pred == gt)
    if question is None:
        raise EvalError("mllm_dcl (rule sci): a MapQA sample needs its question text (\"Which states\" questions get "
                        "partial credit)")
    if MAPQA_LIST_CUE in question:
        wanted = gt.split(",")
        given = pred.split(",")
        return sum(item in given for item in wanted) / len(wanted)
    return float(gt in pred)


_SIMPLE_RULES = {"ai2d": ai2d_score, "pvqa": pvqa_score, "finvis": finvis_score}


@register_scorer("mllm_dcl")
@dataclass
class MLLMDCLScorer(Scorer):
    """MLLM-DCL's per-domain rules as MCITlib scores them (see the module docstring for the rule table).

    ``rule`` has no default value that scores: which rule applies depends on the domain, and guessing one would give
    a plausible but wrong number. It is optional here only so the registry can build the scorer without options;
    scoring without it is an error naming the card key to set.
    """

    name: ClassVar[str] = "mllm_dcl"
    rule: str | None = None

    def __post_init__(self) -> None:
        if self.rule is not None and self.rule not in MLLM_DCL_RULES:
            raise EvalError(f"mllm_dcl: unknown rule {self.rule!r}; valid rules: {', '.join(MLLM_DCL_RULES)} "
                            "(RS and AD: ai2d, Med: pvqa, Sci: sci, Fin: finvis)")

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        if self.rule is None:
            raise EvalError("mllm_dcl: no rule chosen; set the task's scorer_options: {rule: <rule>} in the data card, "
                            f"one of {', '.join(MLLM_DCL_RULES)} (RS and AD: ai2d, Med: pvqa, Sci: sci, Fin: finvis)")
        per_sample: list[float] = []
        unanswerable = 0
        sources: Counter[str] = Counter()
        for i, (raw, ref, meta) in enumerate(zip(predictions, references, metas)):
            pred = raw.strip()
            if self.rule == "sci":
                source = sci_source(_meta_text(meta, "image_name", i))
                sources[source] += 1
            if UNANSWERABLE in pred:
                unanswerable += 1
                per_sample.append(0.0)
                continue
            if not has_content(pred):
                per_sample.append(0.0)
                continue
            if self.rule == "sci":
                question = _meta_text(meta, "question", i) if source == MAPQA else None
                per_sample.append(sci_score(pred, ref, source, question))
            else:
                per_sample.append(_SIMPLE_RULES[self.rule](pred, ref))
        details: dict[str, Any] = {"n": len(per_sample), "rule": self.rule, "unanswerable": unanswerable}
        if sources:
            details["sources"] = dict(sorted(sources.items()))
        return ScoreResult(per_sample, 100.0 * sum(per_sample) / len(per_sample), details)


def _meta_text(meta: dict, key: str, index: int) -> str:
    """A text the sci rule needs from a sample's meta; missing or not text is an error naming key and sample."""
    value = meta.get(key)
    if not isinstance(value, str):
        got = "it is missing" if value is None else f"got {type(value).__name__}"
        raise EvalError(f"mllm_dcl (rule sci): sample at index {index} needs meta[{key!r}] as text ({got}); the card "
                        "loader sets 'question' (the question text) and 'image_name' (the image's file name) for "
                        "tasks scored by mllm_dcl -- load the test split through the card, or add the key")
    return value
