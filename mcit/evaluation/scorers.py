"""Scorers selected by name from a data card (`scorer:` key), and their registry (`get_scorer`).

Every scorer is called as ``scorer(predictions, references, metas) -> ScoreResult`` on *aligned* lists: per-sample
scores in [0, 1], a task score in [0, 100] (caption CIDEr*100 is the exception: CIDEr ranges over [0, 10], so the
caption task score can exceed 100, as in the papers' tables) and a ``details`` dict with everything else worth
reporting. Callers holding id-keyed dicts use `align_by_id` first, so that a missing or extra id is an error with the
ids in it instead of a silent shift of every later sample (a crash users reported with the reference caption code).

The text the scorers compare goes through `mcit.evaluation.normalize` (lenient on purpose, see there) and the answer
they read comes from `mcit.evaluation.extract`. Two rules hold for every scorer: a prediction without a letter or
digit (empty, whitespace, punctuation) never scores, and a reference without one is an error naming the sample --
it would otherwise match the empty answer, or nothing, silently.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from mcit.data.cards import SCORERS
from mcit.data.synthcit_scenes import parse_scene
from mcit.errors import EvalError
from mcit.evaluation.extract import extract_letter, extract_yesno, find_numbers, option_letters, parse_box
from mcit.evaluation.normalize import Normalizer, has_content, normalize_vqa_answer
from mcit.schema import FLATTEN, from_mapping


@dataclass
class ScoreResult:
    """Per-sample scores in [0, 1], the task score (0-100 scale) and extra numbers for the report."""

    per_sample: list[float]
    score: float
    details: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, tuple[type[Scorer], dict[str, Any]]] = {}


def register_scorer(name: str, **preset: Any) -> Callable[[type[Scorer]], type[Scorer]]:
    """Register a scorer class under ``name``; ``preset`` options make a named variant (e.g. caption_mean).

    Data cards are validated below this layer, so the names a card may use are declared there (`SCORERS`); a scorer
    registered under any other name would be unreachable, and is refused.
    """
    if name not in SCORERS:
        raise EvalError(f"scorer {name!r} is not declared in mcit.data.cards.SCORERS, so no data card could name it")

    def decorate(cls: type[Scorer]) -> type[Scorer]:
        _REGISTRY[name] = (cls, preset)
        return cls

    return decorate


def scorer_names() -> list[str]:
    return sorted(_REGISTRY)


def get_scorer(name: str, **options: Any) -> Scorer:
    """The scorer a data card names, configured with its options (validated by `mcit.schema.from_mapping`: an
    unknown option or one of the wrong type is an EvalError naming it).

    Scorers holding a `Normalizer` also accept its fields directly (``lowercase=False``), as a dict
    (``normalizer={"drop_articles": False}``) or as ``normalizer="strict"``, so data cards stay plain YAML.
    """
    if name not in _REGISTRY:
        raise EvalError(f"unknown scorer {name!r}; valid scorers: {', '.join(scorer_names())}")
    cls, preset = _REGISTRY[name]
    options = {**preset, **options}
    if "normalizer" in {f.name for f in fields(cls)} and "normalizer" in options:
        normalizer = _normalizer_options(options.pop("normalizer"))
        if normalizer is not None:
            options["normalizer"] = normalizer
    return from_mapping(cls, options, where=f"scorer {name!r}", error=EvalError)


def _normalizer_options(value: Any) -> dict[str, Any] | None:
    """A card's ``normalizer`` value as a mapping of `Normalizer` options ("strict" and instances included)."""
    if value == "strict":
        return asdict(Normalizer.strict())
    if isinstance(value, Normalizer):
        return asdict(value)
    if value is None or isinstance(value, Mapping):
        return None if value is None else dict(value)
    raise EvalError(f"normalizer must be a Normalizer, a dict of its options or 'strict', got {value!r}")


@dataclass
class Scorer:
    """Base class: checks the inputs line up, then `score_aligned` does the scorer's work."""

    name: ClassVar[str] = "scorer"
    reference_is_answer: ClassVar[bool] = True
    """False where the answers come from ``meta["references"]`` (vqa, caption), which the scorer checks itself."""

    def __call__(self, predictions: list[str], references: list[str], metas: list[dict] | None = None) -> ScoreResult:
        if len(predictions) != len(references):
            raise EvalError(
                f"{self.name}: {len(predictions)} predictions but {len(references)} references; "
                "pass aligned lists (use align_by_id for id-keyed data)"
            )
        if metas is None:
            metas = [{} for _ in predictions]
        elif len(metas) != len(predictions):
            raise EvalError(f"{self.name}: {len(metas)} metas for {len(predictions)} predictions")
        if not predictions:
            raise EvalError(f"{self.name}: no predictions to score (empty test split?)")
        for kind, values in (("prediction", predictions), ("reference", references)):
            for i, value in enumerate(values):
                if not isinstance(value, str):
                    raise EvalError(f"{self.name}: {kind} at index {i} is {type(value).__name__}, expected str")
        if self.reference_is_answer:
            for i, ref in enumerate(references):
                if not has_content(ref):
                    raise EvalError(_no_answer(self.name, i, ref))
        return self.score_aligned(predictions, references, [m or {} for m in metas])

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        raise NotImplementedError


