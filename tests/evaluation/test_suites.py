"""Evaluation suites as data (eval/*.yaml): the shipped suites load and resolve to the cards' tasks; overrides,
inline tasks and `extends` work; every mistake is refused at load with the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcit.errors import EvalError
from mcit.evaluation.suites import available_suites, load_suite

RELEASES = Path(__file__).resolve().parents[1] / "fixtures" / "releases"


def test_shipped_suites_load_and_resolve_to_their_cards():
    assert {"synthcit-heldout", "ucit", "coin", "mllm-dcl"} <= set(available_suites())
    held = load_suite("synthcit-heldout")
    assert held.task_names() == ["ocr", "yesno", "grounding"]
    assert [(card.name, task) for card, task in held.resolve()] == [
        ("synthcit-coin", "ocr"), ("synthcit-coin", "yesno"), ("synthcit-coin", "grounding")]
    assert load_suite("ucit").task_names() == ["ImageNet-R", "ArxivQA", "VizWiz-caption", "IconQA", "CLEVR-Math",
                                               "Flickr30k"]


def test_a_card_task_resolves_with_the_suite_overrides_and_its_release_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("MCIT_UCIT_ROOT", str(RELEASES / "ucit-hide-llava"))
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ntasks:\n"
                    "  - {card: ucit, task: IconQA, name: icons, max_test: 1, scorer: numeric}\n"
                    "  - {card: ucit, task: Flickr30k}\n")
    (icons, name), (flickr, _) = load_suite(path).resolve()
    assert name == "icons" and icons.task_names == ["icons"]
    spec = icons.task("icons")  # the renamed task still finds its files in the detected layout
    assert (spec.scorer, spec.max_test, spec.test) == ("numeric", 1, "instructions/IconQA/test_3000.json")
    assert len(icons.load_task("icons", "test")) == 1
    assert [len(s.meta["references"]) for s in flickr.load_task("Flickr30k", "test")] == [5, 5]


def test_inline_tasks_and_extends(tmp_path):
    data = tmp_path / "digits"
    data.mkdir()
    (data / "test.json").write_text('[{"question_id": "d0", "text": "Which digit?", "answer": "7"}]')
    (tmp_path / "base.yaml").write_text("name: base\ngeneration: {max_new_tokens: 8}\n"
                                        "tasks:\n  - {name: digits, root: digits, test: test.json, "
                                        "answer_style: number, scorer: numeric}\n")
    (tmp_path / "more.yaml").write_text("extends: base.yaml\nname: more\ngeneration: {batch_size: 4}\n")
    suite = load_suite(tmp_path / "more.yaml")
    assert (suite.name, suite.generation.max_new_tokens, suite.generation.batch_size) == ("more", 8, 4)
    [(card, name)] = suite.resolve()
    [sample] = card.load_task(name, "test")
    assert (sample.answer, sample.meta["style"], card.task(name).scorer) == ("7", "number", "numeric")


@pytest.mark.parametrize(("text", "message"), [
    ("tasks:\n  - {card: synthcit-coin, task: ocr}\n", r"tasks\[0\]|name: required key is missing"),
    ("name: x\ntasks: []\n", r"tasks: expected a non-empty list"),
    ("name: x\ntasks:\n  - {card: synthcit-coin, task: orc}\n",
     r"tasks\[0\]\.task: 'orc' is not a task of card 'synthcit-coin'; did you mean 'ocr'"),
    ("name: x\ntasks:\n  - {card: synthcit-coin}\n", r"tasks\[0\]: a card task needs `task`"),
    ("name: x\ntasks:\n  - {card: synthcit-coin, task: ocr, test: t.json}\n", r"test belong to inline tasks"),
    ("name: x\ntasks:\n  - {name: d}\n", r"tasks\[0\]: expected `card` \+ `task`"),
    ("name: x\ntasks:\n  - {card: synthcit-coin, task: ocr}\n  - {card: synthcit-coin, task: ocr}\n",
     r"task name 'ocr' used twice"),
    ("name: x\nreport: [score, superficail]\ntasks:\n  - {card: synthcit-coin, task: ocr}\n",
     r"report: 'superficail' is not a column; did you mean 'superficial'"),
    ("name: x\ngeneration: {max_new_token: 3}\ntasks:\n  - {card: synthcit-coin, task: ocr}\n",
     r"generation\.max_new_token: unknown key; did you mean 'max_new_tokens'"),
    ("name: x\ntasks:\n  - {card: no-such-card, task: a}\n", r"no data card named 'no-such-card'"),
    ("name: x\ntasks:\n  - {name: d, test: t.json, scorer: exact_mach}\n",
     r"tasks\[0\]: .*scorer: 'exact_mach' is not valid; did you mean 'exact_match'"),
])
def test_mistakes_are_refused_with_the_key(tmp_path, text, message):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    with pytest.raises(Exception, match=message) as err:
        load_suite(path).resolve()
    assert isinstance(err.value, EvalError) or "no data card" in str(err.value)


def test_unknown_suite_name_lists_the_shipped_ones():
    with pytest.raises(EvalError, match=r"no evaluation suite named 'synthcit-heldot'; did you mean "
                                        r"'synthcit-heldout'"):
        load_suite("synthcit-heldot")
