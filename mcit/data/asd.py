"""Answer Style Diversification (ASD), the data half of SEFE (Chen et al., 2025).

Why: sequential tasks with different answer forms teach the model "answer in the latest task's form", which shows up
as superficial forgetting. ASD converts a fraction of every task's training samples into a shared set of answer
styles — yes/no, multiple choice, brief (~20 words), detailed (~50 words) — so every task carries the same style mix
and a later task no longer overwrites the form of earlier ones.

Deviations from the paper: the paper converted data with an LLM and released only the converted files. Here yes/no
and multiple choice are built from templates with distractors drawn from an answer pool (the task's own training
answers by default, or the sample's other options for multiple-choice data). Brief and detailed answers come from
`meta["brief"]` / `meta["detailed"]` when a sample has them (SynthCIT), else from the rewriter the recipe names in
`benchmark.asd.rewriter` (`build_rewriter`):
- `meta`: nothing else; samples without the texts keep their original style (skipped and counted). On real data
  (UCIT) this converts only about half of the asked fraction, since brief and detailed are half of the styles.
- `template` (`TemplateRewriter`): answers built from the sample's own question and answer, so every asked
  conversion happens; they restate, never add knowledge (the paper's LLM could add explanations; this cannot).
- a local causal-LM folder (`LLMRewriter`): the paper's approach, generated once per run and cached.
Only single-turn samples are converted.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mcit.config import ASDConfig
from mcit.data.records import IMAGE_PREFIX, Sample
from mcit.errors import DataError, RecipeError
from mcit.runtime import dist
from mcit.schema import suggest

logger = logging.getLogger(__name__)

ASD_STYLES = ("yesno", "mc", "brief", "detailed")
TEXT_STYLES = ("brief", "detailed")
LETTERS = "ABCD"

# A task already in one of the ASD styles is never converted into it (that would not diversify anything).
OWN_STYLE = {"yesno": "yesno", "letter": "mc"}
# The answer style (cards' vocabulary) a converted sample has, so format checks and scorers know what to expect.
RESULT_STYLE = {"yesno": "yesno", "mc": "letter", "brief": "free", "detailed": "free"}

PROMPTS = {
    "yesno": "Is the answer \"{candidate}\"? Answer yes or no.",
    "mc": "Answer with the option's letter from the given choices directly.",
    "brief": "Answer briefly, in about 20 words.",
    "detailed": "Answer in detail, in about 50 words.",
}
# Word-count bands of what the brief/detailed prompts announce ("about 20", "about 50"); the template rewriter aims
# inside them and the LLM rewriter is asked for them.
WORD_BANDS = {"brief": (10, 20), "detailed": (40, 60)}

REWRITER_KEY = "benchmark.asd.rewriter"
REWRITER_KEYWORDS = ASDConfig.KEYWORDS

# Why a picked sample kept its original style (keys of ASDStats.skip_reasons and asd_stats.json).
SKIP_MULTI_TURN = "multi-turn sample"
SKIP_NO_DISTRACTORS = "too few distractors"
SKIP_NO_TEXT = "no meta brief/detailed text (rewriter: meta)"
SKIP_EMPTY_REWRITE = "empty rewrite"

Rewriter = Callable[[Sample, str], "str | None"]
"""rewriter(sample, style) -> answer text for style 'brief' or 'detailed', or None (or '') to skip the sample."""


@runtime_checkable
class BatchRewriter(Protocol):
    """A rewriter that wants all of a task's requests at once (an LLM generates them in batches)."""

    def rewrite_batch(self, requests: Sequence[tuple[Sample, str]]) -> list[str | None]: ...


