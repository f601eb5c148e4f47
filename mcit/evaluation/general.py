"""Scorers for the general-ability benchmarks MCIT papers report (MME, POPE, MMBench, SEED-Bench), each computing the
headline numbers the way the benchmark's own evaluation does, so "how much general ability a continual run keeps" is
measured on the scale the papers print.

Re-implemented from the published definitions and read against the public reference evaluations (no code taken):

========== ============================================================================================================
scorer     rule (reference)
========== ============================================================================================================
mme        BradyFU/Awesome-Multimodal-Large-Language-Models ``tools/eval_tool.zip`` (MME's ``calculation.py``; the
           same parse in EvolvingLMMs-Lab/lmms-eval ``lmms_eval/tasks/mme/utils.py``). Prediction and answer are
           lower-cased; the prediction reads "yes"/"no" when it is exactly that, else "yes" when its first four
           characters contain "yes", else "no" when they contain "no", else "other" (never right). Per subtask
           (``meta["category"]``): acc = % questions right, acc+ = % images (``meta["image_id"]``, two questions
           each) with both questions right, score = acc + acc+ (0-200). Perception = sum of the 10 perception
           subtask scores (max 2000), cognition = sum of the 4 cognition ones (max 800).
pope       AoiDragon/POPE ``evaluate.py`` (also LLaVA's ``llava/eval/eval_pope.py``): keep the text before the first
           "."; drop commas; split on " "; the answer is "no" when a word is exactly "No", "no" or "not"
           (case-sensitive), else "yes". Positive = yes: accuracy, precision, recall, F1 and yes-ratio (% answers
           "yes"). Task score = F1 * 100 (``report: accuracy`` for accuracy).
mmbench    open-compass/MMBench and VLMEvalKit's circular evaluation (``vlmeval/dataset/utils/multiple_choice.py``):
           the N rotated copies of a question share a base index (VLMEvalKit numbers copy k as base + k * 1e6); a
           question is right only when every copy's predicted letter is right. Score = % questions right.
seed_bench AILab-CVC/SEED-Bench ``eval.py``: accuracy of the predicted option letter (A-D), overall and per
           evaluation dimension (``question_type_id``); overall is over questions, not a mean of dimensions. (The
           reference picks the letter by ranking the four options' likelihoods; here it is read from the generated
           answer, as lmms-eval's ``seedbench`` task does.)
========== ============================================================================================================

Task scores are 0-100. MME's official numbers are on its own scale, so they go to ``details`` (``perception``,
``cognition``, per-subtask ``acc``/``acc_plus``/``score``) and its ``score`` is the mean subtask score / 2, i.e.
100 * (perception + cognition) / (200 * subtasks present) -- 100 only when every subtask is perfect.

Deviations from the references, all where the reference would crash, guess, or count an empty answer:
- predictions are ``.strip()``-ed first (our generation already strips, as the references' inference scripts do);
- an empty prediction (no letter or digit) is never right, as for every mcit scorer. POPE's parse would read it as
  "yes"; here it counts on the wrong side of the confusion matrix (FN for a "yes" question, FP for a "no" one) and
  ``details["empty"]`` counts them;
- a missing meta key, a reference that is not yes/no (MME, POPE) or not a valid letter (MMBench, SEED), an MME image
  without exactly two questions or an unknown MME subtask is an EvalError naming the sample and key (the references
  assert or key-error);
- POPE precision (recall, F1) with a zero denominator is 0 (the reference divides by zero);
- MME perception/cognition sum the subtasks present; ``details["missing_subtasks"]`` lists the absent ones, so a
  partial run cannot pass for the full benchmark silently;
- MMBench groups every copy by its base index, whether or not the copy numbered exactly the base is present
  (VLMEvalKit scores only groups whose base copy is there);
- MMBench and SEED read the letter with `mcit.evaluation.extract.extract_letter` (option text counts with
  ``meta["choices"]``, ``accept_choice_text``), not with MMBench's ChatGPT-assisted matcher.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from mcit.errors import EvalError
from mcit.evaluation.extract import extract_letter, option_letters
from mcit.evaluation.normalize import has_content
from mcit.evaluation.scorers import Scorer, ScoreResult, register_scorer

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
"""MME's subtask names as its eval tool spells them (``eval_type_dict``); ``meta["category"]`` must be one of them."""
MME_QUESTIONS_PER_IMAGE = 2

