"""Data cards: schema validation with actionable messages, root expansion, task loading, and the shipped cards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcit.data.cards import DataCard, TaskSpec, load_card
from mcit.errors import DataError


def test_shipped_cards_score_as_their_releases():
    """The scorer of every task of the shipped cards (what each one does: tests/data/test_releases.py and the
    scorer tests)."""
    ucit = load_card("ucit")
    assert {t.name: t.scorer for t in ucit.tasks} == {
        "ImageNet-R": "exact_match", "ArxivQA": "exact_match", "VizWiz-caption": "caption", "IconQA": "exact_match",
        "CLEVR-Math": "exact_match", "Flickr30k": "caption"}
    assert all(t.scorer_options.get("report") == "mean" for t in ucit.tasks if t.scorer == "caption")
    assert {t.name: t.scorer_options["rule"] for t in load_card("mllm-dcl").tasks} == {
        "RS": "ai2d", "Med": "pvqa", "AD": "ai2d", "Sci": "sci", "Fin": "finvis"}
    coin = {t.name: t for t in load_card("coin").tasks}  # the specs as written (no data needed)
    assert (coin["Grounding"].scorer, coin["Grounding"].box_frame) == ("iou", "square")
    assert coin["TextVQA"].scorer == "vqa"


def test_unset_root_variable_is_named(monkeypatch):
    monkeypatch.delenv("MCIT_UCIT_ROOT", raising=False)
    card = load_card("ucit")  # loading needs no data: recipes can name the card anywhere
    with pytest.raises(DataError, match="needs the environment variable MCIT_UCIT_ROOT"):
        card.load_task("ArxivQA", "train")


def write_card(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "card.yaml"
    path.write_text(text)
    return path


BASE = """name: toy
root: data
tasks:
  - name: colors
    train: train.json
    test: test.json
    answer_style: word
"""


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write_card(tmp_path, BASE + "    scorer_option: {}\n")
    with pytest.raises(DataError, match=r"card\.yaml: tasks\[0\]\.scorer_option: unknown key; did you mean "
                                        r"'scorer_options'\?"):
        load_card(path)
    with pytest.raises(DataError, match=r"descripton: unknown key; did you mean 'description'"):
        load_card(write_card(tmp_path, "descripton: x\n" + BASE))


def test_wrong_types_and_values_name_the_key_path(tmp_path):
    with pytest.raises(DataError, match=r"tasks\[0\]\.max_train: expected integer or null, got str"):
        load_card(write_card(tmp_path, BASE + "    max_train: ten\n"))
    with pytest.raises(DataError, match=r"tasks\[0\]\.scorer: 'exact_mach' is not valid; did you mean 'exact_match'"):
        load_card(write_card(tmp_path, BASE + "    scorer: exact_mach\n"))
    with pytest.raises(DataError, match=r"tasks\[0\]\.candidates: expected a list of answers or 'auto'"):
        load_card(write_card(tmp_path, BASE + "    candidates: some\n"))
    with pytest.raises(DataError, match=r"tasks\[1\]\.name: duplicate task name 'colors'"):
        load_card(write_card(tmp_path, BASE + "  - {name: colors, test: t.json}\n"))
    with pytest.raises(DataError, match=r"tasks\[0\]\.name: required key is missing"):
        load_card(write_card(tmp_path, "name: toy\ntasks:\n  - {train: a.json}\n"))
    with pytest.raises(DataError, match=r"tasks\[1\]: expected a mapping, got str \('colors'\)"):
        load_card(write_card(tmp_path, BASE + "  - colors\n"))
    with pytest.raises(DataError, match=r"tasks: expected a non-empty list of task mappings"):
        load_card(write_card(tmp_path, "name: toy\ntasks: []\n"))
    with pytest.raises(DataError, match=r"tasks\[0\]\.answer_style: 'wrd' is not valid; did you mean 'word'"):
        load_card(write_card(tmp_path, BASE.replace("answer_style: word", "answer_style: wrd")))


def test_the_card_file_is_not_a_key(tmp_path):
    path = write_card(tmp_path, BASE)
    assert load_card(path).path == path.resolve()
    with pytest.raises(DataError, match=r"path: unknown key; valid keys: name, tasks, description, root, citation, "
                                        r"generator, layouts, layout$"):
        load_card(write_card(tmp_path, "path: elsewhere.yaml\n" + BASE))


def test_root_expansion(tmp_path, monkeypatch):
    monkeypatch.delenv("MCIT_TEST_ROOT", raising=False)
    relative = load_card(write_card(tmp_path, BASE))
    assert relative.root_dir == tmp_path / "data"  # relative to the card file, not the working directory
    default = load_card(write_card(tmp_path, BASE.replace("root: data", "root: ${MCIT_TEST_ROOT:-/srv/toy}")))
    assert default.root_dir == Path("/srv/toy")
    monkeypatch.setenv("MCIT_TEST_ROOT", "/mnt/elsewhere")
    assert default.root_dir == Path("/mnt/elsewhere")
    home = load_card(write_card(tmp_path, BASE.replace("root: data", "root: ~/toy")))
    assert home.root_dir == Path.home() / "toy"


def test_unknown_card_name_lists_and_suggests():
    with pytest.raises(DataError, match=r"no data card named 'ucti'; did you mean 'ucit'"):
        load_card("ucti")


def make_task_data(root: Path, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    colors = ["red", "green", "blue"]
    train = [{"id": f"s{i}", "conversations": [{"from": "human", "value": f"Colour {i}?"},
                                                 {"from": "gpt", "value": colors[i % 3]}]} for i in range(n)]
    (root / "train.json").write_text(json.dumps(train))
    test = [{"question_id": f"q{i}", "text": f"Test colour {i}?", "answer": colors[i % 3]} for i in range(n)]
    (root / "test.json").write_text(json.dumps(test))


def test_load_task_attaches_style_candidates_and_suffix(tmp_path):
    make_task_data(tmp_path / "data", 6)
    text = BASE + "    candidates: auto\n    instruction_suffix: Answer with one word.\n"
    card = load_card(write_card(tmp_path, text))
    samples = card.load_task("colors", "test")
    assert [s.meta["candidates"] for s in samples[:1]] == [["blue", "green", "red"]]
    assert samples[0].turns[0][0] == "Test colour 0?\nAnswer with one word."
    assert {s.meta["style"] for s in samples} == {"word"}


def test_subsampling_is_deterministic_by_seed_and_keeps_file_order(tmp_path):
    make_task_data(tmp_path / "data", 50)
    card = load_card(write_card(tmp_path, BASE + "    max_train: 10\n"))
    ids = [s.id for s in card.load_task("colors", "train", seed=1)]
    assert len(ids) == 10 and ids == sorted(ids, key=lambda x: int(x[1:]))
    assert ids == [s.id for s in card.load_task("colors", "train", seed=1)]
    assert ids != [s.id for s in card.load_task("colors", "train", seed=2)]
    assert len(card.load_task("colors", "test")) == 50  # max_test unset


def test_cards_can_be_built_in_code():
    card = DataCard(name="x", tasks=[TaskSpec(name="a", train="a.json")], root="/data")
    assert card.task("a").scorer == "exact_match"
    with pytest.raises(DataError, match="no task 'b'"):
        card.task("b")