@dataclass
class ASDStats:
    """What `diversify` did: conversions per style and per task, and the picks it had to skip (kept in the original
    style) with the reason. `merge` adds another task's statistics, so a run can write one record for all tasks."""

    converted: dict[str, int] = field(default_factory=lambda: {s: 0 for s in ASD_STYLES})
    skipped: dict[str, int] = field(default_factory=lambda: {s: 0 for s in ASD_STYLES})
    skip_reasons: dict[str, dict[str, int]] = field(default_factory=dict)
    """style -> reason -> picks kept in their original style."""
    kept: int = 0
    per_task: dict[str, dict[str, int]] = field(default_factory=dict)
    """task -> style -> converted samples."""
    per_task_skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    """task -> reason -> skipped picks."""
    samples: dict[str, int] = field(default_factory=dict)
    """task -> training samples (converted or not)."""

    def skip(self, task: str, style: str, reason: str) -> None:
        self.skipped[style] += 1
        reasons = self.skip_reasons.setdefault(style, {})
        reasons[reason] = reasons.get(reason, 0) + 1
        per_task = self.per_task_skipped.setdefault(task, {})
        per_task[reason] = per_task.get(reason, 0) + 1

    def merge(self, other: ASDStats) -> None:
        for style in ASD_STYLES:
            self.converted[style] += other.converted.get(style, 0)
            self.skipped[style] += other.skipped.get(style, 0)
        for style, reasons in other.skip_reasons.items():
            mine = self.skip_reasons.setdefault(style, {})
            for reason, n in reasons.items():
                mine[reason] = mine.get(reason, 0) + n
        self.kept += other.kept
        self.per_task.update(copy.deepcopy(other.per_task))
        self.per_task_skipped.update(copy.deepcopy(other.per_task_skipped))
        self.samples.update(other.samples)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        done = ", ".join(f"{s} {n}" for s, n in self.converted.items())
        skipped = ", ".join(f"{s} {n}" for s, n in self.skipped.items() if n)
        reasons: dict[str, int] = {}
        for by_reason in self.skip_reasons.values():
            for reason, n in by_reason.items():
                reasons[reason] = reasons.get(reason, 0) + n
        why = "; ".join(f"{r}: {n}" for r, n in sorted(reasons.items()))
        return (f"ASD converted: {done}; kept original: {self.kept}"
                + (f"; skipped: {skipped} ({why})" if skipped else ""))


def diversify(samples: Sequence[Sample], fraction: float, styles: Sequence[str] = ASD_STYLES, seed: int = 0,
              answer_pool: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
              rewriter: Rewriter | BatchRewriter | None = None) -> list[Sample]:
    """Convert a deterministic `fraction` of each task's training samples into the other answer styles.

    Returns the samples in their original order (converted ones replaced, ids unchanged); the statistics are
    logged — use `diversify_with_stats` to get them.
    """
    result, stats = diversify_with_stats(samples, fraction, styles, seed, answer_pool, rewriter)
    logger.info(stats.summary())
    return result


def diversify_with_stats(samples: Sequence[Sample], fraction: float, styles: Sequence[str] = ASD_STYLES,
                         seed: int = 0, answer_pool: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
                         rewriter: Rewriter | BatchRewriter | None = None) -> tuple[list[Sample], ASDStats]:
    """`diversify`, also returning how many samples went to each style and which conversions were skipped, and why.

    Brief/detailed texts come from the sample's `meta` first, then from `rewriter` — called once per task with all of
    that task's requests when it is a `BatchRewriter` — and a pick without a text keeps its original style.
    """
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"ASD fraction must be within [0, 1], got {fraction}")
    unknown = [s for s in styles if s not in ASD_STYLES]
    if unknown:
        raise DataError(f"unknown ASD styles {unknown}; choose from {', '.join(ASD_STYLES)}")
    by_task: dict[str, list[int]] = defaultdict(list)
    for position, sample in enumerate(samples):
        by_task[sample.task].append(position)

    result = list(samples)
    stats = ASDStats()
    for task, positions in by_task.items():
        task_stats = {s: 0 for s in ASD_STYLES}
        own = {OWN_STYLE.get(samples[positions[0]].meta.get("style", ""))}
        allowed = [s for s in styles if s not in own]
        pool = _pool_for(task, [samples[p] for p in positions], answer_pool)
        rng = random.Random(f"asd:{seed}:{task}")
        chosen = rng.sample(positions, round(fraction * len(positions))) if allowed else []
        # equal shares per style, so every task gets the same mix
        picks = [(position, allowed[k % len(allowed)]) for k, position in enumerate(chosen)]
        texts = _texts_for(samples, picks, rewriter)
        for position, style in picks:
            converted, reason = _convert(samples[position], style, pool, rng, texts.get((position, style)),
                                         rewriter is not None)
            if converted is None:
                stats.skip(task, style, reason)
                continue
            result[position] = converted
            stats.converted[style] += 1
            task_stats[style] += 1
        stats.per_task[task] = task_stats
        stats.samples[task] = len(positions)
    stats.kept = sum(1 for before, after in zip(samples, result) if before is after)
    return result, stats


