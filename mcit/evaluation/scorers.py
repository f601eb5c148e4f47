"""Scorers selected by name from a data card (`scorer:` key), plus the text normalisation they share.

Every scorer is called as ``scorer(predictions, references, metas) -> ScoreResult`` on *aligned* lists: per-sample
scores in [0, 1], a task score in [0, 100] (caption CIDEr*100 is the exception: CIDEr ranges over [0, 10], so the
caption task score can exceed 100, as in the papers' tables) and a ``details`` dict with everything else worth
reporting. Callers holding id-keyed dicts use `align_by_id` first, so that a missing or extra id is an error with the
ids in it instead of a silent shift of every later sample (a crash users reported with the reference caption code).

Leniency is deliberate: strict exact match counted "3." against "3" and "Circle." against "circle" as wrong, which
measures formatting noise rather than knowledge. The `Normalizer` makes every such choice an explicit, switchable
option; `Normalizer.strict()` only strips surrounding whitespace.
"""

from __future__ import annotations

import math
import re
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from mcit.errors import EvalError

# --------------------------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------------------------

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_NUMBER_WORDS = [*_UNITS, *_TENS, "hundred", *_SCALES]
_WORD_ALT = "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True))
_NUMBER_WORD_RUN = re.compile(rf"\b(?:{_WORD_ALT})(?:(?:\s+|-)(?:and\s+)?(?:{_WORD_ALT}))*\b", re.IGNORECASE)

# Punctuation becomes a space, except the marks that belong to a number: a decimal point between digits and a minus
# sign that starts a number. Thousands separators are removed beforehand, apostrophes are dropped ("dog's" -> "dogs").
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_APOSTROPHE = re.compile(r"['\u2019`]")
_PUNCT = re.compile(r"(?<=\d)\.(?=\d)|(?<![\w.])-(?=\d)|([^\w\s]|_)")
_DECIMAL = re.compile(r"^(-?\d+)\.(\d+)$")
_ARTICLES = frozenset({"a", "an", "the"})


def _words_to_numbers(words: list[str]) -> list[str]:
    """Rewrite a run of number words as digit tokens ("twenty one" -> ["21"], "one two" -> ["1", "2"]).

    A word that cannot continue the current number starts a new one, so lists of small numbers stay separate; "and"
    continues a number only after a scale word ("three hundred and five" -> ["305"]); a word that cannot start a
    number ("hundred" alone) is kept as it is.
    """
    out: list[str] = []
    total, current, last, last_scale = 0, 0, "", math.inf
    pending_and = False

    def flush() -> None:
        nonlocal total, current, last, last_scale, pending_and
        if last:
            out.append(str(total + current))
        if pending_and:
            out.append("and")
        total, current, last, last_scale, pending_and = 0, 0, "", math.inf, False

    def extend(word: str) -> bool:
        """Add ``word`` to the number being read; False when it cannot continue it."""
        nonlocal total, current, last, last_scale
        if word in _UNITS:
            value = _UNITS[word]
            if not (last in ("", "hundred", "scale") or (last == "tens" and 1 <= value <= 9 and not pending_and)):
                return False
            if value == 0 and last:
                return False
            current, last = current + value, "unit" if value < 10 else "teen"
        elif word in _TENS:
            if last not in ("", "hundred", "scale"):
                return False
            current, last = current + _TENS[word], "tens"
        elif word == "hundred":
            if last not in ("unit", "teen") or not 0 < current < 100 or pending_and:
                return False
            current, last = current * 100, "hundred"
        else:
            scale = _SCALES[word]
            if last not in ("unit", "teen", "tens", "hundred") or current == 0 or scale >= last_scale or pending_and:
                return False
            total, current, last, last_scale = total + current * scale, 0, "scale", scale
        return True

    for raw in words:
        word = raw.lower()
        if word == "and":
            if last in ("hundred", "scale") and not pending_and:
                pending_and = True
            else:
                flush()
                out.append(raw)
            continue
        if extend(word):
            pending_and = False
            continue
        flush()
        if not extend(word):
            out.append(raw)
    flush()
    return out


