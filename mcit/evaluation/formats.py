"""Answer-format checks: does a prediction have the form its task expects?

SEFE splits forgetting in two. *Superficial* forgetting: the answer lost the task's form (a later task's style took
over, e.g. a caption where a letter was due). *Essential* forgetting: the form is right, the content wrong. A wrong
prediction is labelled by `label_prediction`; the runner turns the labels into the `superficial` and `essential`
matrices of results.json. The checks reuse the scorers' extractors (`mcit.evaluation.extract`) so "in format" and
"readable by the scorer" agree; where they differ the check is the stricter one (a sentence that merely contains "no"
is not yes/no format).

The declared style alone is too coarse: without a candidate list, "yes", "3" and "a red circle" are all "word"
answers, and "caption" cannot tell a brief caption from a detailed one, so a yes/no style taking over a class-name
task, or a detailed style taking over a brief one, would be counted as essential forgetting. When a task carries the
signature of its training answers (``meta["signature"]``, `mcit.data.signature.AnswerSignature.to_dict`), a
prediction must also match it: an answer type the task's own answers have, and a length in their band.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from mcit.data.records import ANSWER_STYLES
from mcit.data.signature import AnswerSignature
from mcit.errors import EvalError
from mcit.evaluation.extract import extract_letter, extract_yesno, parse_box, parse_single_number
from mcit.evaluation.normalize import Normalizer

_MAX_WORDS = 3  # a "word" answer is a short phrase: "red", "traffic light", "fire hydrant truck"
_MIN_CAPTION_WORDS = 4
_OCR_TOKEN = re.compile(r"^[A-Za-z0-9]{1,12}$")
_BOX_ONLY = re.compile(r"^[\s\[\]()]*(?:-?\d+(?:\.\d+)?(?:[eE]-?\d+)?[\s,;\[\]()]*){4}$")


def _is_word(prediction: str, meta: Mapping[str, Any]) -> bool:
    norm = Normalizer()
    words = norm(prediction).split()
    if not 1 <= len(words) <= _MAX_WORDS:
        return False
    candidates = meta.get("candidates")
    if candidates:
        return " ".join(words) in {norm(str(c)) for c in candidates}
    # Without candidates, an option letter ("B", "B. red") is the multiple-choice style taking over, not a word.
    return extract_letter(prediction, use_choice_text=False) is None


def _is_number(prediction: str, meta: Mapping[str, Any]) -> bool:
    # The whole answer must be the number: "3", "3.", "three", "-2.5" -- not "3 circles".
    return parse_single_number(prediction) is not None


def _is_letter(prediction: str, meta: Mapping[str, Any]) -> bool:
    # Option text alone ("circle") is content, not the letter form the task asks for.
    return extract_letter(prediction, meta, use_choice_text=False) is not None


def _is_yesno(prediction: str, meta: Mapping[str, Any]) -> bool:
    words = Normalizer()(prediction).split()
    return bool(words) and words[0] in ("yes", "no") and extract_yesno(prediction) is not None


def _is_caption(prediction: str, meta: Mapping[str, Any]) -> bool:
    if _is_letter(prediction, {}) or _is_number(prediction, meta) or _is_yesno(prediction, meta):
        return False
    return len(Normalizer(drop_articles=False)(prediction).split()) >= _MIN_CAPTION_WORDS


def _is_ocr(prediction: str, meta: Mapping[str, Any]) -> bool:
    return _OCR_TOKEN.match(prediction.strip().rstrip(".")) is not None


def _is_box(prediction: str, meta: Mapping[str, Any]) -> bool:
    return _BOX_ONLY.match(prediction) is not None and parse_box(prediction) is not None


def _is_free(prediction: str, meta: Mapping[str, Any]) -> bool:
    return bool(prediction.strip())


# One check per style of `ANSWER_STYLES` (tests/evaluation/test_formats.py runs each).
_CHECKS: dict[str, Callable[[str, Mapping[str, Any]], bool]] = {
    "word": _is_word,
    "number": _is_number,
    "letter": _is_letter,
    "yesno": _is_yesno,
    "caption": _is_caption,
    "ocr": _is_ocr,
    "box": _is_box,
    "free": _is_free,
}


@lru_cache(maxsize=256)
def _signature_from_json(key: str) -> AnswerSignature:
    return AnswerSignature.from_dict(json.loads(key))


def _signature(meta: Mapping[str, Any]) -> AnswerSignature | None:
    """The task's answer signature, when it has one and no candidate list (the candidates are the stronger check).

    Cached by the dict's canonical JSON text, not by id(): after a JSON round trip every sample of a task holds its
    own copy of the dict, and an id is reused once its dict is freed. Serialising a dict of ten numbers costs
    microseconds; rebuilding and validating the signature for each of a task's thousands of predictions would not.
    """
    data = meta.get("signature")
    if data is None or meta.get("candidates"):
        return None
    if not isinstance(data, Mapping):
        raise EvalError(f"meta['signature'] must be the dict of AnswerSignature.to_dict(), got {type(data).__name__}")
    try:
        key = json.dumps(data, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise EvalError(f"meta['signature'] is not plain JSON data ({exc}); store AnswerSignature.to_dict()") from exc
    return _signature_from_json(key)


def check_format(style: str, prediction: str, meta: Mapping[str, Any] | None = None) -> bool:
    """Whether ``prediction`` has the form of answer ``style`` (one of `mcit.data.records.ANSWER_STYLES`).

    word: 1-3 words after normalisation, and one of ``meta["candidates"]`` when given; number: exactly one number;
    letter: a valid option letter (A-D, or one per ``meta["choices"]``); yesno: starts with yes/no; caption: at least
    four words and not a bare letter/number/yes-no; ocr: one token of 1-12 letters/digits; box: four numbers and
    nothing else; free: non-empty. When ``meta["signature"]`` is present and ``meta["candidates"]`` is not, the
    prediction must also match the task's `AnswerSignature` (an answer type its training answers have, a length
    inside their band), so "yes" is not a word answer of a class-name task and a detailed answer is not a caption of
    a brief-caption task.
    """
    if style not in _CHECKS:
        raise EvalError(f"unknown answer style {style!r}; valid styles: {', '.join(ANSWER_STYLES)}")
    if not isinstance(prediction, str):
        raise EvalError(f"check_format: prediction is {type(prediction).__name__}, expected str")
    meta = meta or {}
    signature = _signature(meta)  # first, so a malformed signature fails on every prediction, not only some
    return _CHECKS[style](prediction, meta) and (signature is None or signature.matches(prediction))


def label_prediction(style: str, correct: bool, prediction: str, meta: Mapping[str, Any] | None = None) -> str:
    """ "correct", "wrong_format" (superficial forgetting) or "wrong_content" (essential forgetting)."""
    if style not in _CHECKS:
        raise EvalError(f"unknown answer style {style!r}; valid styles: {', '.join(ANSWER_STYLES)}")
    if correct:
        return "correct"
    return "wrong_content" if check_format(style, prediction, meta) else "wrong_format"
