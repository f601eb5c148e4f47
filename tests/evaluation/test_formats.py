"""Format checks and the superficial / essential labels built on them."""

import pytest

from mcit.data.records import ANSWER_STYLES
from mcit.errors import EvalError
from mcit.evaluation.formats import check_format, label_prediction

CASES = {
    "word": (
        ["red", "Circle.", "traffic light", "a fire hydrant truck"],
        ["", "a big red shiny ball", "B. red", "   "],
    ),
    "number": (["3", "3.", "three", "-2.5", "1,000", "3/4", "twenty-one"], ["3 circles", "three or four", "B", "x"]),
    "letter": (["B", "(C)", "A. square", "The answer is D"], ["circle", "E", "the answer is a circle", "3"]),
    "yesno": (["yes", "No.", "Yes, there is."], ["I think yes", "maybe", "B", "The image shows no dogs"]),
    "caption": (["a red circle on the left", "Two dogs play in the park."], ["B", "3", "yes", "a red circle"]),
    "ocr": (["STOP", "ab12", "9780140449136"[:12], "Exit."], ["two words", "", "abcdefghijklm", "a-b"]),
    "box": (["[0.1, 0.2, 0.5, 0.6]", "(10, 20, 30, 40)", "1 2 3 4"], ["[1, 2, 3]", "box at [1,2,3,4]", "[3,3,1,1]"]),
    "free": (["anything", "B"], ["", "  \n"]),
}


@pytest.mark.parametrize("style", ANSWER_STYLES)
def test_check_format_accepts_and_rejects(style):
    accepted, rejected = CASES[style]
    for prediction in accepted:
        assert check_format(style, prediction), f"{style}: {prediction!r} should be in format"
    for prediction in rejected:
        assert not check_format(style, prediction), f"{style}: {prediction!r} should be out of format"


def test_word_style_with_candidates_requires_one_of_them():
    meta = {"candidates": ["red", "Light Blue", "green"]}
    assert check_format("word", "Red.", meta)
    assert check_format("word", "light blue", meta)
    assert not check_format("word", "purple", meta)
    assert check_format("word", "purple")
    assert check_format("word", "B", {"candidates": ["A", "B", "AB", "O"]})  # blood types: the candidates decide
    assert not check_format("word", "B")


def test_letter_style_follows_the_number_of_choices():
    five = {"choices": ["v", "w", "x", "y", "z"]}
    assert check_format("letter", "E", five)
    assert not check_format("letter", "C", {"choices": ["x", "y"]})


def test_label_prediction_separates_superficial_from_essential():
    assert label_prediction("letter", True, "circle", {"choices": ["square", "circle"]}) == "correct"
    assert label_prediction("letter", False, "a red circle on the left") == "wrong_format"
    assert label_prediction("letter", False, "C") == "wrong_content"
    assert label_prediction("number", False, "yes") == "wrong_format"
    assert label_prediction("number", False, "4") == "wrong_content"
    assert label_prediction("caption", False, "B") == "wrong_format"
    assert label_prediction("caption", False, "a blue square in the corner") == "wrong_content"


def test_unknown_style_is_an_error_naming_valid_styles():
    with pytest.raises(EvalError, match="valid styles: word, number, letter"):
        check_format("sentence", "x")
    with pytest.raises(EvalError, match="unknown answer style"):
        label_prediction("sentence", True, "x")
