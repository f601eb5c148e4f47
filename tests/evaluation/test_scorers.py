"""Scorers: lenient normalisation, answer extraction, caption metrics against pycocoevalcap, VQA accuracy, id
alignment, option validation and the registry. (Caption scores against COCOEvalCap itself on real captions:
test_caption_pipeline.py; properties over random inputs: test_scorer_properties.py.)"""

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from mcit.data.cards import SCORERS
from mcit.data.synthcit_scenes import parse_scene
from mcit.errors import EvalError
from mcit.evaluation import get_scorer as get_scorer_from_package
from mcit.evaluation.extract import extract_letter, extract_yesno, find_numbers, parse_box
from mcit.evaluation.normalize import Normalizer, normalize_vqa_answer
from mcit.evaluation.scorers import align_by_id, box_iou, get_scorer, ptb_tokenize, scorer_names

CHOICES = {"choices": ["square", "circle", "star", "heart"]}


# --- normaliser: the cases users complained about ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("3.", "3"),
        ("Circle.", "circle"),
        ("three", "3"),
        ("Twenty-one", "21"),
        ("a circle", "circle"),
        ("The Circle", "circle"),
        ("  red   square ", "red square"),
        ("3.0", "3"),
        ("1,000", "1000"),
        ("three hundred and five", "305"),
        ("dog's", "dogs"),
    ],
)
def test_lenient_exact_match_accepts_formatting_variants(prediction, reference):
    result = get_scorer("exact_match")([prediction], [reference])
    assert result.per_sample == [1.0]
    assert result.score == 100.0


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [("3.5", "35"), ("-3", "3"), ("one two", "12"), ("circle", "circles"), ("category", "cat"), ("3 4", "34")],
)
def test_lenient_exact_match_keeps_real_differences(prediction, reference):
    assert get_scorer("exact_match")([prediction], [reference]).per_sample == [0.0]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [("a", 1.0), ("A.", 1.0), (" A ", 1.0), ("", 0.0), (".", 0.0), ("  ", 0.0), ("the", 0.0), ("An", 0.0),
     ("B", 0.0)],
)
def test_a_single_letter_answer_is_matched_only_by_that_letter(prediction, expected):
    """ArxivQA-style letter answers: the article rule must not erase the letter "A" (then "", "." and "the" matched)."""
    assert get_scorer("exact_match")([prediction], ["A"]).per_sample == [expected]


def test_articles_are_dropped_only_beside_other_words():
    norm = Normalizer()
    assert (norm("a"), norm("The"), norm("an")) == ("a", "the", "an")
    assert norm("a circle") == norm("the circle") == "circle"
    assert norm("the a") == "the a"
    assert get_scorer("exact_match")(["the"], ["a"]).per_sample == [0.0]
    assert get_scorer("exact_match")(["The"], ["the"]).per_sample == [1.0]


BLANK_REFERENCE_CASES = [
    ("exact_match", "", {}), ("exact_match", " . ", {}), ("contains", "  ", {}), ("numeric", "?", {}),
    ("yesno", "", {}), ("mc_letter", "()", {}), ("iou", "", {}), ("scene_attributes", " ", {}),
]


@pytest.mark.parametrize(("name", "reference", "meta"), BLANK_REFERENCE_CASES)
def test_a_reference_without_content_is_an_error_naming_the_sample(name, reference, meta):
    with pytest.raises(EvalError, match=rf"^{name}: the test file has no answer for sample 1 "):
        get_scorer(name)(["x", "x"], [_valid_reference(name), reference], [meta, meta])


def _valid_reference(name):
    return {"numeric": "3", "yesno": "yes", "mc_letter": "A", "iou": "[0, 0, 1, 1]",
            "scene_attributes": "scene: small red circle at top left"}.get(name, "circle")


def test_exact_match_reference_that_its_normaliser_empties_is_an_error():
    with pytest.raises(EvalError, match="the test file has no answer for sample 0"):
        get_scorer("exact_match")(["x"], ["_"])


