"""Answer extraction: read the number, option letter, yes/no or box a free-form answer names.

The scorers compare what these functions read, and the format checks (`mcit.evaluation.formats`) use the same
functions, so "in format" and "readable by the scorer" agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mcit.errors import EvalError
from mcit.evaluation.normalize import Normalizer, numbers_as_digits

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?(?![\w])")


def _number_value(token: str) -> float | None:
    if "/" not in token:
        return float(token)
    num, den = (float(part) for part in token.split("/"))
    return num / den if den != 0 else None


def find_numbers(text: str) -> list[float]:
    """All numbers in a text, number words and simple fractions ("3/4") included, in order of appearance."""
    text = numbers_as_digits(text)
    values = (_number_value(m.group(0)) for m in _NUMBER.finditer(text))
    return [v for v in values if v is not None]


def parse_single_number(text: str) -> float | None:
    """The number a text consists of ("3", "3.", "three", "-2.5", "1,000", "3/4"), or None if it is anything else."""
    text = numbers_as_digits(text.strip().rstrip(". "))
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
        # an empty answer names no option, even when an option's text is empty too
        matches = [valid[i] for i, choice in enumerate(_choices(meta)[: len(valid)])
                   if wanted and norm(str(choice)) == wanted]
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
