"""Evaluation helpers: constrained-scoring candidates (clear errors for malformed metadata), default output folder."""

from __future__ import annotations

import pytest

from mcit.data.records import Sample
from mcit.errors import EvalError
from mcit.evaluation.evaluate import _candidates, _constrained_hit


def sample(**meta) -> Sample:
    return Sample(id="s1", task="t", image=None, turns=[("Which?", "A")], meta=meta)


def test_letters_follow_the_number_of_choices_and_candidates_are_copied():
    assert _candidates(sample(style="letter", choices=["x", "y", "z"])) == ["A", "B", "C"]
    assert _candidates(sample(style="letter")) == ["A", "B", "C", "D"]
    assert _candidates(sample(candidates=("circle", "square"))) == ["circle", "square"]
    assert _candidates(sample(style="word")) is None and _candidates(sample(candidates=[])) is None


@pytest.mark.parametrize("meta", [{"style": "letter", "choices": "ABCD"}, {"style": "letter", "choices": 4},
                                  {"style": "letter", "choices": list(range(27))}, {"candidates": "circle"},
                                  {"candidates": ["circle", 3]}, {"candidates": ["circle", ""]}])
def test_malformed_metadata_is_an_eval_error_naming_the_sample(meta):
    with pytest.raises(EvalError, match="sample 's1' \\(task 't'\\)"):
        _candidates(sample(**meta))


def test_constrained_choice_counts_when_it_normalises_to_the_reference():
    assert _constrained_hit("Circle.", "circle") and _constrained_hit("3", "three")
    assert not _constrained_hit("circle", "circles")


def test_default_eval_output_keeps_stage_folders_clean(tmp_path):
    from mcit.workflows.evaluate import default_output

    stage = tmp_path / "run" / "checkpoints" / "stage-02-count"
    stage.mkdir(parents=True)
    (stage / "method.json").write_text("{}")
    assert default_output(stage, "synthcit") == tmp_path / "run" / "eval" / "stage-02-count-synthcit"
    folder = tmp_path / "exported"
    folder.mkdir()
    assert default_output(folder, "synthcit") == folder / "eval-synthcit"
    assert default_output(tmp_path / "org/model-id", "synthcit").name == "eval-synthcit"