def _no_answer(scorer: str, index: int, reference: str) -> str:
    return (f"{scorer}: the test file has no answer for sample {index} (reference {reference!r} is empty after "
            "normalisation); fill in its answer or drop the sample")


def _mean_result(per_sample: list[float], **details: Any) -> ScoreResult:
    return ScoreResult(per_sample, 100.0 * sum(per_sample) / len(per_sample), {"n": len(per_sample), **details})


@register_scorer("exact_match")
@dataclass
class ExactMatch(Scorer):
    """Equality after normalisation (case-insensitive exact match in the reference evaluations, made lenient)."""

    name: ClassVar[str] = "exact_match"
    normalizer: Normalizer = field(default_factory=Normalizer, metadata=FLATTEN)

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        norm = self.normalizer
        scores = []
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            want = norm(ref)
            if not want:
                raise EvalError(_no_answer(self.name, i, ref))
            scores.append(float(has_content(pred) and norm(pred) == want))
        return _mean_result(scores)


@register_scorer("mc_letter")
@dataclass
class MultipleChoiceLetter(Scorer):
    """The option letter read from the prediction (see `extract_letter`) equals the reference's letter.

    The reference may be a letter or, with ``meta["choices"]``, the option text.
    """

    name: ClassVar[str] = "mc_letter"
    accept_choice_text: bool = True

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        scores, unparsed = [], 0
        for i, (pred, ref, meta) in enumerate(zip(predictions, references, metas)):
            want = extract_letter(ref, meta)
            if want is None:
                raise EvalError(
                    f"mc_letter: reference at index {i} ({ref!r}) names no valid option letter "
                    f"({option_letters(meta)}); check the answer and meta['choices']"
                )
            got = extract_letter(pred, meta, use_choice_text=self.accept_choice_text)
            unparsed += got is None
            scores.append(float(got == want))
        return _mean_result(scores, unparsed=unparsed)


@register_scorer("numeric")
@dataclass
class Numeric(Scorer):
    """Numbers compared with tolerance; number words count ("three" == 3).

    When the prediction holds several numbers, ``pick`` chooses which one answers ("last" suits "... so the answer
    is 5", "first" suits "3 circles and 2 squares remain"; "only" demands exactly one number).
    """

    name: ClassVar[str] = "numeric"
    rel_tol: float = 1e-4
    abs_tol: float = 1e-6
    pick: str = "last"

    def __post_init__(self) -> None:
        if self.pick not in ("first", "last", "only"):
            raise EvalError(f"numeric: pick must be 'first', 'last' or 'only', got {self.pick!r}")

    def _choose(self, numbers: list[float]) -> float | None:
        if not numbers or (self.pick == "only" and len(numbers) != 1):
            return None
        return numbers[0] if self.pick == "first" else numbers[-1]

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        scores, unparsed = [], 0
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            ref_numbers = find_numbers(ref)
            if len(ref_numbers) != 1:
                raise EvalError(f"numeric: reference at index {i} ({ref!r}) must hold exactly one number")
            got = self._choose(find_numbers(pred))
            unparsed += got is None
            ok = got is not None and math.isclose(got, ref_numbers[0], rel_tol=self.rel_tol, abs_tol=self.abs_tol)
            scores.append(float(ok))
        return _mean_result(scores, unparsed=unparsed)


@register_scorer("yesno")
@dataclass
class YesNo(Scorer):
    """The yes/no read from the prediction (see `extract_yesno`) equals the reference's."""

    name: ClassVar[str] = "yesno"

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        scores, unparsed = [], 0
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            want = extract_yesno(ref)
            if want is None:
                raise EvalError(f"yesno: reference at index {i} ({ref!r}) is neither yes nor no")
            got = extract_yesno(pred)
            unparsed += got is None
            scores.append(float(got == want))
        return _mean_result(scores, unparsed=unparsed)


