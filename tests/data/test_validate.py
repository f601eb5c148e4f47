"""Validation reports every defect at once, one clear message each, with file and index (and line for JSONL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mcit.data.cards import load_card
from mcit.data.validate import filter_valid, validate_card, validate_file


def conv(sample_id, image, question, answer):
    record = {"id": sample_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


@pytest.fixture
def defective_card(tmp_path: Path):
    root = tmp_path / "bench"
    (root / "imgs").mkdir(parents=True)
    for name in ("ok0", "ok5", "ok7", "ok8", "t0", "t1"):
        Image.new("RGB", (4, 4), (10, 20, 30)).save(root / "imgs" / f"{name}.png")
    (root / "imgs" / "junk.png").write_bytes(b"not an image")
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    train = [
        conv("a", "imgs/ok0.png", "<image>\nWhat colour?", "red"),                 # 0 fine
        conv("b", "imgs/missing.png", "<image>\nWhat colour?", "red"),             # 1 missing image
        conv("c", "imgs/junk.png", "<image>\nWhat colour?", "red"),                # 2 unreadable image
        conv("d", "imgs/ok0.png", "<image>\nLeft <image> or right?", "left"),      # 3 two placeholders, one image
        conv("e", "imgs/ok0.png", "<image>\nHow many?", " "),                      # 4 empty answer
        conv("a", "imgs/ok5.png", "<image>\nWhich shape?", "cube"),                # 5 duplicate id
        conv("g", "../outside.png", "<image>\nWhat colour?", "red"),               # 6 escapes the image root
        conv("h", "imgs/ok7.png", "<image>\nIs it shared?", "yes"),                # 7 fine, leaks into test
        conv("i", "imgs/ok8.png", "What colour is it?", "blue"),                   # 8 image but no placeholder
    ]
    (root / "train.json").write_text(json.dumps(train))
    test = [
        {"question_id": "q0", "image": "imgs/t0.png", "text": "What colour?", "answer": "red"},  # 0 fine
        {"question_id": "q1", "image": "imgs/t1.png", "text": "What colour?"},                  # 1 no answer
        {"question_id": "q2", "image": "imgs/ok7.png", "text": "Is it  SHARED?", "answer": "yes"},  # 2 overlap
    ]
    (root / "test.json").write_text(json.dumps(test))
    (root / "broken.json").write_text('[{"id": "x", "conversations": [}]')
    good_line = json.dumps({"question_id": "l0", "text": "Say hi.", "answer": "hi"})
    (root / "lines.jsonl").write_text(good_line + "\n{oops\n")
    card_path = tmp_path / "card.yaml"
    card_path.write_text(
        "name: defects\nroot: bench\ntasks:\n"
        "  - {name: vqa, train: train.json, test: test.json}\n"
        "  - {name: broken, train: broken.json, test: lines.jsonl}\n")
    return load_card(card_path), root


def test_every_defect_is_reported_once_with_file_and_index(defective_card):
    card, root = defective_card
    report = validate_card(card)
    assert not report.ok
    found = sorted((Path(p.file).name, p.index, p.line, p.kind) for p in report.problems)
    assert found == sorted([
        ("train.json", 1, None, "missing_image"),
        ("train.json", 2, None, "unreadable_image"),
        ("train.json", 3, None, "placeholder_count"),
        ("train.json", 4, None, "missing_answer"),
        ("train.json", 5, None, "duplicate_id"),
        ("train.json", 6, None, "image_escape"),
        ("train.json", 8, None, "placeholder_count"),
        ("test.json", 1, None, "missing_answer"),
        ("test.json", 2, None, "train_test_overlap"),
        ("broken.json", None, None, "unreadable_json"),
        ("lines.jsonl", 1, 2, "unreadable_json"),
    ])
    messages = {(Path(p.file).name, p.index): p.message for p in report.problems}
    assert messages[("train.json", 3)] == "2 '<image>' placeholders but 1 images"
    assert messages[("train.json", 5)] == "id 'a' already used by sample 0"
    assert "training sample 7 of" in messages[("test.json", 2)]
    assert "outside the image root" in messages[("train.json", 6)]
    assert report.by_kind()["placeholder_count"] == 2
    assert report.counts == {"vqa/train": 9, "vqa/test": 3, "broken/train": 0, "broken/test": 1}


def test_human_report_lists_each_problem_with_its_location(defective_card):
    card, root = defective_card
    text = validate_card(card).format()
    assert "11 problems" in text
    assert f"{root / 'lines.jsonl'}: sample 1 (line 2): [unreadable_json] invalid JSON" in text
    assert f"{root / 'train.json'}: sample 1: [missing_image] image {root / 'imgs/missing.png'} not found" in text
    cut = validate_card(card).format(max_per_kind=1)
    assert "... and 1 more [placeholder_count] problems" in cut


def test_filter_valid_drops_flagged_samples_and_counts_them(defective_card):
    card, _ = defective_card
    report = validate_card(card)
    kept, skipped = filter_valid(card.load_task("vqa", "train"), report)
    assert [s.meta["origin"]["index"] for s in kept] == [0, 7]
    assert skipped == 7
    kept_test, skipped_test = filter_valid(card.load_task("vqa", "test"), report)
    assert [s.id for s in kept_test] == ["q0"] and skipped_test == 2


def test_image_checks_can_be_relaxed(defective_card):
    card, _ = defective_card
    kinds = validate_card(card, splits=("train",), check_images="exists").by_kind()
    assert "unreadable_image" not in kinds and kinds["missing_image"] == 1
    kinds = validate_card(card, splits=("train",), check_images="none").by_kind()
    assert "missing_image" not in kinds and "train_test_overlap" not in kinds


def test_validate_a_single_file(defective_card):
    _, root = defective_card
    report = validate_file(root / "test.json")
    assert [(p.index, p.kind) for p in report.problems] == [(1, "missing_answer")]


def test_missing_annotation_file_is_a_problem_not_a_crash(tmp_path):
    (tmp_path / "card.yaml").write_text("name: gone\nroot: .\ntasks:\n  - {name: a, train: nowhere.json}\n")
    report = validate_card(load_card(tmp_path / "card.yaml"))
    assert [(Path(p.file).name, p.index, p.kind) for p in report.problems] == [("nowhere.json", None, "missing_file")]


def test_decode_finds_a_truncated_image_that_the_header_check_passes(tmp_path):
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    full = tmp_path / "full.png"
    Image.effect_noise((64, 64), 40).convert("RGB").save(full)
    data = full.read_bytes()
    (root / "imgs" / "cut.png").write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    (root / "train.json").write_text(json.dumps([conv("t0", "imgs/cut.png", "<image>\nWhat is it?", "noise")]))
    (tmp_path / "card.yaml").write_text("name: cut\nroot: data\ntasks:\n  - {name: noise, train: train.json}\n")
    card = load_card(tmp_path / "card.yaml")
    assert validate_card(card, splits=("train",), check_images="header").ok
    report = validate_card(card, splits=("train",), check_images="decode")
    assert [(p.index, p.kind) for p in report.problems] == [(0, "unreadable_image")]
    assert "cut.png" in report.problems[0].message
