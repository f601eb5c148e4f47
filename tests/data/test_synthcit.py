"""SynthCIT: deterministic builds, disjoint splits, answers that agree with the scene ground truth, and the shipped
cards' scorers giving the references full marks."""

from __future__ import annotations

import hashlib
import json

import pytest

from mcit.data import synthcit
from mcit.data.cards import load_card
from mcit.data.synthcit_scenes import NUMBER_WORDS, parse_scene
from mcit.evaluation.scorers import get_scorer

TINY = synthcit.BuildConfig(seed=3, n_train=40, n_test=12, n_pretrain=30, n_pretrain_test=8)


def _digest(root) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".png")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthcit") / "a"
    synthcit.build(root, TINY, workers=1, progress=False)
    return root


def _records(root, task, split):
    return json.loads((root / task / f"{split}.json").read_text())


def test_same_seed_same_bytes_other_seed_other_data(built, tmp_path):
    again = tmp_path / "b"
    synthcit.build(again, TINY, workers=2, progress=False)
    assert _digest(again) == _digest(built)
    other = tmp_path / "c"
    synthcit.build(other, synthcit.BuildConfig(seed=4, n_train=40, n_test=12, n_pretrain=30, n_pretrain_test=8),
                   workers=1, progress=False)
    assert _digest(other) != _digest(built)
    stamp = json.loads((built / "BUILD.json").read_text())
    assert stamp["config"]["version"] == synthcit.VERSION
    assert stamp["counts"]["shape"] == {"train": 40, "test": 12}


def test_train_and_test_never_share_a_scene_and_question(built):
    # the guarantee is on the whole rendered scene (objects, offsets, word, background tone) plus the question
    for task in [*TINY.tasks, synthcit.PRETRAIN_TASK]:
        train, test = ({json.dumps([r["meta"]["truth"], r["conversations"][0]["value"]], sort_keys=True)
                        for r in _records(built, task, split)} for split in ("train", "test"))
        sizes = (TINY.n_pretrain, TINY.n_pretrain_test) if task == synthcit.PRETRAIN_TASK else (TINY.n_train,
                                                                                                  TINY.n_test)
        assert (len(train), len(test)) == sizes and not train & test, task


def test_answers_follow_the_ground_truth(built):
    for r in _records(built, "count", "train"):
        assert r["conversations"][1]["value"] == str(len(r["meta"]["truth"]["objects"]))
    for task, attribute in (("mc-color", "color"), ("mc-shape", "shape")):
        for r in _records(built, task, "train"):
            (obj,) = r["meta"]["truth"]["objects"]
            letter = r["conversations"][1]["value"]
            assert r["meta"]["choices"]["ABCD".index(letter)] == obj[attribute]
    for r in _records(built, synthcit.PRETRAIN_TASK, "train"):
        objects, word, count = parse_scene(r["conversations"][1]["value"])
        truth = r["meta"]["truth"]
        assert count == NUMBER_WORDS[len(truth["objects"])]
        assert word == truth["word"]
        assert {(o["size"], o["color"], o["shape"]) for o in truth["objects"]} == set(objects.values())


@pytest.mark.parametrize("card", ["synthcit", "synthcit-coin", "synthcit-mini"])
def test_every_card_task_scores_its_references_perfectly(built, card):
    spec = load_card(card)
    spec.root = str(built)
    for task in spec.tasks:
        samples = spec.load_task(task.name, "test")
        answers = [s.answer for s in samples]
        result = get_scorer(task.scorer).score_aligned(answers, answers, [s.meta for s in samples])
        if task.scorer == "caption":  # CIDEr of a caption against itself exceeds 100 (results clip it at 100)
            assert result.score >= 100.0, (card, task.name)
        else:
            assert result.score == pytest.approx(100.0), (card, task.name)


def test_a_build_of_an_older_generator_version_is_rebuilt(built, tmp_path):
    import shutil

    root = tmp_path / "old"
    shutil.copytree(built, root)
    stamp = json.loads((root / "BUILD.json").read_text())
    stamp["config"]["version"] = synthcit.VERSION - 1
    (root / "BUILD.json").write_text(json.dumps(stamp))
    (root / "shape" / "train.json").write_text("[]")
    synthcit.ensure_built(root, TINY)
    assert len(_records(root, "shape", "train")) == TINY.n_train
