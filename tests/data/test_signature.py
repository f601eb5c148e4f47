"""Answer signatures: the answer-type classifier, learning shares and the length band, the JSON round trip, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mcit.data.signature import ANSWER_TYPES, DEFAULT_MIN_SHARE, AnswerSignature, answer_type, count_words
from mcit.errors import DataError

TYPE_CASES = {
    "empty": ["", "   ", "\n", "..."],
    "yesno": ["yes", "No.", "Yes, there is.", "no, it is not raining"],
    "number": ["3", "3.", "-2.5", "1,000", "3/4", "three", "twenty-one", "three hundred and five"],
    "letter": ["B", "(C)", "B.", "[d]", "A. square", "(B) the red one", "The answer is D", "option C"],
    "box": ["[0.1, 0.2, 0.5, 0.6]", "(10, 20, 30, 40)", "1 2 3 4"],
    "phrase": ["golden retriever", "red", "a red circle", "one two", "the answer is a circle", "I think yes",
               "three and four", "fire hydrant on the corner"],
    "sentence": [
        "Two dogs play together in the park.",
        "Yes, the man on the left is holding a red frisbee.",
        "B. The red circle on the left side of the picture",
    ],
}  # fmt: skip


@pytest.mark.parametrize("kind", ANSWER_TYPES)
def test_answer_type_classifies_each_kind(kind):
    for text in TYPE_CASES[kind]:
        assert answer_type(text) == kind, f"{text!r} should be {kind}"


def test_answer_type_rejects_non_strings():
    with pytest.raises(DataError, match="expected str"):
        answer_type(3)


def test_count_words_ignores_punctuation_tokens():
    assert count_words("Yes, there is.") == 3
    assert count_words(" (B) ") == 1
    assert count_words("a - b") == 2
    assert count_words("") == 0


VQA_LIKE = ["yes"] * 12 + ["no"] * 8 + ["2", "3", "one", "4", "10"] + [
    "red", "frisbee", "tennis", "kitchen", "white and blue", "pizza", "left", "cat", "umbrella", "skateboarding",
    "wood", "giraffe", "surfing", "black", "traffic light", "grass", "sunny", "bus", "table", "dog", "green",
    "baseball", "horse", "water", "christmas",
]  # fmt: skip


def test_learn_counts_shares_and_allows_every_frequent_type():
    signature = AnswerSignature.learn(VQA_LIKE)
    assert signature.n == 50
    assert signature.shares["yesno"] == pytest.approx(0.4)
    assert signature.shares["number"] == pytest.approx(0.1)
    assert signature.shares["phrase"] == pytest.approx(0.5)
    assert signature.shares["sentence"] == 0.0
    assert set(signature.shares) == set(ANSWER_TYPES) - {"empty"}
    assert signature.allowed == {"yesno", "number", "phrase"}
    assert signature.length_band == (1, 3)


def test_empty_answers_are_ignored_not_counted():
    signature = AnswerSignature.learn(["red", "", "  ", "blue"])
    assert signature.n == 2
    assert signature.shares["phrase"] == 1.0


def test_a_rare_type_stays_out_unless_min_share_lets_it_in():
    answers = ["tabby cat"] * 99 + ["yes"]  # one stray annotation among class names
    assert AnswerSignature.learn(answers).allowed == {"phrase"}
    assert AnswerSignature.learn(answers, min_share=0.005).allowed == {"phrase", "yesno"}
    assert DEFAULT_MIN_SHARE > 0.01


def test_length_band_is_the_2nd_to_98th_percentile():
    answers = [" ".join(["word"] * k) for k in range(1, 101)]  # 1..100 words, once each
    assert AnswerSignature.learn(answers).length_band == (2, 99)
    small = ["a b c d e f g h", "a b c d e f g h i j", "a b c d e f g h i j k l m n o"]
    assert AnswerSignature.learn(small).length_band == (8, 15)  # few answers: the full range


def test_length_band_ignores_a_rare_outlier():
    captions = [" ".join(["word"] * (8 + i % 8)) for i in range(100)] + [" ".join(["word"] * 80)]
    assert AnswerSignature.learn(captions).length_band == (8, 15)


def test_matches_needs_an_allowed_type_and_a_length_in_the_widened_band():
    signature = AnswerSignature(shares={"sentence": 1.0}, length_band=(10, 20), n=10)
    assert signature.in_band(5) and not signature.in_band(4)  # low / 2
    assert signature.in_band(42) and not signature.in_band(43)  # 2 * high + 2
    assert signature.matches("A man in a blue shirt rides a bicycle down the street.")
    assert not signature.matches("a man on a bike")  # a phrase, and too short
    assert not signature.matches("")
    long = " ".join(["A dog runs on the beach."] * 8)  # 48 words, a sentence but outside the band
    assert answer_type(long) == "sentence" and not signature.matches(long)


def test_round_trip_through_json():
    signature = AnswerSignature.learn(VQA_LIKE, min_share=0.05)
    data = json.loads(json.dumps(signature.to_dict()))
    again = AnswerSignature.from_dict(data)
    assert again == signature and hash(again) == hash(signature)
    assert again.allowed == signature.allowed and again.min_share == 0.05
    assert sorted(data) == ["length_band", "min_share", "n", "shares"]


def test_signature_is_immutable():
    signature = AnswerSignature.learn(VQA_LIKE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        signature.n = 3
    with pytest.raises(TypeError):
        signature.shares["sentence"] = 1.0


@pytest.mark.parametrize("answers", [[], ["", "  "], ["..."]])
def test_learn_needs_a_non_empty_answer(answers):
    with pytest.raises(DataError, match="non-empty"):
        AnswerSignature.learn(answers)


def test_learn_rejects_a_string_or_non_strings():
    with pytest.raises(DataError, match="one string"):
        AnswerSignature.learn("yes")
    with pytest.raises(DataError, match="must be strings, got int"):
        AnswerSignature.learn(["yes", 3])


@pytest.mark.parametrize(("change", "message"), [
    ({"shares": None}, r"\['shares'\] must map"),
    ({"shares": {"colour": 1.0}}, "unknown answer types"),
    ({"shares": {"phrase": 1.5}}, r"lie in \[0, 1\]"),
    ({"shares": {"phrase": 0.01}}, "no answer type reaches"),
    ({"length_band": [3]}, r"\['length_band'\] must be \[low, high\]"),
    ({"length_band": [5, 2]}, "1 <= low <= high"),
    ({"n": "ten"}, r"\['n'\] must be an integer"),
    ({"n": 0}, "n must be >= 1"),
    ({"min_share": 0}, "min_share must lie in"),
])  # fmt: skip
def test_from_dict_names_the_malformed_key(change, message):
    data = {**AnswerSignature.learn(VQA_LIKE).to_dict(), **change}
    with pytest.raises(DataError, match=message):
        AnswerSignature.from_dict(data)


def test_from_dict_names_missing_keys():
    with pytest.raises(DataError, match=r"lacks \['length_band', 'n'\]"):
        AnswerSignature.from_dict({"shares": {"phrase": 1.0}})
    with pytest.raises(DataError, match="must be a mapping"):
        AnswerSignature.from_dict(["phrase"])
