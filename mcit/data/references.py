"""Reference captions kept beside a test file, in the COCO caption format the UCIT releases ship
(`val_coco_type_3000.json`: `{"images": [{"id", "file_name"?}], "annotations": [{"image_id", "caption"}]}`).

Why by position: the released evaluation numbers its answers 1..N in test-file order and looks the captions up by
that number, so image_id k belongs to the k-th test record. Nothing else ties the two files together, so everything
that can be checked is: the ids must be exactly 1..N for N test records, every record must have a caption, and where
the COCO file names an image, it must be the record's image. A mismatch is an error naming both files: a caption
scored against another image's references would be wrong silently.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from mcit.data.records import Sample
from mcit.errors import DataError


def read_coco_captions(path: str | os.PathLike) -> tuple[dict[int, list[str]], dict[int, str]]:
    """(image_id -> captions, image_id -> file name) of a COCO caption file; a malformed file is a DataError naming
    the file and the entry."""
    path = Path(path)
    data = _read_json(path, "caption reference file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: expected a COCO caption file, an object with an 'annotations' list of "
                        f"{{'image_id', 'caption'}} (and optionally 'images')")
    captions: dict[int, list[str]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or not _is_id(ann.get("image_id")):
            raise DataError(f"{path}: annotations[{i}]: expected {{'image_id': <int>, 'caption': <str>}}, got "
                            f"{str(ann)[:120]}")
        if ann["caption"].strip():
            captions[int(ann["image_id"])].append(ann["caption"])
    names: dict[int, str] = {}
    for i, image in enumerate(data.get("images") or []):
        if not isinstance(image, dict) or not _is_id(image.get("id")):
            raise DataError(f"{path}: images[{i}]: expected an object with an integer 'id', got {str(image)[:120]}")
        if isinstance(image.get("file_name"), str):
            names[int(image["id"])] = image["file_name"]
    return dict(captions), names


def attach_caption_references(samples: Sequence[Sample], path: str | os.PathLike, test_file: str | os.PathLike,
                              ) -> None:
    """Put the captions of image_id k into `meta["references"]` of the k-th sample (the whole test file, in file
    order, before any subsampling)."""
    captions, names = read_coco_captions(path)
    n = len(samples)
    ids = set(captions) | set(names)
    expected = set(range(1, n + 1))
    if ids != expected:
        missing = sorted(expected - set(captions))
        extra = sorted(ids - expected)
        parts = []
        if missing:
            parts.append(f"no caption for image_id {_preview(missing)}")
        if extra:
            parts.append(f"image_id {_preview(extra)} beyond the {n} test records")
        raise DataError(f"{path}: caption references do not line up with the test file {test_file} ({n} records; "
                        f"image_id k must name the k-th record): {'; '.join(parts)}. Use the reference file released "
                        f"with this test file, unmodified")
    for k, sample in enumerate(samples, start=1):
        name = names.get(k)
        if name and sample.image is not None and os.path.basename(name) != os.path.basename(sample.image):
            raise DataError(f"{path}: image_id {k} is {name!r} but record {k - 1} of {test_file} shows "
                            f"{os.path.basename(sample.image)!r}; the reference file belongs to another test file "
                            f"(or one of them was reordered)")
        sample.meta["references"] = list(captions[k])


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: {what} not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise DataError(f"{path}: unreadable {what} ({type(exc).__name__}: {str(exc)[:160]})") from exc


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _preview(ids: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


ANSWER_SOURCES = ("textvqa", "vqav2", "scienceqa")
"""Official annotation files a test split's answers can be joined from (`annotations_kind` in a card):
- `textvqa`: TextVQA_0.5.1_val.json, `{"data": [{"question_id", "answers": [10 strings]}]}` -> `meta["references"]`;
- `vqav2`: v2_mscoco_val2014_annotations.json, `{"annotations": [{"question_id", "answers": [{"answer"}, ...]}]}`
  -> `meta["references"]`;
- `scienceqa`: problems.json, `{pid: {"answer": <index>, "choices": [...]}}` -> the answer letter and
  `meta["choices"]` (the released ScienceQA test file is scored against this file)."""


def attach_official_answers(samples: Sequence[Sample], path: str | os.PathLike, kind: str,
                            test_file: str | os.PathLike) -> None:
    """Join each test sample (by its question id) with its entry of an official annotation file, in place. Every
    sample must have an entry: scoring some samples against the human answers and the rest against one answer would
    mix two metrics silently."""
    if kind not in ANSWER_SOURCES:
        raise DataError(f"unknown annotations kind {kind!r}; choose one of {', '.join(ANSWER_SOURCES)}")
    path = Path(path)
    data = _read_json(path, f"official {kind} annotation file (the card's `annotations`)")
    table = _answer_table(data, kind, path)
    missing = [s.id for s in samples if s.id not in table]
    if missing:
        raise DataError(f"{path}: {len(missing)} of {len(samples)} questions of {test_file} have no entry in this "
                        f"{kind} annotation file (question ids {', '.join(repr(i) for i in missing[:8])}"
                        f"{', ...' if len(missing) > 8 else ''}); it is not the annotation file of this split")
    for sample in samples:
        entry = table[sample.id]
        if kind == "scienceqa":
            letter, choices = entry
            user, _ = sample.turns[-1]
            sample.turns[-1] = (user, letter)
            sample.meta["choices"] = choices
        else:
            sample.meta["references"] = entry


def _answer_table(data: object, kind: str, path: Path) -> dict[str, object]:
    def fail(what: str) -> DataError:
        return DataError(f"{path}: not a {kind} annotation file: {what}")

    table: dict[str, object] = {}
    if kind == "scienceqa":
        if not isinstance(data, dict):
            raise fail("expected an object of problems keyed by id")
        for pid, problem in data.items():
            if not isinstance(problem, dict) or not isinstance(problem.get("choices"), list) or not _is_id(
                    problem.get("answer")) or not 0 <= problem["answer"] < min(len(problem["choices"]), 26):
                raise fail(f"problem {pid!r} needs 'choices' (a list) and 'answer' (an index into it)")
            table[str(pid)] = (chr(ord("A") + problem["answer"]), [str(c) for c in problem["choices"]])
        return table
    key = "data" if kind == "textvqa" else "annotations"
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise fail(f"expected an object with a {key!r} list")
    for i, entry in enumerate(data[key]):
        answers = entry.get("answers") if isinstance(entry, dict) else None
        if kind == "vqav2" and isinstance(answers, list):
            answers = [a.get("answer") if isinstance(a, dict) else None for a in answers]
        if not isinstance(entry, dict) or "question_id" not in entry or not isinstance(answers, list) or not all(
                isinstance(a, str) for a in answers) or not answers:
            raise fail(f"{key}[{i}] needs 'question_id' and a non-empty list of human answers")
        table[str(entry["question_id"])] = list(answers)
    return table