def replace_number_words(text: str) -> str:
    """Rewrite number words as digits ("three" -> "3", "twenty-one" -> "21"); other text is untouched."""
    return _NUMBER_WORD_RUN.sub(lambda m: " ".join(_words_to_numbers(re.split(r"\s+|-", m.group(0)))), text)


@dataclass(frozen=True)
class Normalizer:
    """Text normalisation applied to prediction and reference before comparing them.

    The defaults are lenient on purpose (see the module docstring): "3." == "3", "Circle." == "circle",
    "three" == "3", "a circle" == "circle", "3.0" == "3".
    """

    lowercase: bool = True
    strip_punctuation: bool = True  # every mark except a number's decimal point / minus sign becomes a space
    drop_articles: bool = True  # "a", "an", "the" as whole words
    number_words: bool = True  # number words -> digits, so both spellings compare equal
    canonical_decimals: bool = True  # "3.50" -> "3.5", "3.0" -> "3" (integers keep leading zeros: OCR codes)
    strip_trailing_period: bool = True  # matters when strip_punctuation is off
    collapse_whitespace: bool = True

    @classmethod
    def strict(cls) -> Normalizer:
        """Only surrounding whitespace is removed: the strict exact match of the reference evaluations."""
        return cls(False, False, False, False, False, False, False)

    def __call__(self, text: str) -> str:
        text = text.strip()
        if self.lowercase:
            text = text.lower()
        if self.strip_trailing_period:
            text = text.rstrip(". \t\n")
        if self.strip_punctuation:
            text = _THOUSANDS.sub("", text)
            text = _APOSTROPHE.sub("", text)
            text = _PUNCT.sub(lambda m: " " if m.group(1) is not None else m.group(0), text)
        if self.number_words:
            text = replace_number_words(text)
        if not (self.collapse_whitespace or self.drop_articles or self.canonical_decimals):
            return text.strip()
        tokens = text.split()
        if self.drop_articles:
            tokens = [t for t in tokens if t.lower() not in _ARTICLES]
        if self.canonical_decimals:
            tokens = [_canonical_decimal(t) for t in tokens]
        return " ".join(tokens)


def _canonical_decimal(token: str) -> str:
    match = _DECIMAL.match(token)
    if not match:
        return token
    whole, frac = match.group(1), match.group(2).rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def tokenize_caption(text: str) -> str:
    """Caption tokenisation done in Python: lowercase, punctuation removed, whitespace collapsed.

    Replaces pycocoevalcap's PTBTokenizer, which spawns java; both sides of a comparison go through this function.
    """
    return Normalizer(drop_articles=False, number_words=False, canonical_decimals=False)(text)


# --------------------------------------------------------------------------------------------------------------------
# Answer extraction (shared with mcit.evaluation.formats)
# --------------------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?(?![\w])")


def _number_value(token: str) -> float | None:
    if "/" not in token:
        return float(token)
    num, den = (float(part) for part in token.split("/"))
    return num / den if den != 0 else None


def find_numbers(text: str) -> list[float]:
    """All numbers in a text, number words and simple fractions ("3/4") included, in order of appearance."""
    text = replace_number_words(_THOUSANDS.sub("", text))
    values = (_number_value(m.group(0)) for m in _NUMBER.finditer(text))
    return [v for v in values if v is not None]


def parse_single_number(text: str) -> float | None:
    """The number a text consists of ("3", "3.", "three", "-2.5", "1,000", "3/4"), or None if it is anything else."""
    text = replace_number_words(_THOUSANDS.sub("", text.strip().rstrip(". ")))
    match = _NUMBER.fullmatch(text)
    return _number_value(match.group(0)) if match else None


def _choices(meta: Mapping[str, Any] | None) -> list | None:
    choices = (meta or {}).get("choices")
    if choices is not None and not isinstance(choices, (list, tuple)):
        raise EvalError(f"meta['choices'] must be a list of option texts, got {type(choices).__name__}")
    return list(choices) if choices else None


