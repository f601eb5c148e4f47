"""Annotation loaders and safe image access: the shapes real benchmark files take, and hostile inputs."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from mcit.data.formats import load_split, read_split
from mcit.data.images import open_image, probe_image, resolve_within
from mcit.data.records import Sample
from mcit.errors import DataError

# Written by hand in the reference LLaVA layout: placeholder first, placeholder last, a text-only sample, and a
# multi-turn conversation, with integer and string ids as they occur in LLaVA-665k.
LLAVA_REFERENCE = """[
  {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus in the image?"},
                     {"from": "gpt", "value": "The bus in the image is white and red."}]},
  {"id": 42, "image": "vg/VG_100K/2.jpg",
   "conversations": [{"from": "human", "value": "What is the man holding?\\n<image>"},
                     {"from": "gpt", "value": "An umbrella."}]},
  {"id": "text-only-1",
   "conversations": [{"from": "human", "value": "Name a prime number."}, {"from": "gpt", "value": "7"}]},
  {"id": "multi", "image": "gqa/images/1.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nHow many cats?"}, {"from": "gpt", "value": "2"},
                     {"from": "human", "value": "What colour is the left one?"}, {"from": "gpt", "value": "black"}]}
]"""


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_llava_reference_file_loads_with_normalised_placeholder(tmp_path):
    path = write(tmp_path / "ann" / "train.json", LLAVA_REFERENCE)
    samples = load_split(path, image_root=tmp_path / "images", task="vqa")
    assert [s.id for s in samples] == ["000000033471", "42", "text-only-1", "multi"]
    first, end_placeholder, text_only, multi = samples
    assert first.image == str(tmp_path / "images" / "coco/train2017/000000033471.jpg")
    assert first.turns[0][0] == "<image>\nWhat are the colors of the bus in the image?"
    assert end_placeholder.turns[0][0] == "<image>\nWhat is the man holding?"
    assert end_placeholder.question == "What is the man holding?"
    assert text_only.image is None and text_only.turns == [("Name a prime number.", "7")]
    assert {s.task for s in samples} == {"vqa"}
    assert first.meta["origin"] == {"file": str(path), "index": 0, "line": None}


def test_multi_turn_keeps_every_turn_and_answer_is_the_last(tmp_path):
    samples = load_split(write(tmp_path / "a.json", LLAVA_REFERENCE), image_root=tmp_path)
    multi = samples[3]
    assert multi.turns == [("<image>\nHow many cats?", "2"), ("What colour is the left one?", "black")]
    assert multi.question == "How many cats?"
    assert multi.answer == "black"


def test_image_root_defaults_to_the_annotation_folder(tmp_path):
    path = write(tmp_path / "sub" / "a.json", LLAVA_REFERENCE)
    assert load_split(path)[0].image == str(tmp_path / "sub" / "coco/train2017/000000033471.jpg")


def test_jsonl_of_the_same_objects_and_bad_lines_name_the_line(tmp_path):
    objects = json.loads(LLAVA_REFERENCE)
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(o) for o in objects) + "\n")
    assert [s.id for s in load_split(path)] == ["000000033471", "42", "text-only-1", "multi"]
    assert load_split(path)[2].meta["origin"]["line"] == 3

    broken = write(tmp_path / "b.jsonl", json.dumps(objects[0]) + "\n\n{not json\n" + json.dumps(objects[1]) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl: sample 1 \(line 3\): invalid JSON"):
        load_split(broken)
    assert [s.id for s in load_split(broken, skip_malformed=True)] == ["000000033471", "42"]


def test_sharegpt_messages_and_images(tmp_path):
    records = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "<image>Which animal is this?"},
                      {"role": "assistant", "content": "A fox."}],
         "images": ["imgs/fox.png"]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    ]
    path = write(tmp_path / "sharegpt.json", json.dumps(records))
    fox, text_only = load_split(path, fmt="sharegpt", task="animals")
    assert fox.turns == [("<image>\nWhich animal is this?", "A fox.")]
    assert fox.image == str(tmp_path / "imgs/fox.png")
    assert fox.meta["system"] == "Be brief."
    assert fox.id == "animals-0"
    assert text_only.image is None and text_only.answer == "4"
    assert [s.turns for s in load_split(path)] == [fox.turns, text_only.turns]  # autodetected


def test_question_file_as_released_for_testing(tmp_path):
    records = [
        {"question_id": 7, "image": "x/1.png", "text": "What is shown?", "answer": "a dog"},
        {"question_id": 8, "image": "x/2.png", "text": "Caption it.", "answer": ["A cat.", "A small cat."]},
        {"question_id": 9, "image": "x/3.png", "text": "Where?", "answer_bbox": "[0.1, 0.2, 0.3, 0.4]", "size": [4, 8]},
    ]
    dog, cat, box = load_split(write(tmp_path / "test.json", json.dumps(records)))
    assert dog.id == "7" and dog.turns == [("<image>\nWhat is shown?", "a dog")]
    assert cat.answer == "A cat." and cat.meta["references"] == ["A cat.", "A small cat."]
    assert box.answer == "[0.1, 0.2, 0.3, 0.4]" and box.meta["source"] == {"size": [4, 8]}


def test_structural_errors_name_file_and_index(tmp_path):
    records = json.loads(LLAVA_REFERENCE)
    records[2]["conversations"] = [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "?"}]
    path = write(tmp_path / "bad.json", json.dumps(records))
    with pytest.raises(DataError, match=r"bad\.json: sample 2: message 0: role 'gpt' out of order"):
        load_split(path)
    with pytest.raises(DataError, match=r"sample 0: no \"messages\" key"):
        load_split(write(tmp_path / "ok.json", LLAVA_REFERENCE), fmt="sharegpt")
    with pytest.raises(DataError, match=r"bad2\.json: invalid JSON at line 1"):
        load_split(write(tmp_path / "bad2.json", "[{"))
    with pytest.raises(DataError, match="unknown annotation format 'csv'"):
        load_split(path, fmt="csv")


def test_mismatched_placeholders_are_left_for_validation(tmp_path):
    records = [{"id": "a", "image": "1.png", "conversations": [
        {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "x"}]}]
    (sample,), errors = read_split(write(tmp_path / "a.json", json.dumps(records)))
    assert errors == [] and sample.turns[0][0] == "<image> and <image>?"


def test_sample_round_trips_through_dict():
    sample = Sample(id="1", task="t", image=None, turns=[("q", "a"), ("q2", "a2")], meta={"style": "word"})
    again = Sample.from_dict(json.loads(json.dumps(sample.to_dict())))
    assert again == sample


# ---- images -------------------------------------------------------------------------------------------------


def test_open_image_returns_rgb_inside_root(tmp_path):
    Image.new("L", (5, 3), 128).save(tmp_path / "grey.png")
    image = open_image("grey.png", tmp_path)
    assert image.mode == "RGB" and image.size == (5, 3)


def test_paths_escaping_the_root_are_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "secret.png")
    with pytest.raises(DataError, match="escapes the image root"):
        open_image("../secret.png", root)
    with pytest.raises(DataError, match="escapes the image root"):
        open_image(tmp_path / "secret.png", root)
    os.symlink(tmp_path / "secret.png", root / "link.png")
    with pytest.raises(DataError, match="escapes the image root"):
        open_image("link.png", root)
    assert resolve_within("a/../b.png", root) == root.resolve() / "b.png"


def test_decompression_bomb_is_refused(tmp_path):
    # 65 MP of 1-bit pixels compresses to a few KB: the classic bomb shape, above the 64 MP default.
    Image.new("1", (8125, 8000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with pytest.raises(DataError, match=r"bomb\.png: refused as a decompression bomb"):
        open_image("bomb.png", tmp_path)
    with pytest.raises(DataError, match="decompression bomb"):
        probe_image("bomb.png", tmp_path)
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match=r"small\.png: refused as a decompression bomb"):
        open_image("small.png", tmp_path, max_pixels=100)


def test_unreadable_and_missing_images_name_the_file(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match=r"junk\.png: unreadable image"):
        open_image("junk.png", tmp_path)
    with pytest.raises(DataError, match=r"nothere\.png: image file not found"):
        open_image("nothere.png", tmp_path)


def test_a_records_own_meta_is_kept_and_bad_meta_is_named(tmp_path):
    record = {"id": "s1", "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "x"}],
              "meta": {"brief": "a red circle", "detailed": "A red circle at the top left.", "origin": "spoofed"},
              "extra": 1}
    sample = load_split(write(tmp_path / "a.json", json.dumps([record])), image_root=tmp_path)[0]
    assert sample.meta["brief"] == "a red circle" and sample.meta["detailed"].startswith("A red circle")
    assert sample.meta["origin"]["index"] == 0  # the loader's own provenance wins over a record's key
    assert sample.meta["source"] == {"extra": 1}
    record["meta"] = ["not", "an", "object"]
    with pytest.raises(DataError, match=r"b.json: sample 0: \"meta\" must be a JSON object, got list"):
        load_split(write(tmp_path / "b.json", json.dumps([record])), image_root=tmp_path)