def _texts_for(samples: Sequence[Sample], picks: list[tuple[int, str]],
               rewriter: Rewriter | BatchRewriter | None) -> dict[tuple[int, str], str]:
    """(position, style) -> brief/detailed text, from meta or else from the rewriter (one batch for the task)."""
    texts: dict[tuple[int, str], str] = {}
    wanted = []
    for position, style in picks:
        if style not in TEXT_STYLES or len(samples[position].turns) != 1:
            continue
        text = samples[position].meta.get(style)
        if text:
            texts[(position, style)] = text
        elif rewriter is not None:
            wanted.append((position, style))
    if not wanted:
        return texts
    requests = [(samples[p], s) for p, s in wanted]
    if isinstance(rewriter, BatchRewriter):
        answers = rewriter.rewrite_batch(requests)
    else:
        answers = [rewriter(sample, style) for sample, style in requests]
    for key, text in zip(wanted, answers):
        if text and text.strip():
            texts[key] = text.strip()
    return texts


def _pool_for(task: str, samples: list[Sample], answer_pool) -> list[str]:
    if isinstance(answer_pool, Mapping):
        source = answer_pool.get(task, [])
    elif answer_pool is not None:
        source = answer_pool
    else:
        source = [_answer_text(s) for s in samples]
    return sorted({a.strip() for a in source if a and a.strip()})


def _answer_text(sample: Sample) -> str:
    """The answer as content: for letter answers with known options, the option text rather than the letter."""
    choices = sample.meta.get("choices")
    answer = sample.answer.strip()
    if choices and len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
        return str(choices[LETTERS.index(answer.upper())])
    return answer


def _distractors(sample: Sample, truth: str, pool: list[str], k: int, rng: random.Random) -> list[str] | None:
    """k wrong answers: the sample's own other options first (most plausible), then the task's answer pool."""
    own = [str(c) for c in sample.meta.get("choices") or [] if str(c).strip() != truth]
    others = [a for a in pool if a != truth and a not in own]
    picked = rng.sample(own, min(k, len(own)))
    if len(picked) < k:
        if len(others) < k - len(picked):
            return None
        picked += rng.sample(others, k - len(picked))
    return picked


def _convert(sample: Sample, style: str, pool: list[str], rng: random.Random, text: str | None,
             has_rewriter: bool) -> tuple[Sample | None, str]:
    """(the converted sample, "") or (None, why it stays in its original style)."""
    if len(sample.turns) != 1:
        return None, SKIP_MULTI_TURN
    stem = sample.meta.get("stem") or sample.question
    truth = _answer_text(sample)
    meta = copy.deepcopy(sample.meta)
    if style == "yesno":
        use_truth = rng.random() < 0.5
        if use_truth:
            candidate = truth
        else:
            wrong = _distractors(sample, truth, pool, 1, rng)
            if wrong is None:
                return None, SKIP_NO_DISTRACTORS
            candidate = wrong[0]
        prompt, answer = f"{stem}\n{PROMPTS['yesno'].format(candidate=candidate)}", "yes" if use_truth else "no"
        meta.update(candidates=["yes", "no"])
        meta.pop("choices", None)
    elif style == "mc":
        wrong = _distractors(sample, truth, pool, 3, rng)
        if wrong is None:
            return None, SKIP_NO_DISTRACTORS
        options = wrong + [truth]
        rng.shuffle(options)
        listing = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
        prompt, answer = f"{stem}\n{listing}\n{PROMPTS['mc']}", LETTERS[options.index(truth)]
        meta.update(choices=options, candidates=list(LETTERS))
    else:
        if not text:
            return None, SKIP_EMPTY_REWRITE if has_rewriter else SKIP_NO_TEXT
        prompt, answer = f"{stem}\n{PROMPTS[style]}", text
        meta.update(candidates=None)
        meta.pop("choices", None)
    if sample.image is not None:
        prompt = IMAGE_PREFIX + prompt
    meta.pop("references", None)  # the original references no longer describe the converted answer
    meta.update(style=RESULT_STYLE[style], asd_style=style, asd_original_answer=sample.answer)
    return Sample(id=sample.id, task=sample.task, image=sample.image, turns=[(prompt, answer)], meta=meta), ""


