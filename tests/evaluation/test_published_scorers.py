"""mllm_dcl: MLLM-DCL's per-domain rules as MCITlib scores them. Expected values follow the rule text (module docstring
of mcit.evaluation.published), including the reference's quirks, since the published numbers include them."""

import pytest

from mcit.errors import EvalError
from mcit.evaluation.published import MLLM_DCL_RULES
from mcit.evaluation.scorers import get_scorer


def score(rule: str, prediction: str, reference: str, meta: dict | None = None) -> float:
    return get_scorer("mllm_dcl", rule=rule)([prediction], [reference], [meta or {}]).per_sample[0]


# --- ai2d (RS, AD) --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # multi-word answer: plain substring, case-insensitive, spacing must match
        ("There is a Parking Lot here.", "parking lot", 1.0),
        ("parkinglot", "parking lot", 0.0),
        ("parking  lot", "parking lot", 0.0),
        # one-word answer, prediction with spaces: " a", "a ", "a." or "a," must occur
        ("the answer is cat.", "cat", 1.0),
        ("Cat, clearly", "cat", 1.0),
        ("cat is shown", "cat", 1.0),
        ("category is the answer", "cat", 0.0),
        ("the answer is category", "cat", 1.0),  # " cat" occurs: the boundary is only rough
        ("two bobcats sit", "cat", 0.0),
        # one-word answer, prediction without spaces: plain substring
        ("Cat", "cat", 1.0),
        ("category", "cat", 1.0),
        ("dog", "cat", 0.0),
        # periods are removed from a one-word answer only
        ("the us.", "U.S.", 1.0),
        ("2.5", "2.5", 0.0),  # the answer became "25"
        ("25", "2.5", 1.0),
    ],
)
def test_ai2d_rule(prediction, reference, expected):
    assert score("ai2d", prediction, reference) == expected


# --- pvqa (Med) -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Yes", "yes", 1.0),
        ("yes, it is", "yes", 1.0),
        ("no", "yes", 0.0),
        ("Eyes", "yes", 1.0),  # substring without any boundary
        ("Lung tissue with fibrosis", "fibrosis", 1.0),
        ("fibrotic", "fibrosis", 0.0),
    ],
)
def test_pvqa_rule(prediction, reference, expected):
    assert score("pvqa", prediction, reference) == expected


# --- sci (Sci) ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["AI2D", "TQA", "VQA", "SciVerse"])
def test_sci_exact_sources_need_equality_after_lower_casing(source):
    meta = {"image_name": f"{source}_00012.png"}
    assert score("sci", "b", "B", meta) == 1.0
    assert score("sci", "  B  ", "B", meta) == 1.0  # the inference script strips its output
    assert score("sci", "b.", "B", meta) == 0.0
    assert score("sci", "The answer is B", "B", meta) == 0.0


def test_sci_source_is_the_prefix_before_the_first_underscore_case_sensitive():
    question = {"question": "What is the value in Ohio?"}
    # MapQA falls back to substring, so "the answer is b" tells which branch ran
    assert score("sci", "the answer is b", "B", {"image_name": "AI2D_x_1.png", **question}) == 0.0
    assert score("sci", "the answer is b", "B", {"image_name": "ai2d_1.png", **question}) == 1.0
    assert score("sci", "the answer is b", "B", {"image_name": "TQAx_1.png", **question}) == 1.0
    assert score("sci", "the answer is b", "B", {"image_name": "images/TQA_1.png"}) == 0.0


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("texas, ohio", "texas, ohio, utah", 2 / 3),
        ("Texas, Ohio, Utah", "texas, ohio, utah", 1.0),
        ("texas, ohio, utah, iowa", "texas, ohio", 1.0),  # extra states cost nothing
        ("texas,ohio", "texas, ohio", 0.5),  # items are not trimmed: " ohio" is not "ohio"
        ("utah", "texas, ohio", 0.0),
    ],
)
def test_sci_mapqa_which_states_gets_partial_credit(prediction, reference, expected):
    meta = {"image_name": "map_17.png", "question": "Which states have the highest value?"}
    assert score("sci", prediction, reference, meta) == pytest.approx(expected)


def test_sci_mapqa_other_questions_use_substring():
    meta = {"image_name": "17.png", "question": "What is the highest value in the Midwest?"}
    assert score("sci", "It is 45-50%", "45-50%", meta) == 1.0
    assert score("sci", "45", "45-50%", meta) == 0.0
    # the list cue is case-sensitive: a lower-case "which states" is not a list question
    listing = {"image_name": "17.png", "question": "which states are shaded?"}
    assert score("sci", "texas, ohio", "texas, ohio, utah", listing) == 0.0