def option_letters(meta: Mapping[str, Any] | None) -> str:
    """Valid option letters: one per entry of ``meta["choices"]``, else A-D."""
    choices = _choices(meta)
    count = len(choices) if choices else 4
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: max(1, min(count, 26))]


# "B", "(B)", "B.", "[b]" -- the whole answer is the letter.
_BARE_LETTER = re.compile(r"^[(\[]?([A-Za-z])[)\]]?[.:]?$")
# "B. circle", "(B) circle", "b) circle", "B: circle" -- a letter with a delimiter, then text.
_PREFIX_LETTER = re.compile(r"^(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.):])\s+\S")
# "The answer is B", "Answer: (B)", "option C" -- an upper-case letter may be followed by anything, a lower-case one
# only by the end or punctuation, so "the answer is a circle" does not read as option A.
_PHRASE_LETTER = re.compile(
    r"\b(?i:answer|option|choice)\s*(?i:is\s*)?(?i:option\s*)?[:\-]?\s*[(\[]?(?:([A-Z])(?![A-Za-z])|([a-z])(?=[)\].,;:!?]|\s*$))"
)


def extract_letter(text: str, meta: Mapping[str, Any] | None = None, use_choice_text: bool = True) -> str | None:
    """The option letter a multiple-choice answer names, upper-case, or None.

    Accepts "B", "(B)", "B. circle", "The answer is B" and, when ``meta["choices"]`` lists the option texts (A..
    order) and ``use_choice_text`` is on, the option text itself ("circle"). A letter outside the valid options
    (see `option_letters`) counts as no letter.
    """
    valid = option_letters(meta)
    text = text.strip()
    letter = None
    for pattern in (_BARE_LETTER, _PREFIX_LETTER, _PHRASE_LETTER):
        match = pattern.search(text)
        if match:
            letter = next(g for g in match.groups() if g).upper()
            break
    if letter is None and use_choice_text and _choices(meta):
        norm = Normalizer()
        wanted = norm(text)
        matches = [valid[i] for i, choice in enumerate(_choices(meta)[: len(valid)]) if norm(str(choice)) == wanted]
        letter = matches[0] if len(matches) == 1 else None
    return letter if letter is not None and letter in valid else None


