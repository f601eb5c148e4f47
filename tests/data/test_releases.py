"""The shipped cards against trees that mirror each benchmark release file for file (tests/fixtures/releases): each
layout validates from its environment variable alone, the test answers are joined as the releases score them, and a
user's layout mistakes get one message that says what was tried and what is there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcit.data.cards import load_card
from mcit.data.validate import validate_card
from mcit.errors import DataError
from tests.recipes import write_recipe

RELEASES = Path(__file__).resolve().parents[1] / "fixtures" / "releases"
LAYOUTS = [  # card, environment variable, root of the release tree, layout the card must detect
    ("ucit", "MCIT_UCIT_ROOT", RELEASES / "ucit-mcitlib" / "UCIT", "mcitlib"),
    ("ucit", "MCIT_UCIT_ROOT", RELEASES / "ucit-hide-llava", "hide-llava"),
    ("coin", "MCIT_COIN_ROOT", RELEASES / "coin", "coin"),
    ("mllm-dcl", "MCIT_DCL_ROOT", RELEASES / "mllm-dcl" / "Domain_data", "mllm-cl"),
]


@pytest.mark.parametrize(("name", "variable", "root", "layout"), LAYOUTS, ids=[x[3] for x in LAYOUTS])
def test_each_release_layout_validates_from_its_variable_alone(monkeypatch, name, variable, root, layout):
    monkeypatch.setenv(variable, str(root))
    card = load_card(name)
    assert card.layout_in_use().name == layout
    report = validate_card(card)
    assert report.ok, report.format()
    assert len(report.counts) == 2 * len(card.tasks) and all(n == 2 for n in report.counts.values())
    for task in card.task_names:
        for sample in card.load_task(task, "test"):
            assert sample.answer.strip(), (task, sample.id)
            assert sample.turns[0][0].startswith("<image>\n") and Path(sample.image).is_file()


@pytest.mark.parametrize("tree", ["ucit-mcitlib/UCIT", "ucit-hide-llava"])
def test_ucit_captions_are_scored_against_every_reference_of_their_image(monkeypatch, tree):
    monkeypatch.setenv("MCIT_UCIT_ROOT", str(RELEASES / tree))
    card = load_card("ucit")
    for task in ("VizWiz-caption", "Flickr30k"):
        samples = card.load_task(task, "test")
        assert [len(s.meta["references"]) for s in samples] == [5, 5]
        assert all(s.answer in s.meta["references"] for s in samples)  # the k-th record gets image_id k's captions
    assert "references" not in card.load_task("ImageNet-R", "test")[0].meta


def test_coin_test_answers_come_from_the_official_files(monkeypatch):
    monkeypatch.setenv("MCIT_COIN_ROOT", str(RELEASES / "coin"))
    card = load_card("coin")
    science = card.load_task("ScienceQA", "test")
    problems = json.loads((RELEASES / "coin" / "cl_dataset" / "ScienceQA" / "problems.json").read_text())
    assert [s.answer for s in science] == ["AB"[problems[s.id]["answer"]] for s in science] == ["A", "B"]
    assert science[0].meta["choices"] == ["Ohio", "Texas"]
    textvqa = card.load_task("TextVQA", "test")
    assert all(len(s.meta["references"]) == 10 for s in textvqa)
    assert card.annotation_path("VQAv2", "test").name == "val.json"  # CoIN evaluates VQAv2/VizWiz/TextVQA on val
    grounding = card.load_task("Grounding", "test")
    assert grounding[0].meta["source"]["size"] == [12, 8] and grounding[0].answer.startswith("[")


def test_mllm_dcl_gets_the_released_inference_suffixes_and_scoring_keys(monkeypatch):
    monkeypatch.setenv("MCIT_DCL_ROOT", str(RELEASES / "mllm-dcl" / "Domain_data"))
    card = load_card("mllm-dcl")
    fin = card.load_task("Fin", "test")
    assert fin[0].answer == "No" and fin[0].question.endswith("Only answer with yes or no directly.")
    assert fin[1].question.endswith("Answer with the given letter directly, e.g., A, B, C, D.")
    assert card.load_task("Med", "test")[0].question.endswith("Answer the question with a single word (or phrase).")
    sci = card.load_task("Sci", "test")
    assert [s.meta["image_name"].split("_")[0] for s in sci] == ["AI2D", "MapQA"]
    assert "Which states" in sci[1].meta["question"]
    assert not card.load_task("Sci", "train")[0].question.endswith("directly.")  # test split only


def test_a_root_that_matches_no_layout_lists_what_was_tried_and_what_is_there(monkeypatch, tmp_path):
    (tmp_path / "something-else").mkdir()
    monkeypatch.setenv("MCIT_UCIT_ROOT", str(tmp_path))
    with pytest.raises(DataError) as err:
        validate_card(load_card("ucit"))
    message = str(err.value)
    for layout, expected in (("mcitlib", "ImageNet-R/train.json"), ("hide-llava", "instructions/ArxivQA/train_4w.json"),
                             ("merged", "ImageNet-R/test_3000.json")):
        assert f"layout {layout!r}" in message and expected in message
    assert "found 0 of" in message and "the root holds: something-else/" in message


def test_pointing_one_level_too_high_is_named(monkeypatch):
    monkeypatch.setenv("MCIT_UCIT_ROOT", str(RELEASES / "ucit-mcitlib"))  # the folder above UCIT/
    with pytest.raises(DataError, match=r"the root holds: UCIT/"):
        load_card("ucit").load_task("IconQA", "test")


def test_a_release_with_one_task_missing_names_the_task_files(monkeypatch, tmp_path):
    root = tmp_path / "UCIT"
    shutil.copytree(RELEASES / "ucit-mcitlib" / "UCIT", root)
    shutil.rmtree(root / "CLEVR-Math")
    monkeypatch.setenv("MCIT_UCIT_ROOT", str(root))
    card = load_card("ucit")
    with pytest.raises(DataError) as err:
        card.load_task("IconQA", "test")
    message = str(err.value)
    assert "found 12 of 14 files; missing CLEVR-Math/train.json, CLEVR-Math/test.json" in message
    assert "closest: 'mcitlib'" in message
    assert load_card("ucit").select(["ImageNet-R", "IconQA"]).layout_in_use().name == "mcitlib"  # runs what it has


def test_a_forced_layout_must_exist(monkeypatch):
    monkeypatch.setenv("MCIT_UCIT_ROOT", str(RELEASES / "ucit-hide-llava"))
    card = load_card("ucit")
    card.layout = "hide_llava"
    with pytest.raises(DataError, match=r"layout 'hide_llava' is not one of this card's layouts; did you mean "
                                        r"'hide-llava'"):
        card.task("IconQA")


def _copy(tree: str, tmp_path: Path) -> Path:
    shutil.copytree(RELEASES / tree, tmp_path / tree)
    return tmp_path / tree


def test_a_test_file_without_answers_is_reported_not_scored(monkeypatch, tmp_path):
    root = _copy("mllm-dcl", tmp_path) / "Domain_data"
    path = root / "Med" / "test.json"
    records = json.loads(path.read_text())
    for record in records:
        del record["answer"]
    path.write_text(json.dumps(records))
    monkeypatch.setenv("MCIT_DCL_ROOT", str(root))
    report = validate_card(load_card("mllm-dcl"))
    missing = [p for p in report.problems if p.kind == "missing_answer"]
    assert [(p.task, p.index, p.split) for p in missing] == [("Med", 0, "test"), ("Med", 1, "test")]
    assert "Med/test.json" in missing[0].file and "annotations" in missing[0].message


def test_caption_references_that_do_not_line_up_are_refused(monkeypatch, tmp_path):
    root = _copy("ucit-hide-llava", tmp_path)
    path = root / "instructions" / "Flickr30k" / "val_coco_type_3000.json"
    coco = json.loads(path.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 2]  # image 2 lost its captions
    coco["images"] = coco["images"][:1]
    path.write_text(json.dumps(coco))
    monkeypatch.setenv("MCIT_UCIT_ROOT", str(root))
    card = load_card("ucit")
    with pytest.raises(DataError, match=r"val_coco_type_3000.json: caption references do not line up with the test "
                                        r"file .*test_3000.json \(2 records.*no caption for image_id 2"):
        card.load_task("Flickr30k", "test")
    report = validate_card(card)
    assert [(p.kind, p.task) for p in report.problems] == [("references", "Flickr30k")]


def test_caption_references_of_another_test_file_are_refused(monkeypatch, tmp_path):
    root = _copy("ucit-hide-llava", tmp_path)
    path = root / "instructions" / "VizWiz" / "val_coco_type_3000.json"
    coco = json.loads(path.read_text())
    coco["images"][0]["file_name"] = "VizWiz_val_00000042.jpg"
    path.write_text(json.dumps(coco))
    monkeypatch.setenv("MCIT_UCIT_ROOT", str(root))
    with pytest.raises(DataError, match=r"image_id 1 is 'VizWiz_val_00000042.jpg' but record 0 of .* shows "
                                        r"'VizWiz_val_00000000.jpg'"):
        load_card("ucit").load_task("VizWiz-caption", "test")


def test_official_answers_missing_a_question_are_refused(monkeypatch, tmp_path):
    root = _copy("coin", tmp_path)
    path = root / "cl_dataset" / "TextVQA" / "TextVQA_0.5.1_val.json"
    data = json.loads(path.read_text())
    data["data"] = data["data"][:1]
    path.write_text(json.dumps(data))
    monkeypatch.setenv("MCIT_COIN_ROOT", str(root))
    with pytest.raises(DataError, match=r"1 of 2 questions of .*TextVQA/val.json have no entry in this textvqa "
                                        r"annotation file \(question ids 'TextVQA_1'\)"):
        load_card("coin").load_task("TextVQA", "test")


TRAIN_TASKS = {"mcitlib": ["ArxivQA", "Flickr30k"], "hide-llava": ["ImageNet-R", "VizWiz-caption"],
               "coin": ["ScienceQA", "TextVQA", "Grounding"], "mllm-cl": ["Sci", "Fin"]}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "variable", "root", "layout"), LAYOUTS, ids=[x[3] for x in LAYOUTS])
def test_each_release_layout_trains_a_step_and_scores(tmp_path, name, variable, root, layout):
    """`mcit train` as a user runs it, with nothing but the variable pointing at the release: one step per task,
    every seen task scored by its released rule."""
    recipe = write_recipe(tmp_path / "r.yaml", root, output_dir=tmp_path / "out",
                          benchmark={"card": name, "root": None, "tasks": TRAIN_TASKS[layout], "max_train": None,
                                     "max_test": None},
                          train={"max_steps": 1, "batch_size": 2, "save_steps": 0, "max_length": 160},
                          eval={"zero_shot": False, "max_new_tokens": 6})
    env = {**os.environ, variable: str(root), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mcit.cli", "train", str(recipe)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tasks"] == TRAIN_TASKS[layout]
    assert all(v is not None and 0 <= v <= 100 for v in results["matrix"][-1])
    events = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    if layout == "coin":  # CoIN's square-frame boxes rewritten into the tiny processor's centre crop
        assert {"event": "box_frames", "rewritten": {"Grounding": 4}}.items() <= next(
            e for e in events if e["event"] == "box_frames").items()
    scored = {e["task"] for e in events if e["event"] == "eval"}
    assert scored == set(TRAIN_TASKS[layout])


def test_a_recipe_picks_the_layout(monkeypatch):
    from mcit.config import recipe_from_dict
    from mcit.workflows.load import prepare_card

    monkeypatch.setenv("MCIT_UCIT_ROOT", str(RELEASES / "ucit-hide-llava"))
    recipe = recipe_from_dict({"output_dir": "x", "benchmark": {"card": "ucit", "layout": "hide-llava",
                                                                "tasks": ["IconQA"]}})
    card = prepare_card(recipe)
    assert card.task_names == ["IconQA"] and card.layout_in_use().name == "hide-llava"
    recipe.benchmark.layout = "mcitlib"  # forced, and its files are not there: validation names each one
    report = validate_card(prepare_card(recipe))
    assert [(p.kind, Path(p.file).relative_to(RELEASES / "ucit-hide-llava").as_posix()) for p in report.problems] == [
        ("missing_file", "IconQA/train.json"), ("missing_file", "IconQA/test.json")]
    recipe.benchmark.layout = "hide"
    with pytest.raises(DataError, match=r"did you mean 'hide-llava'"):
        prepare_card(recipe)