def test_number_words_stay_separate_when_they_do_not_form_one_number():
    assert Normalizer()("one two three") == "1 2 3"
    assert Normalizer()("one and two") == "1 and 2"
    assert Normalizer()("someone") == "someone"


def test_normaliser_options_switch_each_leniency_off():
    assert get_scorer("exact_match", normalizer="strict")(["3."], ["3"]).per_sample == [0.0]
    assert get_scorer("exact_match", lowercase=False)(["Circle"], ["circle"]).per_sample == [0.0]
    assert get_scorer("exact_match", number_words=False)(["three"], ["3"]).per_sample == [0.0]
    assert get_scorer("exact_match", normalizer={"drop_articles": False})(["a circle"], ["circle"]).per_sample == [0.0]
    # an option given beside the normalizer wins over the same option inside it
    assert get_scorer("exact_match", normalizer={"lowercase": True}, lowercase=False)(["Circle"], ["circle"]).per_sample \
        == [0.0]
    assert get_scorer("exact_match", normalizer="strict", lowercase=True)(["Circle."], ["circle."]).per_sample == [1.0]
    assert get_scorer("exact_match", normalizer="strict", lowercase=True)(["Circle"], ["circle."]).per_sample == [0.0]
    strict = Normalizer.strict()
    assert strict("  Circle.  ") == "Circle."


def test_unknown_scorer_and_options_name_the_valid_ones():
    with pytest.raises(EvalError, match="valid scorers: caption, caption_mean, contains"):
        get_scorer("bleu")
    with pytest.raises(EvalError, match=r"scorer 'iou': threshhold: unknown key; did you mean 'threshold'\?; "
                                        r"valid keys: threshold$"):
        get_scorer("iou", threshhold=0.7)
    with pytest.raises(EvalError, match=r"scorer 'exact_match': normalizer\.drop_article: unknown key; did you mean "
                                        r"'drop_articles'"):
        get_scorer("exact_match", normalizer={"drop_article": False})
    with pytest.raises(EvalError, match=r"lowercas: unknown key; did you mean 'lowercase'\?; valid keys: normalizer, "
                                        r"lowercase, .*collapse_whitespace"):
        get_scorer("exact_match", lowercas=False)
    with pytest.raises(EvalError, match="normalizer must be a Normalizer, a dict of its options or 'strict', got 3"):
        get_scorer("exact_match", normalizer=3)


def test_every_name_a_card_may_use_is_registered_and_nothing_else():
    assert scorer_names() == sorted(SCORERS)
    assert get_scorer_from_package is get_scorer


def test_length_mismatch_and_non_string_predictions_are_errors():
    scorer = get_scorer("exact_match")
    with pytest.raises(EvalError, match="2 predictions but 1 references"):
        scorer(["a", "b"], ["a"])
    with pytest.raises(EvalError, match="1 metas for 2 predictions"):
        scorer(["a", "b"], ["a", "b"], [{}])
    with pytest.raises(EvalError, match="prediction at index 1 is NoneType"):
        scorer(["a", None], ["a", "b"])
    with pytest.raises(EvalError, match="no predictions"):
        scorer([], [])


def test_score_is_percentage_of_per_sample_mean():
    result = get_scorer("exact_match")(["red", "blue", "green", "red"], ["red", "red", "green", "blue"])
    assert result.per_sample == [1.0, 0.0, 1.0, 0.0]
    assert result.score == 50.0
    assert result.details["n"] == 4


# --- multiple choice --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("[C].", "C"),
        ("B. circle", "B"),
        ("(B) circle", "B"),
        ("D) heart", "D"),
        ("The answer is B", "B"),
        ("The answer is B because it is round.", "B"),
        ("Answer: (c)", "C"),
        ("the correct option is d.", "D"),
        ("the answer is a circle", None),  # the article is not option A
        ("A circle", None),
        ("E", None),  # only A-D without choices
        ("circle", None),
        ("", None),
    ],
)
def test_extract_letter_without_choices(text, letter):
    assert extract_letter(text) == letter