def extract_yesno(text: str) -> str | None:
    """ "yes" or "no": the first word if it is one, else the only one of the two that occurs; None otherwise."""
    tokens = Normalizer()(text).split()
    if not tokens:
        return None
    if tokens[0] in ("yes", "no"):
        return tokens[0]
    found = {t for t in tokens if t in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


_BRACKETED = re.compile(r"[\[(]([^\[\]()]*)[\])]")
_BOX_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE]-?\d+)?")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """A box "[x1, y1, x2, y2]" (normalised or pixels, just numbers); None when absent or x2 < x1 or y2 < y1.

    The first bracketed group holding exactly four numbers wins; without one, the whole text must hold exactly four.
    """
    candidates = [m.group(1) for m in _BRACKETED.finditer(text)] + [text]
    for candidate in candidates:
        numbers = _BOX_NUMBER.findall(candidate)
        if len(numbers) == 4:
            x1, y1, x2, y2 = (float(n) for n in numbers)
            if x2 < x1 or y2 < y1:
                return None
            return x1, y1, x2, y2
    return None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when the union has no area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """Per-sample scores in [0, 1], the task score (0-100 scale) and extra numbers for the report."""

    per_sample: list[float]
    score: float
    details: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str, **preset: Any) -> Callable[[type[Scorer]], type[Scorer]]:
    """Register a scorer class under ``name``; ``preset`` options make a named variant (e.g. caption_mean)."""

    def decorate(cls: type[Scorer]) -> type[Scorer]:
        _REGISTRY[name] = lambda **options: cls(**{**preset, **options})
        _REGISTRY[name].scorer_class = cls  # type: ignore[attr-defined]
        return cls

    return decorate


def scorer_names() -> list[str]:
    return sorted(_REGISTRY)


def get_scorer(name: str, **options: Any) -> Scorer:
    """The scorer a data card names, configured with its options.

    Scorers holding a `Normalizer` also accept its fields directly (``lowercase=False``) or as a dict
    (``normalizer={"drop_articles": False}``), so data cards stay plain YAML.
    """
    if name not in _REGISTRY:
        raise EvalError(f"unknown scorer {name!r}; valid scorers: {', '.join(scorer_names())}")
    cls = _REGISTRY[name].scorer_class  # type: ignore[attr-defined]
    option_names = {f.name for f in fields(cls)}
    if "normalizer" in option_names:
        options = _fold_normalizer_options(options)
    unknown = sorted(set(options) - option_names)
    if unknown:
        valid = sorted(option_names | ({f.name for f in fields(Normalizer)} if "normalizer" in option_names else set()))
        raise EvalError(f"scorer {name!r} got unknown option(s) {unknown}; valid options: {valid}")
    _check_option_types(name, cls, options)
    return _REGISTRY[name](**options)


_OPTION_TYPES: dict[str, tuple[type, ...]] = {"bool": (bool,), "float": (int, float), "int": (int,), "str": (str,)}


def _check_option_types(owner: str, cls: type, options: Mapping[str, Any]) -> None:
    """A scalar option of the wrong type is an error naming it (``meteor: "yes"`` would otherwise be truthy)."""
    declared = {f.name: f.type for f in fields(cls)}
    for key, value in options.items():
        allowed = _OPTION_TYPES.get(str(declared.get(key)))
        if allowed is None:
            continue
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            raise EvalError(f"scorer {owner!r}: option {key!r} must be {declared[key]}, got {value!r}")


def _fold_normalizer_options(options: dict[str, Any]) -> dict[str, Any]:
    norm_fields = {f.name for f in fields(Normalizer)}
    base = options.pop("normalizer", None)
    if isinstance(base, Mapping):
        bad = sorted(set(base) - norm_fields)
        if bad:
            raise EvalError(f"unknown normalizer option(s) {bad}; valid: {sorted(norm_fields)}")
        _check_option_types("normalizer", Normalizer, base)
        base = Normalizer(**base)
    elif base == "strict":
        base = Normalizer.strict()
    elif base is not None and not isinstance(base, Normalizer):
        raise EvalError(f"normalizer must be a Normalizer, a dict of its options or 'strict', got {base!r}")
    flat = {k: options.pop(k) for k in list(options) if k in norm_fields}
    _check_option_types("normalizer", Normalizer, flat)
    if base is None and not flat:
        return options
    return {**options, "normalizer": replace(base or Normalizer(), **flat)}


@dataclass
class Scorer:
    """Base class: checks the inputs line up, then `score_aligned` does the scorer's work."""

    name: ClassVar[str] = "scorer"

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
        return self.score_aligned(predictions, references, [m or {} for m in metas])

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        raise NotImplementedError


def _mean_result(per_sample: list[float], **details: Any) -> ScoreResult:
    return ScoreResult(per_sample, 100.0 * sum(per_sample) / len(per_sample), {"n": len(per_sample), **details})


@register_scorer("exact_match")
@dataclass
class ExactMatch(Scorer):
    """Equality after normalisation (case-insensitive exact match in the reference evaluations, made lenient)."""

    name: ClassVar[str] = "exact_match"
    normalizer: Normalizer = field(default_factory=Normalizer)

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        norm = self.normalizer
        return _mean_result([float(norm(p) == norm(r)) for p, r in zip(predictions, references)])


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
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            ref = " ".join(ref.split())
            if not ref:
                raise EvalError(f"contains: reference at index {i} is empty; it would match every prediction")
            pattern = r"(?<!\w)" + re.escape(ref).replace(r"\ ", r"\s+") + r"(?!\w)"
            scores.append(float(re.search(pattern, pred, re.IGNORECASE) is not None))
        return _mean_result(scores)


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


