"""Answer normalisation: the text both prediction and reference go through before a scorer compares them.

Leniency is deliberate: strict exact match counted "3." against "3" and "Circle." against "circle" as wrong, which
measures formatting noise rather than knowledge. The `Normalizer` makes every such choice an explicit, switchable
option; `Normalizer.strict()` only strips surrounding whitespace.

Leniency never erases an answer: an article is dropped only beside other words, so the letter answer "A" stays "a"
and no longer equals "", "." or "the" (it did when articles were dropped everywhere, which let empty answers score
on letter tasks). `normalize_vqa_answer` is the VQA benchmarks' own normalisation, kept separate because the papers'
VQA accuracy is defined on it.
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
    drop_articles: bool = True  # "a", "an", "the" as whole words, only when other words remain
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
            tokens = _drop_articles(tokens)
        if self.canonical_decimals:
            tokens = [_canonical_decimal(t) for t in tokens]
        return " ".join(tokens)


def _canonical_decimal(token: str) -> str:
    match = _DECIMAL.match(token)
    if not match:
        return token
    whole, frac = match.group(1), match.group(2).rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def _drop_articles(tokens: list[str]) -> list[str]:
    """The tokens without "a", "an", "the" -- unless nothing else is left: an answer that *is* an article (option
    letter "A", the word "the") must stay, or it would equal the empty answer."""
    kept = [t for t in tokens if t.lower() not in _ARTICLES]
    return kept if kept else tokens


def has_content(text: str) -> bool:
    """Whether a text holds a letter or digit: whitespace and punctuation alone are no answer (such a prediction never
    scores, such a reference is an error)."""
    return any(ch.isalnum() for ch in text)


# --- VQA answer normalisation -----------------------------------------------------------------------------------
# The rules of the official VQA evaluation (VQAEval.processPunctuation / processDigitArticle), written from its
# description; the tables are its facts. Marks it handles; "." and "'" are not among them (see below and the
# contractions).
_VQA_MARKS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_VQA_DIGIT_COMMA = re.compile(r"\d,\d")
# The reference pattern meant "a period not next to a digit", but its look-behind is mistyped as a look-ahead, so in
# effect a period is removed unless a digit follows it ("3." -> "3", "2.5" and ".5" stay). Published numbers used
# that effect, so it is kept.
_VQA_PERIOD = re.compile(r"\.(?!\d)")
_VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
# Apostrophe-less spellings and their fixes. The reference table also lists keys with capitals ("Im", "Ive"), which
# never match because answers are lower-cased first, and a few identities; those are left out, the effect is the same.
_VQA_CONTRACTIONS = dict(pair.split("=") for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
    didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
    havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's isnt=isn't
    itd=it'd itd've=it'd've it'dve=it'd've itll=it'll maam=ma'am mightnt=mightn't mightnt've=mightn't've
    mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
    oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've
    she'dve=she'd've shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
    somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
    somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
    someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've
    somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're
    theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
    twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
    whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
    whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's
    wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all
    yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
    youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())


def normalize_vqa_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it: "Two" -> "2", "the dog." -> "dog", "dont" -> "don't".

    1. newlines and tabs become spaces, the ends are stripped;
    2. each mark of `_VQA_MARKS` is deleted where the text has it next to a space or holds a comma between digits
       ("1,000" -> "1000"), and becomes a space otherwise ("black/white" -> "black white");
    3. a period is removed unless a digit follows it;
    4. lower-cased words; number words zero..ten (and "none") become digits, articles are dropped, apostrophe-less
       contractions get their apostrophe.

    One deviation: articles are dropped only when other words remain (the `Normalizer` rule), so the answer "a" (a
    letter on a sign) stays "a" instead of matching "the" and the empty answer.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    delete_marks = _VQA_DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _VQA_MARKS:
        gone = delete_marks or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if gone else " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_VQA_NUMBERS.get(word, word) for word in out.lower().split()]
    words = _drop_articles(words)
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words)