# ------------------------------------------------------------------------------------------- choosing a rewriter


def build_rewriter(value: str, *, seed: int = 0, cache_file: Path | None = None) -> Rewriter | BatchRewriter | None:
    """The rewriter `benchmark.asd.rewriter` names: `meta` -> None (meta texts only), `template` -> TemplateRewriter,
    a folder holding a causal LM (config.json) -> LLMRewriter caching its answers in `cache_file`."""
    value = (value or "").strip()
    if value == "meta":
        return None
    if value == "template":
        return TemplateRewriter(seed)
    path = Path(value).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return LLMRewriter(path, cache_file)
    found = ("a folder without config.json" if path.is_dir()
             else "a file, not a folder" if path.exists() else "no such folder")
    raise RecipeError(f"{REWRITER_KEY}: {value!r} ({found}); expected 'meta' (brief/detailed from the samples' "
                      "meta only), 'template' (built from each sample's question and answer) or the path of a local "
                      f"causal-LM folder saved with save_pretrained (config.json, weights, tokenizer)"
                      f"{suggest(value, REWRITER_KEYWORDS)}")


# --------------------------------------------------------------------------------------------- answer as content

_LETTER_ANSWER = re.compile(r"^\(?([A-Za-z])[).:]?$")
_OPTION_LINE = re.compile(r"^\s*\(?([A-H])[).:]\s+(.+?)\s*$")
_INSTRUCTION = re.compile(r"\b(answer|respond|reply|choose|select|pick)\b.*\b(word|phrase|letter|option|options|"
                          r"directly|briefly|number|sentence|choices)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_DETERMINERS = {"a", "an", "the", "two", "three", "four", "five", "several", "some", "many", "one", "there", "this",
                "these", "those"}
SENTENCE_WORDS = 8
"""An answer of at least this many words (or any caption) is already a sentence: brief and detailed build on it."""


@dataclass
class _Content:
    phrase: str
    """The answer as it is stated ("goldfish", "option B (circle)", "3")."""
    short: str
    """How later sentences refer to it (the option letter for long option texts)."""
    option: str | None
    """The option letter when the prompt shows the options, else None."""
    sentence: bool
    """The answer is already a sentence (a caption, a free-text answer)."""


def _question_options(question: str) -> dict[str, str]:
    """Options written inside the question ("A. circle" / "(B) square" lines), for letter answers without
    meta["choices"] (UCIT's ArxivQA)."""
    return {m[1]: m[2] for m in map(_OPTION_LINE.match, question.splitlines()) if m}