def test_extract_letter_accepts_option_text_only_with_choices():
    assert extract_letter("circle", CHOICES) == "B"
    assert extract_letter("A Circle.", CHOICES) == "B"
    assert extract_letter("circle", CHOICES, use_choice_text=False) is None
    assert extract_letter("triangle", CHOICES) is None
    five = {"choices": ["a", "b", "c", "d", "e"]}
    assert extract_letter("E", five) == "E"
    assert extract_letter("C", {"choices": ["x", "y"]}) is None
    # an empty answer names no option, not even one whose text is empty too
    assert extract_letter("", {"choices": ["", "x"]}) is None
    assert extract_letter(" . ", {"choices": ["...", "x"]}) is None


def test_mc_letter_scorer_reads_letters_and_option_texts():
    preds = ["B", "The answer is (A)", "circle", "heart", "I am not sure"]
    refs = ["B", "A", "B", "B", "C"]
    result = get_scorer("mc_letter")(preds, refs, [CHOICES] * 5)
    assert result.per_sample == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert result.details["unparsed"] == 1
    assert get_scorer("mc_letter", accept_choice_text=False)(["circle"], ["B"], [CHOICES]).per_sample == [0.0]


def test_mc_letter_reference_may_be_option_text_but_must_be_valid():
    assert get_scorer("mc_letter")(["B"], ["circle"], [CHOICES]).per_sample == [1.0]
    with pytest.raises(EvalError, match="reference at index 1"):
        get_scorer("mc_letter")(["A", "A"], ["A", "triangle"], [CHOICES, CHOICES])


# --- numeric, yes/no, contains ----------------------------------------------------------------------------------


def test_find_numbers_reads_digits_words_and_fractions():
    assert find_numbers("There are three circles, 2.5 squares and 3/4 of a star; -2 left") == [3, 2.5, 0.75, -2]
    assert find_numbers("1,250 cars") == [1250]
    assert find_numbers("no numbers here, x2 3rd") == []


def test_numeric_scorer_tolerance_and_pick():
    scorer = get_scorer("numeric")
    result = scorer(
        ["3.", "three", "2.9999999", "The answer is 4", "none", "1/3"], ["3", "3", "3", "4", "1", "0.33333"]
    )
    assert result.per_sample == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert result.details["unparsed"] == 1
    assert get_scorer("numeric", abs_tol=0.0, rel_tol=0.0)(["2.9999999"], ["3"]).per_sample == [0.0]
    assert get_scorer("numeric", pick="first")(["3 circles and 2 squares"], ["3"]).per_sample == [1.0]
    assert get_scorer("numeric")(["3 circles and 2 squares"], ["3"]).per_sample == [0.0]
    assert get_scorer("numeric", pick="only")(["3 or 4"], ["3"]).per_sample == [0.0]
    with pytest.raises(EvalError, match="pick must be"):
        get_scorer("numeric", pick="middle")
    with pytest.raises(EvalError, match="reference at index 0"):
        scorer(["3"], ["three or four"])


def test_yesno_reads_first_word_or_unique_occurrence():
    assert extract_yesno("Yes.") == "yes"
    assert extract_yesno("No, there is none") == "no"
    assert extract_yesno("I think yes") == "yes"
    assert extract_yesno("yes and no") == "yes"  # the first word decides
    assert extract_yesno("maybe yes, maybe no") is None
    assert extract_yesno("a red circle") is None
    result = get_scorer("yesno")(["Yes.", "no", "maybe"], ["yes", "yes", "no"])
    assert result.per_sample == [1.0, 0.0, 0.0]
    with pytest.raises(EvalError, match="reference at index 0"):
        get_scorer("yesno")(["yes"], ["perhaps"])