def test_sci_partial_credit_keeps_task_score_a_mean():
    metas = [{"image_name": "m_1.png", "question": "Which states border x?"}, {"image_name": "AI2D_2.png"}]
    result = get_scorer("mllm_dcl", rule="sci")(["texas, ohio", "c"], ["texas, ohio, utah", "C"], metas)
    assert result.per_sample == pytest.approx([2 / 3, 1.0])
    assert result.score == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert result.details["sources"] == {"AI2D": 1, "MapQA": 1}


def test_sci_missing_meta_is_an_error_naming_the_key():
    scorer = get_scorer("mllm_dcl", rule="sci")
    with pytest.raises(EvalError, match=r"index 1 needs meta\['image_name'\]"):
        scorer(["b", "b"], ["B", "B"], [{"image_name": "AI2D_1.png"}, {"question": "q"}])
    with pytest.raises(EvalError, match=r"index 0 needs meta\['question'\]"):
        scorer(["texas"], ["texas"], [{"image_name": "map_1.png"}])
    with pytest.raises(EvalError, match=r"needs meta\['image_name'\] as text \(got int\)"):
        scorer(["b"], ["B"], [{"image_name": 3}])
    # exact-match sources never read the question
    assert scorer(["b"], ["B"], [{"image_name": "VQA_1.png"}]).per_sample == [1.0]


# --- finvis (Fin) ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("B.", "b", 1.0),
        ("B", "B", 1.0),
        ("Yes", "yes", 1.0),
        ("Yes.", "Yes", 1.0),
        ("B is right", "B", 0.0),
        ("(B)", "B", 0.0),
        ("No", "Yes", 0.0),
        ("B", "B ", 0.0),  # the answer is not trimmed
    ],
)
def test_finvis_rule(prediction, reference, expected):
    assert score("finvis", prediction, reference) == expected


# --- common rules ---------------------------------------------------------------------------------------------------

MAPQA_LIST = {"image_name": "m_1.png", "question": "Which states are shaded?"}


@pytest.mark.parametrize("rule", MLLM_DCL_RULES)
def test_unanswerable_scores_zero_case_sensitively(rule):
    meta = MAPQA_LIST if rule == "sci" else {}
    result = get_scorer("mllm_dcl", rule=rule)(["Unanswerable", "unanswerable"], ["unanswerable"] * 2, [meta, meta])
    assert result.per_sample == [0.0, 1.0]
    assert result.details["unanswerable"] == 1
    assert result.score == 50.0  # the skipped sample stays in the denominator


@pytest.mark.parametrize("rule", MLLM_DCL_RULES)
@pytest.mark.parametrize("prediction", ["", "   ", ",", "."])
def test_a_prediction_without_content_is_never_correct(rule, prediction):
    # "texas,,ohio" has an empty item that "" or "," would match under the bare reference rule
    meta = MAPQA_LIST if rule == "sci" else {}
    assert score(rule, prediction, "texas,,ohio", meta) == 0.0


@pytest.mark.parametrize("rule", MLLM_DCL_RULES)
@pytest.mark.parametrize("reference", ["", " ", "."])
def test_an_empty_reference_is_an_error_naming_the_index(rule, reference):
    meta = MAPQA_LIST if rule == "sci" else {}
    with pytest.raises(EvalError, match="sample 1"):
        get_scorer("mllm_dcl", rule=rule)(["a", "a"], ["a", reference], [meta, meta])


# --- options --------------------------------------------------------------------------------------------------------


def test_unknown_rule_is_an_error_listing_the_rules():
    with pytest.raises(EvalError, match="unknown rule 'medical'; valid rules: ai2d, pvqa, sci, finvis"):
        get_scorer("mllm_dcl", rule="medical")
    with pytest.raises(EvalError, match="rule: expected"):
        get_scorer("mllm_dcl", rule=3)
    with pytest.raises(EvalError, match="unknown key"):
        get_scorer("mllm_dcl", rule="ai2d", rules="sci")


def test_scoring_without_a_rule_is_an_error_naming_the_card_key():
    scorer = get_scorer("mllm_dcl")
    with pytest.raises(EvalError, match=r"no rule chosen; set the task's scorer_options: \{rule: <rule>\}"):
        scorer(["a"], ["a"])


def test_the_same_prediction_is_scored_differently_per_rule():
    # one case whose verdict flips with the rule, so a rule silently ignored would fail
    meta = {"image_name": "AI2D_1.png"}
    verdicts = {rule: score(rule, "b.", "B", meta) for rule in MLLM_DCL_RULES}
    assert verdicts == {"ai2d": 1.0, "pvqa": 1.0, "sci": 0.0, "finvis": 1.0}
    verdicts = {rule: score(rule, "category", "cat", {"image_name": "AI2D_1.png"}) for rule in MLLM_DCL_RULES}
    assert verdicts == {"ai2d": 1.0, "pvqa": 1.0, "sci": 0.0, "finvis": 0.0}