def _content(sample: Sample) -> _Content:
    answer = " ".join(sample.answer.split())
    style = sample.meta.get("style", "")
    if style == "caption" or (style not in ("letter", "word", "number", "yesno") and
                              len(answer.split()) >= SENTENCE_WORDS):
        return _Content(answer, answer, None, True)
    letter = _LETTER_ANSWER.match(answer)
    choices = sample.meta.get("choices")
    if letter and (style == "letter" or choices):
        key = letter[1].upper()
        if choices and key in LETTERS[: len(choices)]:
            text = str(choices[LETTERS.index(key)])
        else:
            text = _question_options(sample.question).get(key)
        if sample.meta.get("stem") and text:  # the prompt shows the stem only: the option text is the answer
            return _Content(text, text, None, False)
        phrase = f"option {key} ({text})" if text else f"option {key}"
        return _Content(phrase, f"option {key}", key, False)
    return _Content(answer, answer, None, False)


def _question_core(sample: Sample, max_words: int = 20) -> str:
    """The question itself, without answer-format instructions or option lists, cut to `max_words` words."""
    stem = sample.meta.get("stem") or sample.question
    lines = [ln.strip() for ln in stem.splitlines() if ln.strip() and not _OPTION_LINE.match(ln)]
    sentences = [s for ln in lines for s in _SENTENCE_END.split(ln) if s.strip()]
    kept = [s for s in sentences if not _INSTRUCTION.search(s)] or sentences[:1]
    words = " ".join(kept).split()
    if not words:
        return ""
    if len(words) > max_words:
        return " ".join(words[:max_words]).rstrip(",;:") + " ..."
    text = " ".join(words)
    return text if text[-1] in ".?!" else text + "?"


def _first_sentence(text: str) -> str:
    first = _SENTENCE_END.split(text.strip(), maxsplit=1)[0].strip()
    return first if first[-1:] in ".!?" else first + "."


def _lower_first(sentence: str) -> str:
    """'A dog runs.' -> 'a dog runs.' (only after a determiner, so names keep their capital)."""
    first = sentence.split(" ", 1)[0]
    return sentence[0].lower() + sentence[1:] if first.lower() in _DETERMINERS else sentence


def _words(text: str) -> int:
    return len(text.split())


# ------------------------------------------------------------------------------------------- template rewriter

# {a}: the answer as stated; {s}: the short reference to it; {q}: the question; {c}: a caption's first sentence,
# lower-cased after a determiner. Image and text-only variants, so a text-only sample never mentions an image.
_BRIEF = {
    True: ("Looking at the image, the answer to this question is {a}.",
           "Based on what the image shows, the correct answer here is {a}.",
           "From the picture, I can tell that the answer to this is {a}.",
           "Judging by the image, the best answer to the question is {a}."),
    False: ("Considering the question carefully, the answer to it is {a}.",
            "Based on the information given, the correct answer here is {a}.",
            "Thinking the question through, I can say the answer is {a}.",
            "Put simply, the best answer to this question is {a}."),
}
# captions are noun phrases ("A dog on a beach.") or sentences ("A dog runs."): a colon lead-in suits both
_BRIEF_CAPTION = {
    True: ("Here is what the image shows: {c}", "Described briefly, the picture shows this: {c}",
           "In one sentence, the image shows the following: {c}"),
    False: ("In short, the answer is this: {c}", "Put briefly, it comes to this: {c}"),
}
_OPENING = ('The question asks: "{q}"', 'Here the question is: "{q}"', 'We are asked: "{q}"',
            'The question to answer is: "{q}"')
_OPENING_NO_QUESTION = {True: "The question is about what the image shows.",
                        False: "The question is about the information given."}
_ANSWER = {
    True: ("Looking at the image, the answer is {a}.", "The correct answer is {a}.",
           "The answer to this question is {a}.", "Based on the image, the answer is {a}."),
    False: ("The correct answer is {a}.", "The answer to this question is {a}.",
            "Based on the information given, the answer is {a}."),
}
_EXPLAIN = {
    True: ("The answer is read from the image itself, which is what the question requires.",
           "Examining the image with the question in mind leads directly to this answer.",
           "Of the possible answers, {s} is the one that matches what the question asks for.",
           "So, putting it simply, the answer that this question is looking for is {s}.",
           "In other words, when asked this question about the image, the right response is {s}.",
           "Nothing more needs to be added here: {s} is the complete answer to the question."),
    False: ("The answer follows from the question and the information it provides.",
            "Of the possible answers, {s} is the one that matches what the question asks for.",
            "So, putting it simply, the answer that this question is looking for is {s}.",
            "In other words, when asked this question, the right response is {s}.",
            "Nothing more needs to be added here: {s} is the complete answer to the question."),
}
_EXPLAIN_OPTION = ("Among the listed options, option {o} is the one that gives this answer.",
                   "Checking each listed option against the question, option {o} is the one that fits.")