def test_contains_uses_word_boundaries_case_insensitively():
    scorer = get_scorer("contains")
    preds = ["The image shows a Cat on a mat.", "a category of animals", "It is a fire  hydrant", "cat"]
    refs = ["cat", "cat", "Fire hydrant", "c++"]
    assert scorer(preds, refs).per_sample == [1.0, 0.0, 1.0, 0.0]
    assert scorer(["use c++ here"], ["c++"]).per_sample == [1.0]
    with pytest.raises(EvalError, match="the test file has no answer for sample 0"):
        scorer(["x"], ["  "])


# --- iou --------------------------------------------------------------------------------------------------------


def test_parse_box_forms():
    assert parse_box("[0.1, 0.2, 0.5, 0.6]") == (0.1, 0.2, 0.5, 0.6)
    assert parse_box("The object is at [10, 20, 110, 220].") == (10, 20, 110, 220)
    assert parse_box("(1,2,3,4) and [5, 6]") == (1, 2, 3, 4)
    assert parse_box("1 2 3 4") == (1, 2, 3, 4)
    assert parse_box("[1, 2, 3]") is None
    assert parse_box("[0.5, 0.5, 0.1, 0.9]") is None  # x2 < x1
    assert parse_box("a red circle") is None


def test_box_iou_edge_cases():
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # touching edges
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == 0.25  # contained
    assert box_iou((0, 0, 0, 1), (0, 0, 0, 1)) == 0.0  # no area at all


def test_iou_scorer_threshold_is_inclusive_and_unparsable_scores_zero():
    ref = "[0, 0, 2, 1]"
    preds = ["[0, 0, 1, 1]", "[0, 0, 0.9, 1]", "no box", "[0,0,2,1]"]  # IoU 0.5, 0.45, -, 1
    result = get_scorer("iou")(preds, [ref] * 4)
    assert result.per_sample == [1.0, 0.0, 0.0, 1.0]
    assert result.details["unparsed"] == 1
    assert result.details["mean_iou"] == pytest.approx(100 * (0.5 + 0.45 + 0 + 1) / 4)
    assert get_scorer("iou", threshold=0.75)(preds, [ref] * 4).per_sample == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(EvalError, match="reference at index 0"):
        get_scorer("iou")(["[0,0,1,1]"], ["left"])


# --- caption ----------------------------------------------------------------------------------------------------

CAPTION_PREDS = ["A red circle, on the left.", "Two blue squares!", "a dog running on grass", "a small green star"]
CAPTION_REFS = ["a red circle on the left", "two blue squares", "a cat sitting on grass", "a big yellow star"]


def _coco(preds, refs_per_sample):
    """gts/res as COCOEvalCap builds them: pycocoevalcap's own PTBTokenizer on {id: [{"caption": ...}]}."""
    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(refs_per_sample)})
    return gts, res


def test_ptb_tokenize_lowercases_splits_and_drops_punctuation():
    assert ptb_tokenize({0: ["A red circle, on the LEFT."], 1: ["It's 3.5 m"]}) == {
        0: ["a red circle on the left"], 1: ["it 's 3.5 m"]}


def test_ptb_tokenize_keeps_captions_paired_across_line_breaks():
    """The java tokenizer reads one caption per line: a line break inside a caption must not shift later captions."""
    captions = {0: ["a\rb", "c\u2028d"], 1: ["e\x0bf"], 2: ["g\x0ch\x85i"], 3: ["last one"]}
    assert ptb_tokenize(captions) == {0: ["a b", "c d"], 1: ["e f"], 2: ["g h i"], 3: ["last one"]}