@register_scorer("caption", report="CIDEr")
@register_scorer("caption_mean", report="mean")
@dataclass
class Caption(Scorer):
    """pycocoevalcap's Bleu 1-4, ROUGE-L, CIDEr (and METEOR when allowed), on `tokenize_caption` tokens.

    Several reference captions per sample come from ``meta["references"]`` (a list); otherwise the reference string
    is the only one. ``details`` holds every metric *100 and ``mean``, the mean of all computed metrics *100 -- the
    number the UCIT tables report (they include METEOR; without java it is the mean of the other six). ``report``
    chooses the task score: "CIDEr" (default) or "mean". Per-sample scores are per-image CIDEr clipped to [0, 1].
    CIDEr's idf comes from the scored set itself, so one caption alone always gets CIDEr 0.
    METEOR spawns a java process (-Xmx2G) per call, so it is off unless ``meteor=True`` and java is on PATH.
    """

    name: ClassVar[str] = "caption"
    report: str = "CIDEr"
    meteor: bool = False

    def __post_init__(self) -> None:
        if self.report != "mean" and self.report not in CAPTION_METRICS:
            raise EvalError(f"caption: report must be 'mean' or one of {list(CAPTION_METRICS)}, got {self.report!r}")

    def score_aligned(self, predictions: list[str], references: list[str], metas: list[dict]) -> ScoreResult:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        res = {str(i): [tokenize_caption(p)] for i, p in enumerate(predictions)}
        gts = {str(i): caption_references(i, r, m) for i, (r, m) in enumerate(zip(references, metas))}
        metrics: dict[str, float] = {}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        metrics.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
        if self._meteor_available():
            metrics["METEOR"] = _meteor_score(gts, res)
        metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        cider, per_image = Cider().compute_score(gts, res)
        metrics["CIDEr"] = float(cider)
        details: dict[str, Any] = {k: 100.0 * v for k, v in metrics.items()}
        details["mean"] = sum(details.values()) / len(metrics)
        details["n"] = len(predictions)
        if self.report not in details:
            raise EvalError("caption: report='METEOR' needs meteor=True and java on PATH")
        per_sample = [min(1.0, max(0.0, float(c))) for c in per_image]
        return ScoreResult(per_sample, details[self.report], details)

    def _meteor_available(self) -> bool:
        if self.meteor and shutil.which("java") is None:
            warnings.warn("caption: meteor=True but java is not on PATH; METEOR skipped", stacklevel=3)
            return False
        return self.meteor


def caption_references(index: int, reference: str, meta: Mapping[str, Any]) -> list[str]:
    """Tokenised reference captions of one sample: ``meta["references"]`` when given, else the reference string."""
    refs = meta.get("references")
    if refs is None:
        refs = [reference]
    elif isinstance(refs, str):
        refs = [refs]
    elif not isinstance(refs, (list, tuple)):
        raise EvalError(f"caption: sample at index {index}: meta['references'] must be a list of captions, got "
                        f"{type(refs).__name__}")
    tokenised = [tokenize_caption(r) for r in refs if isinstance(r, str)]
    tokenised = [t for t in tokenised if t]
    if not tokenised:
        raise EvalError(f"caption: sample at index {index} has no non-empty reference caption")
    return tokenised


def _meteor_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    finally:
        del meteor  # closes the java process now rather than at interpreter exit
    return float(score)


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


_SCENE_OBJECT = re.compile(r"^(small|large) (\w+) (\w+) at ([\w ]+)$")


_SCENE_COUNT = re.compile(r"^(\w+) objects?$")


def parse_scene(text: str) -> tuple[dict[str, tuple[str, str, str]], str | None, str | None]:
    """Parse a SynthCIT scene description ("scene: two objects; small red circle at top left; ...; text pen") into
    {position: (size, colour, shape)}, the rendered word and the stated object count. Unparseable parts are ignored."""
    body = text.strip()
    body = body[len("scene:"):] if body.startswith("scene:") else body
    objects, word, count = {}, None, None
    for part in body.split(";"):
        part = part.strip()
        if part.startswith("text "):
            word = part[5:].strip()
            continue
        match = _SCENE_OBJECT.match(part)
        if match:
            size, color, shape, where = match.groups()
            objects.setdefault(where.strip(), (size, color, shape))
            continue
        match = _SCENE_COUNT.match(part)
        if match and count is None:
            count = match.group(1)
    return objects, word, count


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
