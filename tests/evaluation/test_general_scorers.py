"""The general-ability benchmark scorers (mcit/evaluation/general.py): hand-computed cases for each rule."""

from __future__ import annotations

import pytest

from mcit.errors import EvalError
from mcit.evaluation import get_scorer
from mcit.evaluation.general import MME_COGNITION, MME_PERCEPTION, mme_answer, pope_answer

# --- MME ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prediction", "parsed"), [
    ("Yes", "yes"), ("NO", "no"), (" yes ", "yes"), ("Yes, there is a dog.", "yes"), ("Nothing", "no"),
    ("Not really", "no"), ("nope", "no"), ("The answer is yes", "other"), ("I think yes", "other"), ("", "other"),
])
def test_mme_reads_yes_no_from_the_first_four_characters(prediction, parsed):
    assert mme_answer(prediction) == parsed


def _mme_rows():
    rows = [  # (category, image, reference, prediction)
        ("existence", "a.jpg", "Yes", "Yes, there is."),  # right
        ("existence", "a.jpg", "No", "No"),  # right -> image a counts for acc+
        ("existence", "b.jpg", "Yes", "no"),  # wrong
        ("existence", "b.jpg", "No", "no."),  # right
        ("OCR", "c.jpg", "Yes", "The answer is yes"),  # "other": wrong
        ("OCR", "c.jpg", "No", "nope"),  # right
        ("code_reasoning", "d.png", "Yes", ""),  # empty: wrong
        ("code_reasoning", "d.png", "No", "Not really"),  # right
    ]
    metas = [{"category": c, "image_id": img} for c, img, _, _ in rows]
    return [r[3] for r in rows], [r[2] for r in rows], metas


def test_mme_acc_plus_pairs_and_perception_cognition_sums():
    predictions, references, metas = _mme_rows()
    result = get_scorer("mme")(predictions, references, metas)
    subtasks = result.details["subtasks"]
    assert subtasks["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert subtasks["OCR"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert subtasks["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert result.details["perception"] == 175.0
    assert result.details["cognition"] == 50.0
    assert result.details["total"] == 225.0
    assert result.details["other"] == 2
    assert result.per_sample == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert result.score == pytest.approx(225.0 / (2 * 3))  # mean subtask score / 2
    assert set(result.details["missing_subtasks"]) == set(MME_PERCEPTION + MME_COGNITION) - set(subtasks)


def test_mme_perfect_subtask_scores_200_and_normalises_to_100():
    result = get_scorer("mme")(["yes", "no"], ["yes", "no"], [{"category": "count", "image_id": 7}] * 2)
    assert result.details["subtasks"]["count"]["score"] == 200.0 and result.score == 100.0
    assert result.details["cognition"] == 0.0


def test_mme_errors_name_the_sample_and_key():
    scorer = get_scorer("mme")
    with pytest.raises(EvalError, match=r"mme: sample at index 1 has no meta\['image_id'\]"):
        scorer(["yes", "no"], ["yes", "no"], [{"category": "count", "image_id": 1}, {"category": "count"}])
    with pytest.raises(EvalError, match=r"mme: sample at index 0 has no meta\['category'\]"):
        scorer(["yes"], ["yes"], [{"image_id": 1}])
    with pytest.raises(EvalError, match=r"'counting' is not an MME subtask"):
        scorer(["yes"], ["yes"], [{"category": "counting", "image_id": 1}])
    with pytest.raises(EvalError, match=r"image 1 has 3 question\(s\)"):
        scorer(["yes"] * 3, ["yes"] * 3, [{"category": "count", "image_id": 1}] * 3)
    with pytest.raises(EvalError, match=r"reference at index 0 \('maybe'\) must be 'yes' or 'no'"):
        scorer(["yes", "no"], ["maybe", "no"], [{"category": "count", "image_id": 1}] * 2)


# --- POPE -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prediction", "parsed"), [
    ("No, there is not.", "no"), ("Yes.", "yes"), ("There is a dog", "yes"), ("There is not a dog.", "no"),
    ("no", "no"), ("Yes. There is no dog.", "yes"), ("NOT", "yes"), ("Nope", "yes"),
])
def test_pope_reads_the_first_sentence_for_no_words(prediction, parsed):
    assert pope_answer(prediction) == parsed


def _pope_rows():
    rows = [  # (reference, prediction, category) -> cell
        ("yes", "Yes.", "random"),  # TP
        ("yes", "Yes, there is a dog", "random"),  # TP
        ("yes", "No, there is not.", "random"),  # FN
        ("no", "There is a dog", "adversarial"),  # FP
        ("no", "No.", "adversarial"),  # TN
        ("no", "", "adversarial"),  # empty: never right -> FP
    ]
    return [r[1] for r in rows], [r[0] for r in rows], [{"category": r[2]} for r in rows]


def test_pope_metrics_on_a_small_confusion_matrix():
    predictions, references, metas = _pope_rows()
    result = get_scorer("pope")(predictions, references, metas)
    d = result.details
    assert (d["TP"], d["FP"], d["TN"], d["FN"]) == (2, 2, 1, 1)
    assert d["accuracy"] == pytest.approx(50.0)
    assert d["precision"] == pytest.approx(50.0)
    assert d["recall"] == pytest.approx(100 * 2 / 3)
    assert d["f1"] == pytest.approx(100 * 4 / 7)  # 2 * 1/2 * 2/3 / (1/2 + 2/3)
    assert d["yes_ratio"] == pytest.approx(100 * 4 / 6)
    assert d["empty"] == 1
    assert result.score == pytest.approx(100 * 4 / 7)
    assert result.per_sample == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    random, adversarial = d["by_category"]["random"], d["by_category"]["adversarial"]
    assert random["precision"] == pytest.approx(100.0) and random["f1"] == pytest.approx(80.0)
    assert adversarial["precision"] == 0.0 and adversarial["recall"] == 0.0 and adversarial["f1"] == 0.0