@register_scorer("contains")
@dataclass
class Contains(Scorer):
    """The reference occurs in the prediction as whole words, case-insensitively (MLLM-DCL's rule).

    Word boundaries keep "cat" from matching "category"; a long, rambling prediction can still score, which is the
    reference behaviour.
    """

    name: ClassVar[str] = "contains"

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        scores = []
        for pred, ref in zip(predictions, references):
            ref = " ".join(ref.split())  # never empty: the base class refuses references without content
            pattern = r"(?<!\w)" + re.escape(ref).replace(r"\ ", r"\s+") + r"(?!\w)"
            scores.append(float(re.search(pattern, pred, re.IGNORECASE) is not None))
        return _mean_result(scores)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when the union has no area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@register_scorer("iou")
@dataclass
class BoxIoU(Scorer):
    """Grounding: a hit when IoU(predicted box, reference box) >= threshold; an unparsable prediction scores 0."""

    name: ClassVar[str] = "iou"
    threshold: float = 0.5

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        scores, ious, unparsed = [], [], 0
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            ref_box = parse_box(ref)
            if ref_box is None:
                raise EvalError(f"iou: reference at index {i} ({ref!r}) is not a box [x1, y1, x2, y2]")
            pred_box = parse_box(pred)
            unparsed += pred_box is None
            iou = box_iou(pred_box, ref_box) if pred_box is not None else 0.0
            ious.append(iou)
            scores.append(float(iou >= self.threshold))
        return _mean_result(scores, mean_iou=100.0 * sum(ious) / len(ious), unparsed=unparsed)


CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
"""pycocoevalcap's names (COCOEvalCap.eval keys), SPICE left out: it downloads Stanford CoreNLP models at first use."""

JAVA_REMEDY = "install a Java runtime, e.g. Debian's default-jre-headless; scripts/setup.sh does it"


@register_scorer("caption", report="CIDEr")
@register_scorer("caption_mean", report="mean")
@dataclass
class Caption(Scorer):
    """The COCO caption metrics computed as pycocoevalcap's COCOEvalCap.evaluate computes them: both sides tokenised by
    its PTBTokenizer (Stanford CoreNLP, java), then Bleu(4), METEOR (java), ROUGE-L and CIDEr on those tokens.

    Several reference captions per sample come from ``meta["references"]`` (a list); otherwise the reference string
    is the only one. ``details`` holds every metric *100 under pycocoevalcap's names and ``mean``, the mean of the
    computed metrics *100 -- the number the UCIT tables report (METEOR included). ``report`` chooses the task score:
    "CIDEr" (default), "mean" or any metric name. Per-sample scores are per-image CIDEr clipped to [0, 1] (0 for a
    prediction without a letter or digit). CIDEr's idf comes from the scored set itself, so one caption alone
    always gets CIDEr 0.

    Deviations from COCOEvalCap: no SPICE; ``meteor=False`` leaves METEOR out (``mean`` over the other six, details
    say ``"meteor": "off"``) because its java process takes seconds to start; a reference caption that is empty after
    tokenisation is dropped rather than scored against; line breaks inside a caption become spaces before
    tokenising (the tokenizer reads one caption per line and would shift every later caption otherwise).
    """

    name: ClassVar[str] = "caption"
    reference_is_answer: ClassVar[bool] = False
    report: str = "CIDEr"
    meteor: bool = True

    def __post_init__(self) -> None:
        if self.report != "mean" and self.report not in CAPTION_METRICS:
            raise EvalError(f"caption: report must be 'mean' or one of {list(CAPTION_METRICS)}, got {self.report!r}")
        if self.report == "METEOR" and not self.meteor:
            raise EvalError("caption: report='METEOR' needs meteor=True")

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        require_java("caption")
        raw_refs = {i: caption_references(i, r, m) for i, (r, m) in enumerate(zip(references, metas))}
        # one java start for both sides (each line is tokenised on its own, so nothing changes by sharing the call)
        tokens = ptb_tokenize({**{("ref", i): refs for i, refs in raw_refs.items()},
                               **{("pred", i): [p] for i, p in enumerate(predictions)}})
        gts = {i: tokens[("ref", i)] for i in raw_refs}
        res = {i: tokens[("pred", i)] for i in range(len(predictions))}
        for i, refs in gts.items():
            gts[i] = [r for r in refs if r]
            if not gts[i]:
                raise EvalError(f"caption: sample at index {i} has no non-empty reference caption after tokenisation "
                                f"({raw_refs[i]!r})")
        metrics: dict[str, float] = {}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        metrics.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
        if self.meteor:
            metrics["METEOR"] = _meteor_score(gts, res)
        metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        cider, per_image = Cider().compute_score(gts, res)
        metrics["CIDEr"] = float(cider)
        details: dict[str, Any] = {k: 100.0 * v for k, v in metrics.items()}
        details["mean"] = sum(details.values()) / len(metrics)
        details["n"] = len(predictions)
        if not self.meteor:
            details["meteor"] = "off"
        per_sample = [min(1.0, max(0.0, float(c))) if has_content(p) else 0.0 for c, p in zip(per_image, predictions)]
        return ScoreResult(per_sample, details[self.report], details)


