"""Answer Style Diversification: right fractions, right styles, never the task's own style, deterministic."""

from __future__ import annotations

import pytest

from mcit.data.asd import diversify, diversify_with_stats
from mcit.data.records import Sample
from mcit.errors import DataError

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def color_samples(n=40, with_texts=True):
    samples = []
    for i in range(n):
        meta = {"style": "word"}
        if with_texts and i % 2 == 0:
            meta.update(brief=f"The object is {COLORS[i % 6]}, a plain colour on a grey background.",
                        detailed=f"The single object in the picture is {COLORS[i % 6]} with a long description.")
        samples.append(Sample(id=f"c{i}", task="color", image=f"/img/{i}.png",
                              turns=[("<image>\nWhat colour is the object?", COLORS[i % 6])], meta=meta))
    return samples


def mc_samples(n=30):
    samples = []
    for i in range(n):
        choices = ["circle", "square", "triangle", "star"]
        answer = "ABCD"[i % 4]
        samples.append(Sample(id=f"m{i}", task="shape", image=f"/img/m{i}.png",
                              turns=[("<image>\nWhich shape?\nA. circle\nB. square\nC. triangle\nD. star", answer)],
                              meta={"style": "letter", "choices": choices, "stem": "Which shape?"}))
    return samples


def test_fraction_per_task_and_equal_style_shares():
    samples = color_samples(40) + mc_samples(30)
    out, stats = diversify_with_stats(samples, 0.4, seed=3, answer_pool=None)
    assert [s.id for s in out] == [s.id for s in samples]
    color_styles = [s.meta.get("asd_style") for s in out if s.task == "color"]
    shape_styles = [s.meta.get("asd_style") for s in out if s.task == "shape"]
    # colour (word style): 16 chosen, 4 per style; the 8 brief/detailed picks without texts are skipped
    assert stats.per_task["color"]["yesno"] == 4 and stats.per_task["color"]["mc"] == 4
    # 16 colour + 12 shape picks; every pick is either converted or skipped (kept in its original style)
    assert sum(stats.converted.values()) + sum(stats.skipped.values()) == 28
    assert stats.skipped["brief"] >= 4 and stats.skipped["detailed"] >= 4  # shape samples carry no brief texts
    assert color_styles.count(None) == 40 - sum(stats.per_task["color"].values())
    # shape is a multiple-choice task: never converted into multiple choice
    assert "mc" not in shape_styles and stats.per_task["shape"]["mc"] == 0
    assert stats.per_task["shape"]["yesno"] == 4  # 12 chosen over yesno/brief/detailed
    assert stats.kept == 70 - sum(stats.converted.values())


def test_yes_no_conversion_uses_truth_or_a_distractor():
    out, _ = diversify_with_stats(color_samples(200), 1.0, styles=("yesno",), seed=0)
    answers = [s.answer for s in out]
    assert 60 < answers.count("yes") < 140 and answers.count("yes") + answers.count("no") == 200
    for before, after in zip(color_samples(200), out):
        candidate = after.question.split('Is the answer "')[1].split('"')[0]
        assert (candidate == before.answer) == (after.answer == "yes")
        assert candidate in COLORS
        assert after.turns[0][0].startswith("<image>\nWhat colour is the object?\n")
        assert after.meta["style"] == "yesno" and after.meta["candidates"] == ["yes", "no"]
        assert after.meta["asd_original_answer"] == before.answer


def test_multiple_choice_has_four_distinct_options_and_the_right_letter():
    out, stats = diversify_with_stats(color_samples(50), 1.0, styles=("mc",), seed=1)
    assert stats.converted["mc"] == 50
    letters = set()
    for before, after in zip(color_samples(50), out):
        options = after.meta["choices"]
        assert len(set(options)) == 4 and before.answer in options
        assert options[" ABCD".index(after.answer) - 1] == before.answer
        assert after.meta["style"] == "letter"
        letters.add(after.answer)
    assert letters == set("ABCD")  # the right answer is not always in the same slot


def test_letter_tasks_convert_the_option_text_not_the_letter():
    out, _ = diversify_with_stats(mc_samples(20), 1.0, styles=("yesno",), seed=0)
    for before, after in zip(mc_samples(20), out):
        truth = before.meta["choices"]["ABCD".index(before.answer)]
        candidate = after.question.split('Is the answer "')[1].split('"')[0]
        assert candidate in before.meta["choices"]
        assert (candidate == truth) == (after.answer == "yes")
        assert after.question.startswith("Which shape?\n")  # the stem, without the old option list
        assert "choices" not in after.meta


def test_brief_and_detailed_come_from_meta_else_rewriter_else_skipped():
    out, stats = diversify_with_stats(color_samples(20), 1.0, styles=("brief", "detailed"), seed=0)
    converted = [s for s in out if "asd_style" in s.meta]
    assert len(converted) == 10 and stats.skipped["brief"] + stats.skipped["detailed"] == 10
    for s in converted:
        assert s.answer == s.meta[s.meta["asd_style"]]

    def rewriter(sample, style):
        return f"{style} rewrite of {sample.answer}"

    out, stats = diversify_with_stats(color_samples(20, with_texts=False), 1.0, styles=("brief", "detailed"),
                                      rewriter=rewriter)
    assert stats.skipped == {"yesno": 0, "mc": 0, "brief": 0, "detailed": 0}
    assert {s.answer.split(" ")[0] for s in out} == {"brief", "detailed"}


def test_deterministic_by_seed():
    samples = color_samples(60)
    first = [s.to_dict() for s in diversify(samples, 0.5, seed=7)]
    assert first == [s.to_dict() for s in diversify(samples, 0.5, seed=7)]
    assert first != [s.to_dict() for s in diversify(samples, 0.5, seed=8)]
    assert all("asd_style" not in s.meta for s in samples)  # inputs untouched


def test_explicit_answer_pool_and_degenerate_inputs():
    samples = color_samples(10)
    out, stats = diversify_with_stats(samples, 1.0, styles=("mc",), answer_pool={"color": ["red", "x1", "x2", "x3"]})
    pool = {"red", "x1", "x2", "x3"}
    for before, after in zip(samples, out):
        assert before.answer in after.meta["choices"]
        assert set(after.meta["choices"]) - {before.answer} <= pool  # distractors only from the given pool
    assert diversify(samples, 0.0) == samples
    tiny = [Sample(id="t", task="t", image=None, turns=[("q", "only")], meta={})]
    _, stats = diversify_with_stats(tiny, 1.0, styles=("mc",))
    assert stats.skipped["mc"] == 1  # no distractors to draw from
    with pytest.raises(DataError, match="fraction"):
        diversify(samples, 1.5)
    with pytest.raises(DataError, match="unknown ASD styles"):
        diversify(samples, 0.5, styles=("haiku",))