def test_caption_scores_equal_pycocoevalcap_on_the_same_tokens():
    gts, res = _coco(CAPTION_PREDS, [[r] for r in CAPTION_REFS])
    cider, per_image = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)

    result = get_scorer("caption", meteor=False)(CAPTION_PREDS, CAPTION_REFS)
    assert result.score == pytest.approx(100 * cider)
    assert result.details["CIDEr"] == pytest.approx(100 * cider)
    for n in range(4):
        assert result.details[f"Bleu_{n + 1}"] == pytest.approx(100 * bleu[n])
    assert result.details["ROUGE_L"] == pytest.approx(100 * rouge)
    expected_mean = 100 * (sum(bleu) + rouge + cider) / 6
    assert result.details["mean"] == pytest.approx(expected_mean)
    assert "METEOR" not in result.details and result.details["meteor"] == "off"
    assert result.per_sample == pytest.approx([min(1.0, max(0.0, c)) for c in per_image])
    assert per_image[0] > 1 and result.per_sample[0] == 1.0  # clipped
    assert 0 < result.per_sample[3] < 1

    mean_result = get_scorer("caption_mean", meteor=False)(CAPTION_PREDS, CAPTION_REFS)
    assert mean_result.score == pytest.approx(expected_mean)
    assert get_scorer("caption", report="mean", meteor=False)(CAPTION_PREDS, CAPTION_REFS).score \
        == pytest.approx(expected_mean)


def test_caption_tokenises_both_sides_in_one_java_call(monkeypatch):
    calls = []
    real = PTBTokenizer.tokenize
    monkeypatch.setattr(PTBTokenizer, "tokenize", lambda self, captions: calls.append(len(captions))
                        or real(self, captions))
    result = get_scorer("caption", meteor=False)(CAPTION_PREDS, CAPTION_REFS)
    assert calls == [2 * len(CAPTION_PREDS) + 1]  # references, predictions and the end marker together
    gts, res = _coco(CAPTION_PREDS, [[r] for r in CAPTION_REFS])
    assert result.score == pytest.approx(100 * Cider().compute_score(gts, res)[0])


def test_caption_uses_several_references_from_meta():
    many = [["a red circle on the left", "a circle that is red"], ["two blue squares"], ["a dog on grass"], ["a star"]]
    metas = [{"references": refs} for refs in many]
    gts, res = _coco(CAPTION_PREDS, many)
    cider, _ = Cider().compute_score(gts, res)
    result = get_scorer("caption", meteor=False)(CAPTION_PREDS, ["ignored"] * 4, metas)
    assert result.score == pytest.approx(100 * cider)
    with pytest.raises(EvalError, match="index 1 has no non-empty reference"):
        get_scorer("caption", meteor=False)(["x", "y"], ["a", "..."])
    with pytest.raises(EvalError, match=r"index 0: meta\['references'\]\[1\] is int"):
        get_scorer("caption", meteor=False)(["x"], ["a"], [{"references": ["a", 3]}])


def test_caption_empty_prediction_scores_zero_and_leaves_the_others_alone():
    base = get_scorer("caption", meteor=False)(CAPTION_PREDS, CAPTION_REFS)
    blank = get_scorer("caption", meteor=False)(["", *CAPTION_PREDS[1:]], CAPTION_REFS)
    assert blank.per_sample[0] == 0.0
    assert blank.per_sample[1:] == pytest.approx(base.per_sample[1:])


def test_caption_report_option_is_validated():
    with pytest.raises(EvalError, match="report must be"):
        get_scorer("caption", report="SPICE")
    with pytest.raises(EvalError, match="report='METEOR' needs meteor=True"):
        get_scorer("caption", report="METEOR", meteor=False)
    assert get_scorer("caption").meteor is True  # on by default: the papers' mean includes it


# --- vqa --------------------------------------------------------------------------------------------------------


def _leave_one_out(prediction, answers):
    """VQA accuracy from its definition: each human answer left out in turn, min(1, matches among the rest / 3)."""
    accuracies = []
    for left_out in range(len(answers)):
        rest = answers[:left_out] + answers[left_out + 1:]
        accuracies.append(min(1.0, sum(answer == prediction for answer in rest) / 3))
    return sum(accuracies) / len(accuracies)