_ELABORATE = {
    True: ("This description covers the main content of the image, as the question asks.",
           "Put briefly, the picture shows this: {c}",
           "The scene is described as it appears, without adding anything that cannot be seen.",
           "These are the main elements that are visible in the picture.",
           "To sum up the description once more: {c}",
           "That is the overall content of the image in a few words."),
    False: ("This text covers the main points that the question asks about.",
            "Put briefly: {c}",
            "Nothing is added beyond what the answer itself states.",
            "To sum up once more: {c}",
            "That is the overall content of the answer in a few words."),
}


class TemplateRewriter:
    """Brief and detailed answers built deterministically from the sample's own question and answer (and the option
    text of a letter answer, from `meta["choices"]` or the option lines of the question).

    Why: on real data no sample carries a brief or detailed answer, so with `rewriter: meta` those two styles are
    skipped and only about half of the asked fraction is converted. The templates make every asked conversion
    happen. They never invent content: every sentence restates the question or the answer, or is a generic remark
    about answering; there is no knowledge beyond the sample's own question and answer (an LLM rewriter can add
    explanations, these templates cannot). Word counts aim at the bands the prompts announce (`WORD_BANDS`: brief
    10-20, detailed 40-60 words) except where the answer alone is longer. The template is picked by an rng seeded
    with (seed, task, sample id, style), so a run is reproducible and 40k samples are not one string.

    - brief, answer a word/number/option: one templated sentence stating it ("Looking at the image, the answer to
      this question is goldfish.");
    - brief, answer already a sentence (captions): its first sentence, with a lead-in when under 10 words;
    - detailed, answer a word/number/option: the question restated, the answer, and templated remarks until 40-60
      words;
    - detailed, answer a sentence: the answer, then templated elaboration (restating it) until 40 words.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, sample: Sample, style: str) -> str | None:
        if style not in TEXT_STYLES:
            raise DataError(f"TemplateRewriter writes brief and detailed answers, not {style!r}")
        if not sample.answer.strip():
            return None
        rng = random.Random(f"asd-template:{self.seed}:{sample.task}:{sample.id}:{style}")
        content, image = _content(sample), sample.image is not None
        if content.sentence:
            return self._caption_brief(content, image, rng) if style == "brief" else \
                self._caption_detailed(content, image, rng)
        return self._brief(content, image, rng) if style == "brief" else \
            self._detailed(sample, content, image, rng)

    @staticmethod
    def _brief(content: _Content, image: bool, rng: random.Random) -> str:
        text = rng.choice(_BRIEF[image]).format(a=content.phrase)
        return text if _words(text) <= WORD_BANDS["brief"][1] else f"The answer is {content.phrase}."

    @staticmethod
    def _caption_brief(content: _Content, image: bool, rng: random.Random) -> str:
        first = _first_sentence(content.phrase)
        if _words(first) >= WORD_BANDS["brief"][0]:
            return first
        return rng.choice(_BRIEF_CAPTION[image]).format(c=_lower_first(first))

    @staticmethod
    def _detailed(sample: Sample, content: _Content, image: bool, rng: random.Random) -> str:
        question = _question_core(sample)
        parts = [rng.choice(_OPENING).format(q=question) if question else _OPENING_NO_QUESTION[image],
                 rng.choice(_ANSWER[image]).format(a=content.phrase)]
        extra = [e.format(s=content.short) for e in _EXPLAIN[image]]
        if content.option:
            extra.append(rng.choice(_EXPLAIN_OPTION).format(o=content.option))
        rng.shuffle(extra)
        return _fill(parts, extra, rng)

    @staticmethod
    def _caption_detailed(content: _Content, image: bool, rng: random.Random) -> str:
        brief = _lower_first(_first_sentence(content.phrase))
        extra = [e.format(c=brief) for e in _ELABORATE[image]]
        rng.shuffle(extra)
        return _fill([content.phrase if content.phrase[-1] in ".!?" else content.phrase + "."], extra, rng)


def _fill(parts: list[str], extra: list[str], rng: random.Random) -> str:
    """`parts`, then sentences of `extra` until a target drawn inside the detailed band, never past its top."""
    low, high = WORD_BANDS["detailed"]
    target = rng.randint(low + 4, (low + high) // 2 + 2)  # 44-52 words: inside the band with room for a sentence
    count = sum(_words(p) for p in parts)
    for sentence in extra:
        if count >= target:
            break
        if count + _words(sentence) <= high:
            parts.append(sentence)
            count += _words(sentence)
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------ LLM rewriter

REWRITES_FILE = "rewrites.jsonl"


def rewrite_prompt(sample: Sample, style: str) -> str:
    """The instruction an LLM rewriter gets: the question, the reference answer, the wanted style and length."""
    low, high = WORD_BANDS[style]
    content = _content(sample)
    question = (sample.meta.get("stem") or sample.question).strip()
    kind = "brief answer of one sentence" if style == "brief" else "detailed answer"
    return (f"Rewrite the reference answer to the question below as a {kind} of {low}-{high} words. Keep its "
            "meaning and state nothing that the question and the reference answer do not support.\n"
            f"Question: {question}\nReference answer: {content.phrase}\n"
            f"{style.capitalize()} answer:")


def read_rewrite_cache(path: Path | None) -> dict[tuple[str, str, str], str]:
    """(task, sample id, style) -> text from a rewrites JSONL file; a torn last line (a kill mid-append) and any
    line that is not a complete record are ignored, so those answers are generated again."""
    cache: dict[tuple[str, str, str], str] = {}
    if path is None or not Path(path).is_file():
        return cache
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            cache[(str(record["task"]), str(record["id"]), str(record["style"]))] = str(record["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return cache


def append_rewrites(path: Path, records: list[dict[str, str]]) -> None:
    """Append records as JSON lines and fsync, so a killed run keeps every batch it finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as f:
        if torn:  # never glue a new record onto the fragment a kill left behind
            f.write("\n")
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


