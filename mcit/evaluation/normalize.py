"""Answer normalisation: the text both prediction and reference go through before a scorer compares them.

Leniency is deliberate: strict exact match counted "3." against "3" and "Circle." against "circle" as wrong, which
measures formatting noise rather than knowledge. The `Normalizer` makes every such choice an explicit, switchable
option; `Normalizer.strict()` only strips surrounding whitespace.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

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


def numbers_as_digits(text: str) -> str:
    """Thousands separators dropped and number words as digits ("1,000" -> "1000", "three" -> "3"): the form the
    number extractors read."""
    return replace_number_words(_THOUSANDS.sub("", text))


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