SEED_DIMENSIONS = {
    1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes", 4: "Instance Location",
    5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
    9: "Text Understanding", 10: "Action Recognition", 11: "Action Prediction", 12: "Procedure Understanding",
}
"""SEED-Bench's evaluation dimensions by ``question_type_id`` (1-9 image, 10-12 video); other ids keep their number."""
SEED_IMAGE_IDS = range(1, 10)
SEED_LETTERS = "ABCD"

MMBENCH_COPY_STRIDE = 1_000_000
"""VLMEvalKit numbers circular copy k of question q as q + k * 1e6, so index % 1e6 is the question."""

POPE_REPORTS = ("f1", "accuracy")


def _meta_value(scorer: str, meta: Mapping[str, Any], key: str, index: int, what: str) -> Any:
    """``meta[key]`` of a sample; missing is an EvalError naming the sample, the key and what it holds."""
    if key not in meta or meta[key] is None:
        raise EvalError(f"{scorer}: sample at index {index} has no meta[{key!r}] ({what}); load the test split through "
                        f"its data card, or add the key to every sample")
    value = meta[key]
    if not isinstance(value, Hashable) or isinstance(value, (bool, float)):
        raise EvalError(f"{scorer}: sample at index {index}: meta[{key!r}] must be text or an integer ({what}), got "
                        f"{type(value).__name__}")
    return value


def _yes_no_reference(scorer: str, reference: str, index: int) -> str:
    want = reference.strip().lower()
    if want not in ("yes", "no"):
        raise EvalError(f"{scorer}: reference at index {index} ({reference!r}) must be 'yes' or 'no'")
    return want