class LLMRewriter:
    """Brief and detailed answers generated by a local causal LM (the paper's approach), greedy and in batches.

    Every answer is appended to `cache_file` (JSONL keyed by task, sample id and style) as soon as its batch is done,
    so a resumed or repeated run reads them back instead of generating again; the model is loaded only when
    something is missing. In a multi-rank run only the main rank generates: the others wait until the cache holds
    every answer they asked for (polling the file, since generating can take longer than a collective's timeout;
    a failing main rank ends the job through `dist.exit_on_error`), then all ranks meet at a barrier. Empty
    generations are cached as empty and count as skipped. The model is loaded with `trust_remote_code=False` and
    `local_files_only=True`: nothing is downloaded and no code from the folder runs.
    """

    def __init__(self, model_dir: Path, cache_file: Path | None, batch_size: int = 16,
                 max_new_tokens: Mapping[str, int] | None = None, poll_s: float = 2.0):
        self.model_dir = Path(model_dir)
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self.batch_size = batch_size
        self.max_new_tokens = dict(max_new_tokens or {"brief": 48, "detailed": 120})
        self.poll_s = poll_s
        self.generated = 0
        """Answers generated by this instance (not read from the cache)."""
        self._memory: dict[tuple[str, str, str], str] = {}
        self._model = None
        self._tokenizer = None

    def rewrite_batch(self, requests: Sequence[tuple[Sample, str]]) -> list[str | None]:
        keys = [(s.task, s.id, style) for s, style in requests]
        if dist.is_distributed() and self.cache_file is None:
            raise DataError("the LLM rewriter needs a cache file to share its answers between ranks")
        cache = {**read_rewrite_cache(self.cache_file), **self._memory}
        if dist.is_main() or not dist.is_distributed():
            missing = {k: (s, style) for k, (s, style) in zip(keys, requests) if k not in cache}
            if missing:
                cache.update(self._generate(list(missing.items())))
        else:
            cache = self._wait_for(set(keys))
        dist.barrier()
        return [cache.get(k) or None for k in keys]

    def close(self) -> None:
        """Free the model (the training model is loaded next)."""
        if self._model is None:
            return
        self._model = self._tokenizer = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _wait_for(self, keys: set[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
        cache, last_note = read_rewrite_cache(self.cache_file), time.monotonic()
        while not keys <= cache.keys():
            if time.monotonic() - last_note > 60:
                logger.info("rank %d: waiting for the main rank's ASD rewrites (%d of %d ready)", dist.rank(),
                            len(keys & cache.keys()), len(keys))
                last_note = time.monotonic()
            time.sleep(self.poll_s)
            cache = read_rewrite_cache(self.cache_file)
        return cache

    def _load(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True, trust_remote_code=False)
            tokenizer.padding_side = "left"  # decoder-only batches: new tokens must follow every prompt directly
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            cuda = torch.cuda.is_available()
            model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, local_files_only=True, trust_remote_code=False,
                dtype=torch.bfloat16 if cuda else torch.float32)
            model.to(torch.device("cuda", dist.local_rank()) if cuda else torch.device("cpu")).eval()
            self._model, self._tokenizer = model, tokenizer
        return self._model, self._tokenizer

    def _encode(self, tokenizer, prompts: list[str]):
        texts = [_chat_text(tokenizer, p) for p in prompts]
        if all(t is not None for t in texts):  # the chat template adds the special tokens itself
            return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return tokenizer(prompts, return_tensors="pt", padding=True)


    def _generate(self, items: list[tuple[tuple[str, str, str], tuple[Sample, str]]]) -> dict:
        import torch
        from tqdm.auto import tqdm

        model, tokenizer = self._load()
        batches = []
        for style in TEXT_STYLES:  # one style per batch (one max_new_tokens); similar lengths together (less padding)
            same = sorted((it for it in items if it[1][1] == style), key=lambda it: len(rewrite_prompt(*it[1])))
            batches += [same[i:i + self.batch_size] for i in range(0, len(same), self.batch_size)]
        done: dict[tuple[str, str, str], str] = {}
        with tqdm(total=len(items), desc="ASD rewrites", unit="answer") as bar:
            for batch in batches:
                style = batch[0][1][1]
                encoded = self._encode(tokenizer, [rewrite_prompt(s, st) for _, (s, st) in batch]).to(model.device)
                with torch.inference_mode():
                    out = model.generate(**encoded, do_sample=False, max_new_tokens=self.max_new_tokens[style],
                                         pad_token_id=tokenizer.pad_token_id)
                texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
                records = []
                for (key, _), text in zip(batch, texts):
                    text = " ".join(text.strip().split("\n\n")[0].split())  # the first paragraph, one line
                    done[key] = text
                    records.append({"task": key[0], "id": key[1], "style": key[2], "text": text})
                if self.cache_file is not None:
                    append_rewrites(self.cache_file, records)
                self.generated += len(batch)
                bar.update(len(batch))
        self._memory.update(done)
        return done


def _chat_text(tokenizer, prompt: str) -> str | None:
    """`prompt` as one user turn of the tokenizer's chat template, or None without a usable template. Templates take
    the content as a string (text models) or as a list of typed parts (multimodal ones); a template given the other
    form can silently render nothing, so a rendering that lost the prompt is rejected."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    for content in (prompt, [{"type": "text", "text": prompt}]):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template's own error (jinja, TypeError...) means: try the other form
            continue
        if isinstance(text, str) and prompt in text:
            return text
    return None