def test_pope_report_accuracy_and_bad_options():
    predictions, references, metas = _pope_rows()
    assert get_scorer("pope", report="accuracy")(predictions, references, metas).score == pytest.approx(50.0)
    assert "by_category" not in get_scorer("pope")(predictions, references).details
    with pytest.raises(EvalError, match="pope: report must be one of f1, accuracy"):
        get_scorer("pope", report="F1")
    with pytest.raises(EvalError, match=r"pope: reference at index 1 \('A'\) must be 'yes' or 'no'"):
        get_scorer("pope")(["yes", "yes"], ["yes", "A"])


def test_pope_empty_prediction_is_never_right_for_either_answer():
    result = get_scorer("pope")(["", " ", "."], ["yes", "no", "no"])
    assert result.per_sample == [0.0, 0.0, 0.0]
    assert (result.details["FN"], result.details["FP"]) == (1, 2)


# --- MMBench --------------------------------------------------------------------------------------------------------


def _mmbench_rows():
    base = ["cat", "dog", "cow"]
    rows = [  # (index, choices of the rotated copy, reference letter, prediction, category)
        (1, base, "A", "A", "attribute"),
        (1_000_001, ["dog", "cow", "cat"], "C", "C. cat", "attribute"),
        (2_000_001, ["cow", "cat", "dog"], "B", "cat", "attribute"),  # option text counts
        (2, base, "B", "B", "relation"),
        (1_000_002, ["dog", "cow", "cat"], "A", "The answer is A", "relation"),
        (2_000_002, ["cow", "cat", "dog"], "C", "B", "relation"),  # the one wrong copy
    ]
    metas = [{"index": i, "choices": c, "category": cat} for i, c, _, _, cat in rows]
    return [r[3] for r in rows], [r[2] for r in rows], metas


def test_mmbench_one_wrong_copy_fails_its_question_while_vanilla_counts_the_others():
    predictions, references, metas = _mmbench_rows()
    result = get_scorer("mmbench")(predictions, references, metas)
    assert result.score == 50.0
    assert result.details["vanilla"] == pytest.approx(100 * 5 / 6)
    assert result.details["questions"] == 2
    assert result.per_sample == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert result.details["by_category"] == {"attribute": 100.0, "relation": 0.0}


def test_mmbench_groups_by_circular_group_and_empty_copies_fail():
    metas = [{"index": "q", "circular_group": "g1"}, {"index": "q2", "circular_group": "g1"},
             {"index": "q3", "circular_group": "g2"}]
    result = get_scorer("mmbench")(["A", "B", ""], ["A", "B", "C"], metas)
    assert result.score == 50.0 and result.per_sample == [1.0, 1.0, 0.0]
    assert result.details["vanilla"] == pytest.approx(100 * 2 / 3)


def test_mmbench_missing_index_is_an_error_naming_it():
    with pytest.raises(EvalError, match=r"mmbench: sample at index 1 has no meta\['index'\]"):
        get_scorer("mmbench")(["A", "A"], ["A", "A"], [{"index": 1}, {}])
    with pytest.raises(EvalError, match=r"meta\['index'\] must be an integer"):
        get_scorer("mmbench")(["A"], ["A"], [{"index": "q1"}])


# --- SEED-Bench -----------------------------------------------------------------------------------------------------


def test_seed_bench_overall_and_per_dimension_accuracy():
    rows = [  # (question_type_id, reference, prediction)
        (1, "A", "A"),
        ("1", "C", "(B)"),  # wrong; the id may be a digit string
        (9, "B", "B"),
        (10, "D", "D. The man opens the door"),
        (10, "A", ""),  # empty: never right
        (11, "B", "E"),  # no such option: unparsed, wrong
    ]
    result = get_scorer("seed_bench")([r[2] for r in rows], [r[1] for r in rows],
                                      [{"question_type_id": r[0]} for r in rows])
    assert result.per_sample == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert result.score == pytest.approx(50.0)
    assert result.details["dimensions"] == {"Scene Understanding": 50.0, "Text Understanding": 100.0,
                                            "Action Recognition": 50.0, "Action Prediction": 0.0}
    assert result.details["image"] == pytest.approx(100 * 2 / 3)
    assert result.details["video"] == pytest.approx(100 / 3)
    assert result.details["unparsed"] == 2


def test_seed_bench_errors_name_the_sample_and_key():
    scorer = get_scorer("seed_bench")
    with pytest.raises(EvalError, match=r"seed_bench: sample at index 0 has no meta\['question_type_id'\]"):
        scorer(["A"], ["A"], [{}])
    with pytest.raises(EvalError, match=r"reference at index 0 \('E'\) is not an option letter A-D"):
        scorer(["A"], ["E"], [{"question_type_id": 3}])
    with pytest.raises(EvalError, match=r"meta\['question_type_id'\] must be an integer"):
        scorer(["A"], ["A"], [{"question_type_id": "scene"}])


@pytest.mark.parametrize("name", ["mme", "pope", "mmbench", "seed_bench"])
def test_empty_predictions_never_score(name):
    metas = {"mme": {"category": "color", "image_id": 1}, "pope": {}, "mmbench": {"index": 3},
             "seed_bench": {"question_type_id": 2}}[name]
    refs = ["yes", "no"] if name in ("mme", "pope") else ["A", "A"]
    result = get_scorer(name)(["", "  "], refs, [metas, metas])
    assert result.per_sample == [0.0, 0.0] and result.score == 0.0
