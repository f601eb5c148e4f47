"""Answer signatures: the form a task's answers take, learnt from its training answers.

A card's declared `answer_style` is too coarse to tell superficial from essential forgetting (SEFE, Chen et al.,
ICML 2025). For a "word" task without a candidate list, "yes", "3" and "a red circle" all look like words, so a yes/no
or number style taking over a class-name task would count as essential forgetting; and "caption" cannot tell a brief
caption from a detailed one. A signature records what the task's own answers look like -- which answer types occur
(`answer_type`) and how many words they have -- so the format check can ask "does this prediction look like this
task's answers?" instead of "is it some word?".

This module sits in the data layer (cards learn a signature when they load a task and store `to_dict()` in
``Sample.meta["signature"]``), so it cannot import `mcit.evaluation`. Its small type classifier mirrors the rules of
`mcit.evaluation.extract` (whole-answer number, the three option-letter patterns, yes/no as the first word);
tests/evaluation/test_formats.py checks that the two agree on a shared set of answers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mcit.errors import DataError

ANSWER_TYPES = ("empty", "yesno", "number", "letter", "box", "phrase", "sentence")
"""What `answer_type` returns. "empty" never belongs to a signature: an empty prediction is never in format."""

DEFAULT_MIN_SHARE = 0.02
"""A type is allowed when at least this share of the training answers has it. Low enough that VQAv2 (about 38 %
yes/no, 12 % numbers, the rest short phrases) allows all three, high enough that a handful of stray or noisy
annotations (a "yes" among ImageNet-R class names) does not open the door to a whole style."""

PHRASE_MAX_WORDS = 6
"""Longest phrase; more words make a sentence. Short-answer sets (VQAv2, GQA, class names) answer in 1-3 words,
OCR-VQA titles reach 5-6, while captions are longer: COCO's annotators were asked for at least 8 words and Flickr30k
captions average about 12. Six sits in the gap. Only the word count decides, not a final full stop: models add a
period to short answers ("Golden retriever.") as readily as they drop it from captions."""

BAND_QUANTILES = (0.02, 0.98)
"""The length band spans these quantiles of the training answers' word counts, so a few outliers (a one-word caption,
a rambling annotation) do not stretch it."""

_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ("thousand", "million", "billion")
# The whole answer is one number: "3", "-2.5", "1,000", "3/4" (as `extract.parse_single_number` reads it).
_DIGIT_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")
# Four numbers and nothing else but brackets and separators (as `formats._is_box` requires).
_BOX_ONLY = re.compile(r"^[\s\[\]()]*(?:-?\d+(?:\.\d+)?(?:[eE]-?\d+)?[\s,;\[\]()]*){4}$")
_BOX_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE]-?\d+)?")  # the pattern alone also splits "1000" into four
# The three option-letter patterns of `extract.extract_letter`: "B", "(B)", "B."; "B. circle", "(B) circle";
# "The answer is B", "option C".
_BARE_LETTER = re.compile(r"^[(\[]?([A-Za-z])[)\]]?[.:]?$")
_PREFIX_LETTER = re.compile(r"^(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.):])\s+\S")
_PHRASE_LETTER = re.compile(
    r"\b(?i:answer|option|choice)\s*(?i:is\s*)?(?i:option\s*)?[:\-]?\s*[(\[]?(?:([A-Z])(?![A-Za-z])|([a-z])(?=[)\].,;:!?]|\s*$))"
)
_WORD = re.compile(r"[^\W_]")  # a token counts as a word when it holds a letter or digit
_FIRST_WORD = re.compile(r"[^\W_]+")


def count_words(text: str) -> int:
    """Whitespace-separated tokens holding at least one letter or digit ("Yes, there is." -> 3, "(B)" -> 1)."""
    return sum(1 for token in text.split() if _WORD.search(token))


def _is_number(text: str) -> bool:
    text = text.strip().rstrip(". ").lower()
    if _DIGIT_NUMBER.fullmatch(text):
        return True
    # Number words read as one number, by the normaliser's grammar: "three", "twenty-one", "three hundred and five";
    # "one two" (two numbers), "hundred" alone and "three and four" are not one number.
    previous = ""
    for word in (w for w in re.split(r"[\s-]+", text) if w):
        if word in _UNITS:
            ok = previous in ("", "hundred", "scale", "and") or (previous == "tens" and word in _UNITS[1:10])
            ok, previous = ok and (word != "zero" or previous == ""), "unit"
        elif word in _TENS:
            ok, previous = previous in ("", "hundred", "scale", "and"), "tens"
        elif word == "hundred":
            ok, previous = previous == "unit", "hundred"
        elif word in _SCALES:
            ok, previous = previous in ("unit", "tens", "hundred"), "scale"
        elif word == "and":
            ok, previous = previous in ("hundred", "scale"), "and"
        else:
            return False
        if not ok:
            return False
    return previous not in ("", "and")


def _is_letter(text: str) -> bool:
    if _BARE_LETTER.match(text) or _PREFIX_LETTER.search(text):
        return True
    return _PHRASE_LETTER.search(text) is not None


def answer_type(text: str) -> str:
    """The type of one answer, one of `ANSWER_TYPES`.

    Checked in this order: "empty" (no letter or digit); "box" (four numbers and nothing else); "number" (the whole
    answer is one number, digits or words); then, for answers of at most `PHRASE_MAX_WORDS` words, "letter" (an
    option letter: "B", "(B)", "B. red", "The answer is B") and "yesno" (the first word is yes or no: "No.", "Yes,
    there is."); otherwise "phrase" (1-6 words) or "sentence" (more). A long answer that opens with "Yes," or "B."
    is a sentence: its length, not its first word, is what a task trained on one-word answers would not produce.
    """
    if not isinstance(text, str):
        raise DataError(f"answer_type: answer is {type(text).__name__}, expected str")
    words = count_words(text)
    if words == 0:
        return "empty"
    stripped = text.strip()
    if _BOX_ONLY.match(stripped) and len(_BOX_NUMBER.findall(stripped)) == 4:
        return "box"
    if _is_number(stripped):
        return "number"
    if words > PHRASE_MAX_WORDS:
        return "sentence"
    if _is_letter(stripped):
        return "letter"
    first = _FIRST_WORD.search(stripped)
    if first is not None and first.group(0).lower() in ("yes", "no"):
        return "yesno"
    return "phrase"


def _quantile(sorted_counts: Sequence[int], q: float, *, upper: bool) -> int:
    """Nearest-rank quantile: rounded outwards, so a small sample's band is its full range."""
    position = q * (len(sorted_counts) - 1)
    return sorted_counts[math.ceil(position) if upper else math.floor(position)]


@dataclass(frozen=True)
class AnswerSignature:
    """What a task's answers look like: the share of each answer type and the band of word counts.

    `matches` accepts a prediction whose type is allowed (share >= `min_share`) and whose word count lies in the
    length band widened to ``[low / 2, 2 * high + 2]``. The tolerance is wide on purpose: ordinary variation inside
    one style stays in (a 5-word answer where class names have 1-3 words, a 30-word brief caption), while a change of
    style does not: brief captions (8-15 words, band up to 32) reject a detailed ~50-word answer, detailed captions
    (45-60 words, band from 22.5) reject a 10-20 word brief answer. The "+ 2" keeps one-word tasks (yes/no, letters,
    band [1, 1]) open to "Yes, there is." and "B. red".
    """

    shares: Mapping[str, float]
    """Share of each non-empty type among the non-empty training answers (every type of `ANSWER_TYPES` but
    "empty", 0.0 when absent)."""
    length_band: tuple[int, int]
    """(low, high): the `BAND_QUANTILES` of the training answers' word counts."""
    n: int
    """Number of non-empty training answers the signature was learnt from."""
    min_share: float = DEFAULT_MIN_SHARE
    allowed: frozenset[str] = field(init=False, compare=False)
    """Types with share >= `min_share`, derived from `shares` (never stored separately, so the two cannot
    disagree)."""

    def __post_init__(self) -> None:
        shares = {kind: float(self.shares.get(kind, 0.0)) for kind in ANSWER_TYPES[1:]}
        unknown = sorted(set(self.shares) - set(shares))
        if unknown:
            raise DataError(f"AnswerSignature: unknown answer types {unknown} in shares; valid: {ANSWER_TYPES[1:]}")
        if any(not 0.0 <= s <= 1.0 for s in shares.values()):
            raise DataError(f"AnswerSignature: shares must lie in [0, 1], got {shares}")
        if not 0.0 < self.min_share <= 1.0:
            raise DataError(f"AnswerSignature: min_share must lie in (0, 1], got {self.min_share}")
        if self.n < 1:
            raise DataError(f"AnswerSignature: n must be >= 1 (training answers), got {self.n}")
        low, high = self.length_band
        if not 1 <= low <= high:
            raise DataError(f"AnswerSignature: length_band must be (low, high) with 1 <= low <= high, got {low, high}")
        allowed = frozenset(kind for kind, share in shares.items() if share >= self.min_share)
        if not allowed:
            raise DataError(f"AnswerSignature: no answer type reaches min_share={self.min_share} in {shares}")
        object.__setattr__(self, "shares", MappingProxyType(shares))
        object.__setattr__(self, "length_band", (int(low), int(high)))
        object.__setattr__(self, "allowed", allowed)

    def __hash__(self) -> int:
        return hash((tuple(self.shares.items()), self.length_band, self.n, self.min_share))

    @classmethod
    def learn(cls, answers: Sequence[str], *, min_share: float = DEFAULT_MIN_SHARE) -> AnswerSignature:
        """The signature of a task's training answers; empty answers are ignored.

        Shares are rounded to 6 decimals so that the object `from_dict(to_dict())` rebuilds is equal to this one.
        """
        if isinstance(answers, str):
            raise DataError("AnswerSignature.learn: answers must be a sequence of strings, got one string")
        bad = [type(a).__name__ for a in answers if not isinstance(a, str)]
        if bad:
            raise DataError(f"AnswerSignature.learn: answers must be strings, got {bad[0]}")
        kinds, counts = [], []
        for answer in answers:
            kind = answer_type(answer)
            if kind != "empty":
                kinds.append(kind)
                counts.append(count_words(answer))
        if not kinds:
            raise DataError(
                f"AnswerSignature.learn: none of the {len(answers)} training answers is non-empty; a signature "
                "needs at least one answer (check the card's answer field)"
            )
        shares = {kind: round(kinds.count(kind) / len(kinds), 6) for kind in ANSWER_TYPES[1:]}
        counts.sort()
        band = (_quantile(counts, BAND_QUANTILES[0], upper=False), _quantile(counts, BAND_QUANTILES[1], upper=True))
        return cls(shares=shares, length_band=band, n=len(kinds), min_share=min_share)

    def in_band(self, words: int) -> bool:
        """Whether a word count lies in the length band widened by the tolerance (see the class docstring)."""
        low, high = self.length_band
        return low / 2 <= words <= 2 * high + 2

    def matches(self, prediction: str) -> bool:
        """Whether ``prediction`` looks like this task's answers: an allowed type and a word count in the band."""
        return answer_type(prediction) in self.allowed and self.in_band(count_words(prediction))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form, stored in ``Sample.meta["signature"]``; the inverse of `from_dict`."""
        return {
            "shares": dict(self.shares),
            "length_band": list(self.length_band),
            "n": self.n,
            "min_share": self.min_share,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnswerSignature:
        """Rebuild a signature from `to_dict`'s output; a `DataError` names the missing or malformed key."""
        where = "Sample.meta['signature']"
        if not isinstance(data, Mapping):
            raise DataError(f"{where} must be a mapping from AnswerSignature.to_dict(), got {type(data).__name__}")
        missing = [key for key in ("shares", "length_band", "n") if key not in data]
        if missing:
            raise DataError(f"{where} lacks {missing}; expected the keys shares, length_band, n (and min_share)")
        shares, band, n = data["shares"], data["length_band"], data["n"]
        min_share = data.get("min_share", DEFAULT_MIN_SHARE)
        if not isinstance(shares, Mapping) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in shares.values()
        ):
            raise DataError(f"{where}['shares'] must map answer types to numbers, got {shares!r}")
        if (
            not isinstance(band, (list, tuple))
            or len(band) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in band)
        ):
            raise DataError(f"{where}['length_band'] must be [low, high] word counts, got {band!r}")
        if not isinstance(n, int) or isinstance(n, bool):
            raise DataError(f"{where}['n'] must be an integer, got {n!r}")
        if not isinstance(min_share, (int, float)) or isinstance(min_share, bool):
            raise DataError(f"{where}['min_share'] must be a number, got {min_share!r}")
        return cls(shares=dict(shares), length_band=(band[0], band[1]), n=n, min_share=float(min_share))
