"""Answer Style Diversification (ASD), the data half of SEFE (Chen et al., 2025).

Why: sequential tasks with different answer forms teach the model "answer in the latest task's form", which shows up
as superficial forgetting. ASD converts a fraction of every task's training samples into a shared set of answer
styles — yes/no, multiple choice, brief (~20 words), detailed (~50 words) — so every task carries the same style mix
and a later task no longer overwrites the form of earlier ones.

Deviations from the paper: the paper converted data with an LLM and released only the converted files. Here yes/no
and multiple choice are built from templates with distractors drawn from an answer pool (the task's own training
answers by default, or the sample's other options for multiple-choice data); brief and detailed answers come from
`meta["brief"]` / `meta["detailed"]` (SynthCIT provides them) or from a user-supplied `rewriter` (e.g. an external
LLM), and are skipped otherwise. Only single-turn samples are converted.
"""

from __future__ import annotations

import copy
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from mcit.data.records import IMAGE_PREFIX, Sample
from mcit.errors import DataError

logger = logging.getLogger(__name__)

ASD_STYLES = ("yesno", "mc", "brief", "detailed")
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

Rewriter = Callable[[Sample, str], "str | None"]
"""rewriter(sample, style) -> answer text for style 'brief' or 'detailed', or None to skip the sample."""


@dataclass
class ASDStats:
    """What `diversify` did: conversions per style, and conversions it had to skip (kept in the original style)."""

    converted: dict[str, int] = field(default_factory=lambda: {s: 0 for s in ASD_STYLES})
    skipped: dict[str, int] = field(default_factory=lambda: {s: 0 for s in ASD_STYLES})
    kept: int = 0
    per_task: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> str:
        done = ", ".join(f"{s} {n}" for s, n in self.converted.items())
        skipped = ", ".join(f"{s} {n}" for s, n in self.skipped.items() if n)
        return f"ASD converted: {done}; kept original: {self.kept}" + (f"; skipped: {skipped}" if skipped else "")


def diversify(samples: Sequence[Sample], fraction: float, styles: Sequence[str] = ASD_STYLES, seed: int = 0,
              answer_pool: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
              rewriter: Rewriter | None = None) -> list[Sample]:
    """Convert a deterministic `fraction` of each task's training samples into the other answer styles.

    Returns the samples in their original order (converted ones replaced, ids unchanged); the statistics are
    logged — use `diversify_with_stats` to get them.
    """
    result, stats = diversify_with_stats(samples, fraction, styles, seed, answer_pool, rewriter)
    logger.info(stats.summary())
    return result


def diversify_with_stats(samples: Sequence[Sample], fraction: float, styles: Sequence[str] = ASD_STYLES,
                         seed: int = 0, answer_pool: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
                         rewriter: Rewriter | None = None) -> tuple[list[Sample], ASDStats]:
    """`diversify`, also returning how many samples went to each style and how many conversions were skipped."""
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
        for k, position in enumerate(chosen):
            style = allowed[k % len(allowed)]  # equal shares per style, so every task gets the same mix
            converted = _convert(samples[position], style, pool, rng, rewriter)
            if converted is None:
                stats.skipped[style] += 1
                continue
            result[position] = converted
            stats.converted[style] += 1
            task_stats[style] += 1
        stats.per_task[task] = task_stats
    stats.kept = sum(1 for before, after in zip(samples, result) if before is after)
    return result, stats


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


def _convert(sample: Sample, style: str, pool: list[str], rng: random.Random,
             rewriter: Rewriter | None) -> Sample | None:
    if len(sample.turns) != 1:
        return None
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
                return None
            candidate = wrong[0]
        prompt, answer = f"{stem}\n{PROMPTS['yesno'].format(candidate=candidate)}", "yes" if use_truth else "no"
        meta.update(candidates=["yes", "no"])
        meta.pop("choices", None)
    elif style == "mc":
        wrong = _distractors(sample, truth, pool, 3, rng)
        if wrong is None:
            return None
        options = wrong + [truth]
        rng.shuffle(options)
        listing = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
        prompt, answer = f"{stem}\n{listing}\n{PROMPTS['mc']}", LETTERS[options.index(truth)]
        meta.update(choices=options, candidates=list(LETTERS))
    else:
        text = sample.meta.get(style) or (rewriter(sample, style) if rewriter else None)
        if not text:
            return None
        prompt, answer = f"{stem}\n{PROMPTS[style]}", text
        meta.update(candidates=None)
        meta.pop("choices", None)
    if sample.image is not None:
        prompt = IMAGE_PREFIX + prompt
    meta.pop("references", None)  # the original references no longer describe the converted answer
    meta.update(style=RESULT_STYLE[style], asd_style=style, asd_original_answer=sample.answer)
    return Sample(id=sample.id, task=sample.task, image=sample.image, turns=[(prompt, answer)], meta=meta)