def require_java(scorer: str) -> None:
    """An EvalError naming the remedy when `java` is missing: the COCO tokenizer and METEOR are java programs, and a
    Python stand-in would give numbers that differ from the papers' (no silent fallback)."""
    if shutil.which("java") is None:
        raise EvalError(f"{scorer}: `java` is not on PATH, and pycocoevalcap's PTBTokenizer and METEOR run in java; "
                        f"{JAVA_REMEDY}")


def caption_references(index: int, reference: str, meta: Mapping[str, Any]) -> list[str]:
    """Reference captions of one sample: ``meta["references"]`` when given, else the reference string; captions
    without a letter or digit are dropped, and a sample left with none is an error."""
    refs = meta.get("references")
    if refs is None:
        refs = [reference]
    elif isinstance(refs, str):
        refs = [refs]
    elif not isinstance(refs, (list, tuple)):
        raise EvalError(f"caption: sample at index {index}: meta['references'] must be a list of captions, got "
                        f"{type(refs).__name__}")
    for j, ref in enumerate(refs):
        if not isinstance(ref, str):
            raise EvalError(f"caption: sample at index {index}: meta['references'][{j}] is {type(ref).__name__}, "
                            "expected str")
    kept = [r for r in refs if has_content(r)]
    if not kept:
        raise EvalError(f"caption: sample at index {index} has no non-empty reference caption")
    return kept


# Every character Python or the Java tokenizer may treat as a line end; the tokenizer reads one caption per line.
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]")
_END_KEY, _END_MARK = "__end__", "endofcaptions"