@pytest.mark.parametrize(("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_the_leave_one_out_mean(matching, expected):
    others = ["cat", "bird", "horse", "cow", "sheep", "pig", "goat", "duck", "fox", "owl"]
    answers = ["dog"] * matching + others[: 10 - matching]
    assert _leave_one_out("dog", answers) == pytest.approx(expected)
    result = get_scorer("vqa")(["dog"], ["dog"], [{"references": answers}])
    assert result.per_sample == pytest.approx([expected])
    assert result.score == pytest.approx(100 * expected)


def test_vqa_normalises_prediction_and_human_answers_alike():
    answers = ["2", "two", "Two.", "2", "dog", "the dog.", "don't", "dont", "dog", "3"]
    metas = [{"references": answers}]
    normalised = [normalize_vqa_answer(a) for a in answers]
    for prediction, canonical in (("Two", "2"), ("the dog.", "dog"), ("dont", "don't"), ("DOG!", "dog")):
        assert normalize_vqa_answer(prediction) == canonical
        expected = _leave_one_out(canonical, normalised)
        assert get_scorer("vqa")([prediction], ["x"], metas).per_sample == pytest.approx([expected])
    assert get_scorer("vqa")(["2"], ["x"], metas).per_sample == [1.0]  # four answers say 2
    assert get_scorer("vqa")(["don't"], ["x"], metas).per_sample == pytest.approx([0.6])


@pytest.mark.parametrize(("text", "normalised"), [
    ("  Yes\n", "yes"), ("1,000", "1000"), ("3.5", "3.5"), ("3.", "3"), ("black/white", "black white"),
    ("black / white", "black white"), ("x-ray", "x ray"), ("an apple", "apple"), ("a", "a"), ("The", "the"),
    ("none", "0"), ("ten", "10"), ("eleven", "eleven"), ("youre", "you're"), ("it's", "it's"),
])
def test_vqa_answer_normalisation_rules(text, normalised):
    assert normalize_vqa_answer(text) == normalised


def test_vqa_empty_prediction_scores_zero_even_against_empty_human_answers():
    answers = ["", "", "", "", "yes", "yes", "yes", "yes", "...", "?"]
    result = get_scorer("vqa")(["", " . ", "yes"], ["x"] * 3, [{"references": answers}] * 3)
    assert result.per_sample == [0.0, 0.0, 1.0]


def test_vqa_details_and_mean():
    metas = [{"references": ["red"] * 10}, {"references": ["blue"] * 4 + ["green"] * 6}]
    result = get_scorer("vqa")(["red", "green"], ["red", "green"], metas)
    assert result.per_sample == [1.0, 1.0]
    assert result.details == {"n": 2, "answers_per_question": {"min": 10, "max": 10}}
    result = get_scorer("vqa")(["red", "blue"], ["a", "b"], [{"references": ["red"] * 5}, metas[1]])
    assert result.details["answers_per_question"] == {"min": 5, "max": 10}
    assert result.score == pytest.approx(100 * (1.0 + 1.0) / 2)


@pytest.mark.parametrize(("meta", "message"), [
    ({}, r"vqa: sample 1 has no list of human answers in meta\['references'\] \(got none\); vqa scoring needs the "
         r"human answers"),
    ({"references": "dog"}, r"sample 1 has no list of human answers .*\(got a str\)"),
    ({"references": ["dog", "dog", "dog"]}, r"sample 1 has 3 human answer\(s\).*at least 4"),
    ({"references": ["dog"] * 9 + [None]}, r"sample 1: meta\['references'\]\[9\] is NoneType"),
    ({"references": ["", "?", ".", " ", ""]}, r"the test file has no answer for sample 1"),
])
def test_vqa_refuses_questions_without_human_answers(meta, message):
    """Never scored against the single answer: that would be another metric under the VQA name."""
    with pytest.raises(EvalError, match=message):
        get_scorer("vqa")(["dog", "dog"], ["dog", "dog"], [{"references": ["dog"] * 10}, meta])


# --- id alignment -----------------------------------------------------------------------------------------------


def test_align_by_id_orders_by_reference_ids():
    ids, preds, refs = align_by_id({"b": "pb", "a": "pa"}, {"a": "ra", "b": "rb"})
    assert (ids, preds, refs) == (["a", "b"], ["pa", "pb"], ["ra", "rb"])


def test_align_by_id_lists_missing_and_extra_ids():
    refs = {f"img{i}": "r" for i in range(15)}
    preds = {f"img{i}": "p" for i in range(2, 15)} | {"stray": "p"}
    with pytest.raises(EvalError) as info:
        align_by_id(preds, refs)
    message = str(info.value)
    assert "2 reference id(s) without a prediction: 'img0', 'img1'" in message
    assert "1 prediction id(s) without a reference: 'stray'" in message
    many_missing = {"x": "p"}
    with pytest.raises(EvalError, match=r"15 reference id\(s\).*\.\.\. \(5 more\)"):
        align_by_id(many_missing, refs)


def test_scene_attributes_scores_each_attribute_the_count_and_the_word():
    ref = "scene: two objects; small red circle at top left; large blue square at center; text pen"
    assert parse_scene(ref) == ({"top left": ("small", "red", "circle"), "center": ("large", "blue", "square")},
                                "pen", "two")
    scorer = get_scorer("scene_attributes")
    # 3 + 3 attributes, the word and the count: 8 points; wrong colour at center and wrong count lose 2
    pred = "scene: three objects; small red circle at top left; large green square at center; text pen"
    result = scorer.score_aligned([pred, ref], [ref, ref], [{}, {}])
    assert result.per_sample == pytest.approx([6 / 8, 1.0])
    assert result.details["exact_match"] == pytest.approx(50.0)
    # an invented object costs a point; a missing count is simply wrong
    extra = "scene: small red circle at top left; large blue square at center; small red cross at top; text pen"
    assert scorer.score_aligned([extra], [ref], [{}]).per_sample == pytest.approx([7 / 9])


@pytest.mark.parametrize(("name", "options", "key", "expected"), [
    ("caption", {"meteor": "first"}, "meteor", r"boolean, got str \('first'\)"),
    ("iou", {"threshold": True}, "threshold", r"number, got bool \(True\)"),
    ("numeric", {"pick": 1}, "pick", r"string, got int \(1\)"),
    ("exact_match", {"lowercase": 1}, "normalizer.lowercase", r"boolean, got int \(1\)"),
    ("exact_match", {"normalizer": {"drop_articles": "no"}}, "normalizer.drop_articles", r"boolean, got str \('no'\)"),
])
def test_an_option_of_the_wrong_type_is_refused_by_name(name, options, key, expected):
    with pytest.raises(EvalError, match=rf"^scorer '{name}': {key}: expected {expected}$"):
        get_scorer(name, **options)


def test_an_integer_is_accepted_where_a_number_is_expected():
    assert get_scorer("iou", threshold=1)(["[0, 0, 1, 1]"], ["[0, 0, 1, 1]"]).per_sample == [1.0]
    assert get_scorer("numeric", abs_tol=1)(["3.5"], ["3"]).per_sample == [1.0]


NOT_TEXT = [None, 3, 2.5, True, b"yes", ["yes"], {"answer": "yes"}]


@pytest.mark.parametrize("name", sorted(SCORERS))
@pytest.mark.parametrize("bad", NOT_TEXT, ids=lambda v: type(v).__name__)
def test_scorers_refuse_non_text(name, bad):
    scorer = get_scorer(name)
    kind = type(bad).__name__
    with pytest.raises(EvalError, match=rf"^{scorer.name}: prediction at index 1 is {kind}, expected str$"):
        scorer(["yes", bad, "no"], ["yes", "no", "no"])
    with pytest.raises(EvalError, match=rf"^{scorer.name}: reference at index 2 is {kind}, expected str$"):
        scorer(["yes", "no", "no"], ["yes", "no", bad])
