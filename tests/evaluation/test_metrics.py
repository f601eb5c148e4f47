"""Continual metrics on hand-computed matrices, validation errors, markdown rendering."""

import pytest

from mcit.errors import EvalError
from mcit.evaluation.metrics import METRICS, continual_metrics, matrix_to_markdown, metrics_to_markdown

# Zero-shot row + three sequential stages. Task 0 peaks after stage 2 (85), so forgetting != -BWT.
SEQ = [
    [10, 20, 30],
    [80, 25, 35],
    [85, 70, 40],
    [50, 65, 90],
]
SEQ_STAGES = [[], [0], [1], [2]]


def test_sequential_metrics_by_hand():
    m = continual_metrics(SEQ, SEQ_STAGES)
    assert m["MFT"] == pytest.approx((80 + 70 + 90) / 3)
    assert m["MFN"] == pytest.approx((50 + 65 + 90) / 3)
    assert m["MAA"] == pytest.approx((80 + (85 + 70) / 2 + (50 + 65 + 90) / 3) / 3)
    assert m["BWT"] == pytest.approx(((50 - 80) + (65 - 70)) / 2)
    assert m["forgetting"] == pytest.approx(((85 - 50) + (70 - 65)) / 2)
    assert m["FWT"] == pytest.approx(((25 - 20) + (40 - 30)) / 2)
    assert tuple(m) == METRICS  # the one list of metric names (report, export, bench) names what is computed


def test_joint_training_has_no_backward_or_forward_transfer():
    m = continual_metrics([[10, 20], [70, 90]], [[], [0, 1]])
    assert m["MFT"] == m["MFN"] == m["MAA"] == pytest.approx(80)
    assert m["BWT"] is None and m["forgetting"] is None and m["FWT"] is None


def test_partial_run_counts_only_tasks_trained_so_far():
    # results.json is rewritten after every stage: after stage 1 only task 0 counts.
    m = continual_metrics([[10, 20, 30], [80, 25, None]], [[], [0]])
    assert m["MFT"] == m["MFN"] == m["MAA"] == pytest.approx(80)
    assert m["BWT"] is None and m["FWT"] is None


def test_missing_cell_makes_only_the_metrics_that_need_it_none():
    matrix = [row[:] for row in SEQ]
    matrix[1][2] = None  # no metric reads task 2 after stage 1 (FWT uses the stage before it was trained: row 2)
    assert continual_metrics(matrix, SEQ_STAGES) == continual_metrics(SEQ, SEQ_STAGES)
    matrix[0][1] = None  # zero-shot score of task 1: only FWT needs it
    m = continual_metrics(matrix, SEQ_STAGES)
    assert m["FWT"] is None
    assert m["MFT"] == pytest.approx(80) and m["BWT"] == pytest.approx(-17.5)
    matrix[2][0] = None  # task 0 after stage 2: forgetting's max and MAA need it
    m = continual_metrics(matrix, SEQ_STAGES)
    assert m["forgetting"] is None and m["MAA"] is None
    assert m["BWT"] == pytest.approx(-17.5)


def test_two_tasks_in_one_stage_share_their_first_stage():
    # Stage 1 trains tasks 0 and 1 together, stage 2 trains task 2.
    matrix = [[10, 20, 30], [80, 60, 35], [70, 50, 90]]
    m = continual_metrics(matrix, [[], [0, 1], [2]])
    assert m["MFT"] == pytest.approx((80 + 60 + 90) / 3)
    assert m["MAA"] == pytest.approx(((80 + 60) / 2 + (70 + 50 + 90) / 3) / 2)
    assert m["BWT"] == pytest.approx(((70 - 80) + (50 - 60)) / 2)
    assert m["FWT"] == pytest.approx(35 - 30)


@pytest.mark.parametrize(
    ("matrix", "stage_tasks", "message"),
    [
        ([], [], "empty"),
        ([[1, 2], [3]], [[], [0]], "row 1 has 1 columns, row 0 has 2"),
        ([[1, 2], [3, "x"]], [[], [0]], r"\[row 1\]\[column 1\]"),
        ([[1, 2], [3, float("nan")]], [[], [0]], r"\[row 1\]\[column 1\]"),
        ([[1, 2], [3, 4]], [[]], "1 entries but the matrix has 2 rows"),
        ([[1, 2], [3, 4]], [[0], [1]], r"stage_tasks\[0\] must be \[\]"),
        ([[1, 2], [3, 4]], [[], []], r"stage_tasks\[1\] is empty"),
        ([[1, 2], [3, 4]], [[], [2]], r"stage_tasks\[1\] names task 2; valid task indices are 0..1"),
    ],
)
def test_validation_errors_name_row_and_column(matrix, stage_tasks, message):
    with pytest.raises(EvalError, match=message):
        continual_metrics(matrix, stage_tasks)


def test_matrix_to_markdown():
    text = matrix_to_markdown([[10, None], [80.25, 25]], ["zero-shot", "a|b"], ["a|b", "c"], digits=1)
    assert text.splitlines() == [
        r"| stage | a\|b | c |",
        "|---|---:|---:|",
        "| zero-shot | 10.0 | – |",
        r"| a\|b | 80.2 | 25.0 |",
    ]
    with pytest.raises(EvalError, match="row 1 .* has 1 columns for 2 tasks"):
        matrix_to_markdown([[1, 2], [3]], ["z", "a"], ["a", "b"])
    with pytest.raises(EvalError, match="1 stage labels for a matrix of 2 rows"):
        matrix_to_markdown([[1], [2]], ["z"], ["a"])


def test_metrics_to_markdown_flat_and_labelled():
    m = continual_metrics(SEQ, SEQ_STAGES)
    flat = metrics_to_markdown(m, digits=2).splitlines()
    assert flat[0] == "| MFT | MFN | MAA | BWT | forgetting | FWT |"
    assert flat[2] == "| 80.00 | 68.33 | 75.28 | -17.50 | 20.00 | 7.50 |"
    joint = continual_metrics([[10, 20], [70, 90]], [[], [0, 1]])
    rows = metrics_to_markdown({"seq": m, "joint": joint}).splitlines()
    assert rows[0].startswith("| | MFT |")
    assert rows[3] == "| joint | 80.0 | 80.0 | 80.0 | – | – | – |"


def test_columns_restrict_metrics_to_a_subset_of_tasks():
    # task 1 is a caption task: no constrained score (None) and trained alone at stage 2
    matrix = [[None, None, None], [80, None, None], [60, None, None], [50, None, 90]]
    stages = [[], [0], [1], [2]]
    m = continual_metrics(matrix, stages, columns=[0, 2])
    assert m["MFT"] == pytest.approx((80 + 90) / 2)
    assert m["MFN"] == pytest.approx((50 + 90) / 2)
    assert m["BWT"] == pytest.approx(50 - 80)
    assert m["MAA"] == pytest.approx((80 + 60 + (50 + 90) / 2) / 3)
    # without the restriction, the None cells of task 1 make every metric that needs them None
    assert continual_metrics(matrix, stages)["MFT"] is None