def ptb_tokenize(captions: Mapping[Any, list[str]]) -> dict[Any, list[str]]:
    """pycocoevalcap's PTBTokenizer on ``{key: [caption, ...]}``, in the form COCOEvalCap hands it over
    (``{key: [{"caption": text}]}``); returns ``{key: [tokenised caption, ...]}``.

    The tokenizer pairs its output lines with the captions by position, so one caption read as two lines would shift
    every later caption onto the wrong sample. Line breaks are made spaces first, and a known last caption checks
    the pairing afterwards.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    request: dict[Any, list[dict[str, str]]] = {
        key: [{"caption": _LINE_BREAKS.sub(" ", caption)} for caption in caps] for key, caps in captions.items()
    }
    request[_END_KEY] = [{"caption": _END_MARK}]
    tokens = PTBTokenizer().tokenize(request)
    if tokens.pop(_END_KEY, None) != [_END_MARK] or any(len(tokens.get(k, ())) != len(v) for k, v in captions.items()):
        raise EvalError("caption: pycocoevalcap's PTBTokenizer (java) returned lines out of step with the captions "
                        "sent; check that java runs (`java -version`) and that the pycocoevalcap install is complete")
    return tokens


_METEOR: list[Any] = []
"""The process's METEOR scorer, started on first use and kept: loading METEOR's paraphrase tables takes ~7 s of
java start-up, which every caption task of every evaluation row would otherwise pay again. Its scores depend only on
the captions sent (each EVAL request is scored alone), so reusing it changes no number."""


def _meteor_score(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    if not _METEOR or _METEOR[0].meteor_p.poll() is not None:  # first use, or the java process died
        _METEOR[:] = [Meteor()]
        atexit.register(_close_meteor)
    try:
        score, _ = _METEOR[0].compute_score(gts, res)
    except (OSError, ValueError) as exc:  # a broken pipe or an empty line: the java process is gone
        _close_meteor()
        raise EvalError(f"caption: METEOR's java process failed ({type(exc).__name__}: {exc}); run again, or set "
                        f"scorer_options: {{meteor: false}} to leave METEOR out of the mean") from exc
    return float(score)


def _close_meteor() -> None:
    if _METEOR:
        process = _METEOR.pop().meteor_p
        with contextlib.suppress(OSError):
            process.stdin.close()
        process.kill()
        process.wait()


VQA_MIN_ANSWERS = 4
"""Fewer human answers cannot reach accuracy 1: with n answers all equal to the prediction, each leave-one-out subset
holds n - 1 matches, and min(1, matches / 3) needs 3."""


@register_scorer("vqa")
@dataclass
class VQAAccuracy(Scorer):
    """VQA accuracy (VQAv2, TextVQA, VizWiz): a prediction is right as far as enough humans gave the same answer.

    The human answers (usually 10) come from ``meta["references"]``. The prediction and every human answer go through
    `normalize_vqa_answer`; with the answers taken ten times, each leaving one out, the accuracy is the mean over
    those subsets of min(1, matches among the remaining answers / 3). Task score = 100 * mean accuracy. The single
    `answer` of a sample is never used: scoring against it alone would be a different metric.
    """

    name: ClassVar[str] = "vqa"
    reference_is_answer: ClassVar[bool] = False

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        scores, counts = [], []
        for i, (pred, meta) in enumerate(zip(predictions, metas)):
            answers = vqa_human_answers(i, meta)
            counts.append(len(answers))
            scores.append(vqa_accuracy(pred, answers))
        return _mean_result(scores, answers_per_question={"min": min(counts), "max": max(counts)})


def vqa_human_answers(index: int, meta: Mapping[str, Any]) -> list[str]:
    """The normalised human answers of one question, from ``meta["references"]``; errors name the sample."""
    answers = meta.get("references")
    if not isinstance(answers, (list, tuple)):
        got = "none" if answers is None else f"a {type(answers).__name__}"
        raise EvalError(f"vqa: sample {index} has no list of human answers in meta['references'] (got {got}); vqa "
                        "scoring needs the human answers of every question (e.g. the 10 'answers' of the official "
                        "annotation file) -- give them as the sample's answer list, or use exact_match")
    for j, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise EvalError(f"vqa: sample {index}: meta['references'][{j}] is {type(answer).__name__}, expected str")
    if len(answers) < VQA_MIN_ANSWERS:
        raise EvalError(f"vqa: sample {index} has {len(answers)} human answer(s) in meta['references']; VQA accuracy "
                        f"needs at least {VQA_MIN_ANSWERS} (usually 10) to reach 1 -- give all the human answers, or "
                        "use exact_match")
    normalised = [normalize_vqa_answer(a) for a in answers]
    if not any(has_content(a) for a in normalised):
        raise EvalError(f"vqa: the test file has no answer for sample {index} (every human answer in "
                        f"meta['references'] is empty after normalisation: {list(answers)!r})")
    return normalised


def vqa_accuracy(prediction: str, normalised_answers: Sequence[str]) -> float:
    """Leave-one-out VQA accuracy of one prediction against normalised human answers; 0 for an empty prediction."""
    pred = normalize_vqa_answer(prediction)
    if not has_content(pred):
        return 0.0
    hits = [answer == pred for answer in normalised_answers]
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(hits)


def align_by_id(
    predictions: Mapping[str, str], references: Mapping[str, str]
) -> tuple[list[str], list[str], list[str]]:
    """(ids, predictions, references) aligned in the references' order; missing or extra ids are an error.

    Silent misalignment shifts every later caption onto the wrong image, so nothing is dropped quietly.
    """
    missing = [i for i in references if i not in predictions]
    extra = [i for i in predictions if i not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} reference id(s) without a prediction: {_preview(missing)}")
        if extra:
            parts.append(f"{len(extra)} prediction id(s) without a reference: {_preview(extra)}")
        raise EvalError("predictions and references do not line up: " + "; ".join(parts))
    ids = list(references)
    return ids, [predictions[i] for i in ids], [references[i] for i in ids]


def _preview(ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


@register_scorer("scene_attributes")
@dataclass
class SceneAttributes(Scorer):
    """Attribute accuracy of a scene description (the tiny base's pretraining bar): for every reference object, its
    size, colour and shape at its position each count one point, the rendered word one more, the stated object count
    one more; a prediction naming an object where there is none costs one point. Per-sample score = points won / points
    available; `exact_match` in details = % of descriptions right in every part."""

    name: ClassVar[str] = "scene_attributes"

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        per_sample, exact = [], 0
        for pred, ref in zip(predictions, references):
            p_obj, p_word, p_count = parse_scene(pred)
            r_obj, r_word, r_count = parse_scene(ref)
            won = sum(a == b for where, attrs in r_obj.items() for a, b in zip(attrs, p_obj.get(where, ("",) * 3)))
            total = 3 * len(r_obj) + len(set(p_obj) - set(r_obj))
            if r_word is not None or p_word is not None:
                total += 1
                won += int(r_word == p_word)
            if r_count is not None:
                total += 1
                won += int(r_count == p_count)
            per_sample.append(won / total if total else 1.0)
            exact += int(p_obj == r_obj and p_word == r_word and p_count == r_count)
        return _mean_result(per_sample, exact_match=100.0 * exact / len(predictions))