def mme_answer(prediction: str) -> str:
    """MME's parse: "yes", "no" or "other" (see the module docstring)."""
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@register_scorer("mme")
@dataclass
class MME(Scorer):
    """MME perception/cognition scores (acc + acc+ per subtask); needs ``meta["category"]`` and ``meta["image_id"]``.

    Per-sample score = the question is right. Task score = 100 * (perception + cognition) / (200 * subtasks
    present); the official numbers are in ``details``.
    """

    name: ClassVar[str] = "mme"

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        known = MME_PERCEPTION + MME_COGNITION
        per_sample: list[float] = []
        images: dict[str, dict[Hashable, list[float]]] = defaultdict(lambda: defaultdict(list))
        other = 0
        for i, (pred, ref, meta) in enumerate(zip(predictions, references, metas)):
            category = _meta_value(self.name, meta, "category", i, "the MME subtask")
            if category not in known:
                raise EvalError(f"mme: sample at index {i}: meta['category'] {category!r} is not an MME subtask; "
                                f"valid: {', '.join(known)}")
            image = _meta_value(self.name, meta, "image_id", i, "the image its two questions share")
            want = _yes_no_reference(self.name, ref, i)
            got = mme_answer(pred)
            other += got == "other"
            right = float(has_content(pred) and got == want)
            per_sample.append(right)
            images[category][image].append(right)
        subtasks: dict[str, dict[str, float]] = {}
        for category in known:
            if category not in images:
                continue
            by_image = images[category]
            for image, rights in by_image.items():
                if len(rights) != MME_QUESTIONS_PER_IMAGE:
                    raise EvalError(f"mme: subtask {category!r}, image {image!r} has {len(rights)} question(s); MME "
                                    f"asks {MME_QUESTIONS_PER_IMAGE} per image (acc+ needs both) -- check "
                                    "meta['image_id'] and that no question was dropped")
            answers = [r for rights in by_image.values() for r in rights]
            acc = 100.0 * sum(answers) / len(answers)
            acc_plus = 100.0 * sum(all(rights) for rights in by_image.values()) / len(by_image)
            subtasks[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
        perception = sum(s["score"] for c, s in subtasks.items() if c in MME_PERCEPTION)
        cognition = sum(s["score"] for c, s in subtasks.items() if c in MME_COGNITION)
        details: dict[str, Any] = {
            "n": len(per_sample), "perception": perception, "cognition": cognition, "total": perception + cognition,
            "subtasks": subtasks, "other": other, "missing_subtasks": [c for c in known if c not in subtasks],
        }
        return ScoreResult(per_sample, (perception + cognition) / (2 * len(subtasks)), details)


def pope_answer(prediction: str) -> str:
    """POPE's parse: "no" when the first sentence has the word "No", "no" or "not", else "yes"."""
    words = prediction.strip().split(".", 1)[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def pope_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    """POPE's numbers from a confusion matrix (positive = yes), all *100; a zero denominator gives 0."""
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100.0 * (tp + tn) / total, "precision": 100.0 * precision, "recall": 100.0 * recall,
            "f1": 100.0 * f1, "yes_ratio": 100.0 * (tp + fp) / total, "TP": tp, "FP": fp, "TN": tn, "FN": fn}


@register_scorer("pope")
@dataclass
class POPE(Scorer):
    """POPE's accuracy, precision, recall, F1 and yes-ratio (positive = yes); task score by ``report`` ("f1" default,
    or "accuracy"). With ``meta["category"]`` (random / popular / adversarial) every sample carries, ``details``
    also holds the numbers per category."""

    name: ClassVar[str] = "pope"
    report: str = "f1"

    def __post_init__(self) -> None:
        if self.report not in POPE_REPORTS:
            raise EvalError(f"pope: report must be one of {', '.join(POPE_REPORTS)}, got {self.report!r}")

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        per_sample: list[float] = []
        cells: dict[str | None, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # TP, FP, TN, FN
        categories = all(isinstance(m.get("category"), str) for m in metas)
        empty = 0
        for i, (pred, ref, meta) in enumerate(zip(predictions, references, metas)):
            want = _yes_no_reference(self.name, ref, i)
            if has_content(pred):
                got = pope_answer(pred)
            else:  # never right: the wrong side of the matrix (the reference would read "yes")
                empty += 1
                got = "no" if want == "yes" else "yes"
            cell = {("yes", "yes"): 0, ("yes", "no"): 1, ("no", "no"): 2, ("no", "yes"): 3}[(got, want)]
            for key in (None, meta["category"]) if categories else (None,):
                cells[key][cell] += 1
            per_sample.append(float(got == want))
        details: dict[str, Any] = {"n": len(per_sample), **pope_metrics(*cells.pop(None)), "empty": empty}
        if categories:
            details["by_category"] = {c: pope_metrics(*cells[c]) for c in sorted(cells)}
        return ScoreResult(per_sample, details[self.report], details)


@register_scorer("mmbench")
@dataclass
class MMBench(Scorer):
    """MMBench circular evaluation: a question counts only if every rotated copy is answered right.

    Copies are grouped by ``meta["circular_group"]`` when present, else by ``meta["index"] % 1e6`` (VLMEvalKit's
    numbering). Letters come from `extract_letter` with ``meta["choices"]`` (the copy's rotated options). Per-sample
    score = its question's circular result (so every copy of a failed question scores 0); task score = % questions
    right. ``details["vanilla"]`` = % copies right, each alone; ``by_category`` (circular) when every sample has
    ``meta["category"]``.
    """

    name: ClassVar[str] = "mmbench"
    accept_choice_text: bool = True

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        groups: dict[Hashable, list[int]] = defaultdict(list)
        rights: list[bool] = []
        for i, (pred, ref, meta) in enumerate(zip(predictions, references, metas)):
            want = extract_letter(ref, meta, use_choice_text=False)
            if want is None:
                raise EvalError(f"mmbench: reference at index {i} ({ref!r}) names no valid option letter "
                                f"({option_letters(meta)}); check the answer and meta['choices']")
            got = extract_letter(pred, meta, use_choice_text=self.accept_choice_text) if has_content(pred) else None
            rights.append(got == want)
            groups[self._group(meta, i)].append(i)
        group_right = {g: all(rights[i] for i in members) for g, members in groups.items()}
        per_sample = [0.0] * len(rights)
        for g, members in groups.items():
            for i in members:
                per_sample[i] = float(group_right[g])
        details: dict[str, Any] = {
            "n": len(rights), "questions": len(groups), "vanilla": 100.0 * sum(rights) / len(rights),
            "copies_per_question": {"min": min(map(len, groups.values())), "max": max(map(len, groups.values()))},
        }
        if all(isinstance(m.get("category"), str) for m in metas):
            by_category: dict[str, list[bool]] = defaultdict(list)
            for g, members in groups.items():
                by_category[metas[members[0]]["category"]].append(group_right[g])
            details["by_category"] = {c: 100.0 * sum(v) / len(v) for c, v in sorted(by_category.items())}
        return ScoreResult(per_sample, 100.0 * sum(group_right.values()) / len(groups), details)

    def _group(self, meta: Mapping[str, Any], index: int) -> Hashable:
        if meta.get("circular_group") is not None:
            return _meta_value(self.name, meta, "circular_group", index, "the question its rotated copies share")
        value = _meta_value(self.name, meta, "index", index, "the question's index; circular copies are index + k*1e6")
        number = _as_int(value)
        if number is None:
            raise EvalError(f"mmbench: sample at index {index}: meta['index'] must be an integer (VLMEvalKit's "
                            f"numbering), got {value!r}; or give meta['circular_group']")
        return number % MMBENCH_COPY_STRIDE


def _as_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


@register_scorer("seed_bench")
@dataclass
class SEEDBench(Scorer):
    """SEED-Bench option-letter accuracy (A-D), overall and per evaluation dimension (``meta["question_type_id"]``).

    ``details["dimensions"]`` maps dimension names (see `SEED_DIMENSIONS`) to accuracy; ``image`` and ``video`` are
    the accuracies over the image (1-9) and video (10-12) dimensions present.
    """

    name: ClassVar[str] = "seed_bench"
    accept_choice_text: bool = True

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        per_sample: list[float] = []
        by_type: dict[int, list[float]] = defaultdict(list)
        unparsed = 0
        for i, (pred, ref, meta) in enumerate(zip(predictions, references, metas)):
            raw = _meta_value(self.name, meta, "question_type_id", i, "the evaluation dimension, 1-12")
            type_id = _as_int(raw)
            if type_id is None:
                raise EvalError(f"seed_bench: sample at index {i}: meta['question_type_id'] must be an integer, got "
                                f"{raw!r}")
            choices = meta.get("choices")
            letters_meta = {**meta, "choices": list(choices)[:4]} if isinstance(choices, (list, tuple)) else meta
            want = extract_letter(ref, letters_meta, use_choice_text=False)
            if want is None or want not in SEED_LETTERS:
                raise EvalError(f"seed_bench: reference at index {i} ({ref!r}) is not an option letter A-D")
            got = extract_letter(pred, letters_meta, use_choice_text=self.accept_choice_text)
            got = got if has_content(pred) else None
            unparsed += got is None
            right = float(got == want)
            per_sample.append(right)
            by_type[type_id].append(right)
        dimensions = {SEED_DIMENSIONS.get(t, str(t)): 100.0 * sum(v) / len(v) for t, v in sorted(by_type.items())}
        details: dict[str, Any] = {"n": len(per_sample), "dimensions": dimensions, "unparsed": unparsed}
        for part, ids in (("image", SEED_IMAGE_IDS), ("video", range(10, 13))):
            scores = [s for t, v in by_type.items() if t in ids for s in v]
            if scores:
                details[part] = 100.0 * sum(scores) / len(scores)
        return ScoreResult(per_sample, 100.0 * sum(per_sample) / len(per_sample), details)
