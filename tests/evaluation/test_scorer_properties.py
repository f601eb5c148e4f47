"""Properties every answer scorer keeps, over random inputs (hypothesis): per-sample scores in [0, 1]; an empty or
punctuation-only prediction never scores; a prediction equal to the answer scores 1; a single-letter answer is
matched by that letter only; the order of the samples changes nothing but the order of the per-sample scores."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcit.evaluation.normalize import has_content
from mcit.evaluation.scorers import VQA_MIN_ANSWERS, get_scorer

PROPERTY = settings(max_examples=40, deadline=None, database=None)
SCORERS = ["exact_match", "contains", "numeric", "yesno", "mc_letter", "iou", "vqa"]

words = st.sampled_from(["dog", "Red", "two", "3", "a", "the", "an", "circle", "yes", "no", "B", "x-ray", "don't",
                         "1,000", "3.5", "left"])
free_text = st.text(alphabet=string.ascii_letters + string.digits + " .,!?-'()/", max_size=24)
phrases = st.lists(words, min_size=1, max_size=4).map(" ".join)
answers = (phrases | free_text).filter(has_content)
blank = st.text(alphabet=" \t\n" + string.punctuation, max_size=8)
predictions = answers | blank | free_text | st.sampled_from(["", "The answer is B", "[0, 0, 1, 1]", "yes.", "3."])


@st.composite
def boxes(draw) -> str:
    x1, y1 = draw(st.integers(0, 50)), draw(st.integers(0, 50))
    return f"[{x1}, {y1}, {x1 + draw(st.integers(1, 50))}, {y1 + draw(st.integers(1, 50))}]"


@st.composite
def human_answers(draw) -> list[str]:
    return draw(st.lists(answers | st.sampled_from(["", "?"]), min_size=VQA_MIN_ANSWERS, max_size=10)
                .filter(lambda xs: any(has_content(x) for x in xs)))


def reference(name: str) -> st.SearchStrategy:
    """(reference, meta) pairs a scorer accepts."""
    empty = st.just({})
    return {
        "exact_match": st.tuples(answers, empty),
        "contains": st.tuples(answers, empty),
        "numeric": st.tuples(st.integers(-999, 999).map(str) | st.sampled_from(["3.5", "three", "1,000"]), empty),
        "yesno": st.tuples(st.sampled_from(["yes", "No", "Yes."]), empty),
        "mc_letter": st.tuples(st.sampled_from("ABCD"), empty),
        "iou": st.tuples(boxes(), empty),
        "vqa": human_answers().map(lambda xs: (xs[0], {"references": xs})),
    }[name]


@st.composite
def rows(draw, name: str) -> list[tuple[str, str, dict]]:
    """Samples whose predictions are partly drawn from the references, so both hits and misses occur."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        ref, meta = draw(reference(name))
        pool = [ref, *meta.get("references", [])]
        out.append((draw(predictions | st.sampled_from(pool)), ref, meta))
    return out


def _score(name: str, samples: list[tuple[str, str, dict]]):
    preds, refs, metas = (list(column) for column in zip(*samples))
    return get_scorer(name)(preds, refs, metas)


@pytest.mark.parametrize("name", SCORERS)
@PROPERTY
@given(data=st.data())
def test_per_sample_scores_lie_in_the_unit_interval(name, data):
    samples = data.draw(rows(name))
    result = _score(name, samples)
    assert len(result.per_sample) == len(samples)
    assert all(0.0 <= s <= 1.0 for s in result.per_sample)
    assert result.score == pytest.approx(100 * sum(result.per_sample) / len(samples))


@pytest.mark.parametrize("name", SCORERS)
@PROPERTY
@given(data=st.data(), prediction=blank)
def test_a_prediction_without_content_never_scores(name, data, prediction):
    ref, meta = data.draw(reference(name))
    assert _score(name, [(prediction, ref, meta)]).per_sample == [0.0]


@pytest.mark.parametrize("name", ["exact_match", "contains"])
@PROPERTY
@given(text=answers)
def test_a_prediction_equal_to_the_reference_scores_one(name, text):
    assert _score(name, [(text, text, {})]).per_sample == [1.0]


@PROPERTY
@given(text=answers, others=st.lists(answers, max_size=6), repeats=st.integers(VQA_MIN_ANSWERS, 10))
def test_vqa_prediction_given_by_enough_humans_scores_one(text, others, repeats):
    """Four equal human answers, not three: each leave-one-out subset must still hold 3 matches (3 give 2/3 each)."""
    answers_ = [text] * repeats + others
    assert _score("vqa", [(text, text, {"references": answers_})]).per_sample == [1.0]


LETTER_CANDIDATES = ["", ".", " ", "a", "an", "the", "An", "The", "A.", "b", "B", "I", "i."]
TWENTY_SIX = {"choices": [f"option {k}" for k in range(26)]}  # every letter is a valid option


@pytest.mark.parametrize("name", ["exact_match", "contains", "mc_letter", "vqa"])
@PROPERTY
@given(letter=st.sampled_from(string.ascii_uppercase), data=st.data())
def test_a_single_letter_answer_is_matched_by_that_letter_only(name, letter, data):
    candidate = data.draw(st.sampled_from([*LETTER_CANDIDATES, letter, letter.lower(), letter + ".",
                                           letter.lower() + "."]))
    meta = {"vqa": {"references": [letter] * 10}, "mc_letter": TWENTY_SIX}.get(name, {})
    expected = float(candidate.lower() in (letter.lower(), letter.lower() + "."))
    assert _score(name, [(candidate, letter, meta)]).per_sample == [expected]


@pytest.mark.parametrize("name", SCORERS)
@PROPERTY
@given(data=st.data())
def test_permuting_the_samples_permutes_the_scores(name, data):
    samples = data.draw(rows(name))
    order = data.draw(st.permutations(range(len(samples))))
    before = _score(name, samples)
    after = _score(name, [samples[k] for k in order])
    assert after.per_sample == [before.per_sample[k] for k in order]
    assert after.score == pytest.approx(before.score)
