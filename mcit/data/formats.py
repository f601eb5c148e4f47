"""Annotation loaders: LLaVA conversation JSON, JSONL, LLaMA-Factory sharegpt -> list[Sample].

Shapes accepted per record (the container is a JSON array or JSONL, sniffed from the file):
- LLaVA conversation: {"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}
- LLaVA question file (the test files of CoIN/UCIT/MLLM-DCL): {"question_id", "image"?, "text", "answer"}
  (`answer` may be a list of references: the first is the answer, all go to meta["references"])
- sharegpt: {"messages": [{"role": "user"|"assistant"|"system", "content": ...}], "images"?: [path]}
Any of them may carry `"meta": {...}` (style, choices, brief/detailed answers; SynthCIT writes it), which becomes the
sample's meta; other unknown keys are kept under meta["source"].
The general-ability benchmarks' official files (MME's folder, MMBench's TSV, POPE, SEED-Bench, ScienceQA, TextVQA,
GQA) have their own readers, mcit/data/releases.py, chosen by `fmt` (`RELEASE_FORMATS`) in `read_split`.

Why we normalise the image placeholder here: annotation files put "<image>" at the start or the end of the first
human turn (both occur in LLaVA-665k); the collator then needs only one case, a leading "<image>\\n". A sample whose
placeholder count does not match its image count is loaded unchanged so `validate` can report it with its index.

Every error names the file and the sample index (and the line for JSONL). Plain `json` is used rather than an Arrow
cache: parsing a 40k-sample file takes well under a second, so a cache would add state without saving time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcit.data.records import IMAGE_PREFIX, IMAGE_TOKEN, Sample
from mcit.errors import DataError

RELEASE_FORMATS = ("mme", "mmbench", "pope", "seed_bench", "scienceqa", "textvqa", "gqa")
"""Official release files of the general-ability benchmarks, each read by its own reader in mcit/data/releases.py."""
FOLDER_FORMATS = ("mme",)
"""Release formats whose card path is a folder (MME is published as a folder of per-image question files)."""
FORMATS = ("auto", "llava", "jsonl", "sharegpt", *RELEASE_FORMATS)

_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant"}
_SYSTEM_ROLES = {"system"}
_KNOWN_KEYS = {"id", "question_id", "image", "images", "conversations", "messages", "text", "answer", "answer_bbox",
               "meta"}


class RecordError(DataError):
    """A problem with one record (or the whole file when `index` is None). `kind` lets `validate` group it."""

    def __init__(self, message: str, *, file: str | os.PathLike, index: int | None = None,
                 line: int | None = None, kind: str = "malformed") -> None:
        self.file = str(file)
        self.index = index
        self.line = line
        self.kind = kind
        self.detail = message
        where = self.file
        if index is not None:
            where += f": sample {index}"
        if line is not None:
            where += f" (line {line})"
        super().__init__(f"{where}: {message}")


@dataclass
class RawRecord:
    """One decoded JSON object and where it came from."""

    index: int
    line: int | None
    data: Any


def read_raw(path: str | os.PathLike, fmt: str = "auto") -> tuple[list[RawRecord], list[RecordError]]:
    """Decode an annotation file into raw objects. JSON errors are returned, not raised, so a validator can report
    every bad JSONL line at once; a JSON array that fails to parse is one file-level error."""
    path = Path(path)
    _check_format(fmt, path)
    if fmt in RELEASE_FORMATS:
        raise DataError(f"{path}: format {fmt!r} is an official release file with its own reader; load it with "
                        f"read_split / load_split")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], [RecordError("annotation file not found", file=path, kind="missing_file")]
    except (OSError, UnicodeDecodeError) as exc:
        return [], [RecordError(f"cannot read annotation file ({exc})", file=path, kind="unreadable_json")]
    head = text.lstrip()[:1]
    if fmt == "jsonl" or path.suffix == ".jsonl" or head == "{":
        return _read_jsonl(text, path)
    if head != "[":
        return [], [RecordError("not a JSON array of samples nor JSONL (expected '[' or '{' first)",
                                file=path, kind="unreadable_json")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], [RecordError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                                file=path, kind="unreadable_json")]
    except (RecursionError, ValueError) as exc:  # nesting deeper than the parser's stack, an integer of 4300+ digits
        return [], [RecordError(f"unusable JSON ({type(exc).__name__}: {str(exc)[:120]})", file=path,
                                kind="unreadable_json")]
    return [RawRecord(index=i, line=None, data=item) for i, item in enumerate(data)], []


def _read_jsonl(text: str, path: Path) -> tuple[list[RawRecord], list[RecordError]]:
    records: list[RawRecord] = []
    errors: list[RecordError] = []
    index = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(RawRecord(index=index, line=line_no, data=json.loads(line)))
        except json.JSONDecodeError as exc:
            errors.append(RecordError(f"invalid JSON at column {exc.colno}: {exc.msg}", file=path, index=index,
                                      line=line_no, kind="unreadable_json"))
        except (RecursionError, ValueError) as exc:  # see read_raw
            errors.append(RecordError(f"unusable JSON ({type(exc).__name__}: {str(exc)[:120]})", file=path,
                                      index=index, line=line_no, kind="unreadable_json"))
        index += 1
    return records, errors


def parse_record(raw: RawRecord, *, file: str | os.PathLike, image_root: str | os.PathLike, task: str,
                 fmt: str = "auto") -> Sample:
    """Turn one raw object into a Sample; structural problems raise RecordError naming file, index and line."""

    def fail(message: str, kind: str = "malformed") -> RecordError:
        return RecordError(message, file=file, index=raw.index, line=raw.line, kind=kind)

    data = raw.data
    if not isinstance(data, dict):
        raise fail(f"expected a JSON object, got {type(data).__name__}")
    if "messages" in data and fmt in ("auto", "sharegpt"):
        turns, meta = _parse_messages(data["messages"], "role", "content", fail)
        image = _single_image(data.get("images"), fail)
    elif "conversations" in data and fmt in ("auto", "llava", "jsonl"):
        turns, meta = _parse_messages(data["conversations"], "from", "value", fail)
        image = _single_image(data.get("image"), fail)
    elif "text" in data and fmt in ("auto", "llava", "jsonl"):
        turns, meta, image = _parse_question(data, fail)
    else:
        expected = {"sharegpt": '"messages"', "auto": '"conversations", "messages" or "text"'}.get(
            fmt, '"conversations" or "text"')
        raise fail(f"no {expected} key (keys present: {sorted(data)}); format is {fmt!r}")

    turns = _normalise_placeholder(turns, has_image=image is not None)
    sample_id = data.get("id", data.get("question_id"))
    own = data.get("meta")
    if own is not None and not isinstance(own, dict):
        raise fail(f'"meta" must be a JSON object, got {type(own).__name__}')
    meta = {**(own or {}), **meta}  # a record's own meta (style, choices, brief/detailed answers) is kept
    extra = {k: v for k, v in data.items() if k not in _KNOWN_KEYS}
    if extra:
        meta["source"] = extra
    meta["origin"] = {"file": str(file), "index": raw.index, "line": raw.line}
    return Sample(
        id=str(sample_id) if sample_id is not None else f"{task}-{raw.index}",
        task=task,
        image=os.path.normpath(os.path.join(image_root, image)) if image is not None else None,
        turns=turns,
        meta=meta,
    )


def _parse_messages(messages: Any, role_key: str, text_key: str, fail) -> tuple[list[tuple[str, str]], dict]:
    if not isinstance(messages, list) or not messages:
        raise fail("conversation must be a non-empty list of messages")
    meta: dict[str, Any] = {}
    turns: list[tuple[str, str]] = []
    pending: str | None = None
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or role_key not in message or text_key not in message:
            raise fail(f"message {position} must be an object with {role_key!r} and {text_key!r}")
        role, text = message[role_key], message[text_key]
        if not isinstance(text, str):
            raise fail(f"message {position}: {text_key!r} must be a string, got {type(text).__name__}")
        if not isinstance(role, str):
            raise fail(f"message {position}: {role_key!r} must be a string, got {type(role).__name__}")
        if role in _SYSTEM_ROLES and position == 0:
            meta["system"] = text
        elif role in _USER_ROLES and pending is None:
            pending = text
        elif role in _ASSISTANT_ROLES and pending is not None:
            turns.append((pending, text))
            pending = None
        else:
            expected = "a user turn" if pending is None else "an assistant turn"
            raise fail(f"message {position}: role {role!r} out of order, expected {expected} "
                       f"(turns must alternate user/assistant, starting with the user)")
    if pending is not None:
        raise fail("conversation ends with a user turn that has no assistant answer", kind="missing_answer")
    if not turns:
        raise fail("conversation has no user/assistant turn")
    return turns, meta


def _parse_question(data: dict, fail) -> tuple[list[tuple[str, str]], dict, str | None]:
    question = data["text"]
    if not isinstance(question, str):
        raise fail(f'"text" must be a string, got {type(question).__name__}')
    meta: dict[str, Any] = {}
    answer = data.get("answer", data.get("answer_bbox", ""))
    if isinstance(answer, list):
        if not all(isinstance(a, str) for a in answer):
            raise fail('"answer" list must hold strings')
        meta["references"] = list(answer)
        answer = answer[0] if answer else ""
    elif answer is None:
        answer = ""
    elif not isinstance(answer, str):
        answer = str(answer)  # numeric answers (CLEVR-Math counts) are scored as text
    image = _single_image(data.get("image"), fail)
    # Question files never carry the placeholder: the reference eval scripts prepend it themselves.
    if image is not None and IMAGE_TOKEN not in question:
        question = IMAGE_PREFIX + question
    return [(question, answer)], meta, image


def _single_image(value: Any, fail) -> str | None:
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, list):
        if len(value) > 1:
            raise fail(f"{len(value)} images in one sample; only one image per sample is supported",
                       kind="too_many_images")
        value = value[0]
    if not isinstance(value, str):
        raise fail(f"image path must be a string, got {type(value).__name__}")
    return value


def _normalise_placeholder(turns: list[tuple[str, str]], has_image: bool) -> list[tuple[str, str]]:
    total = sum(user.count(IMAGE_TOKEN) + reply.count(IMAGE_TOKEN) for user, reply in turns)
    first = turns[0][0]
    if not has_image or total != 1 or IMAGE_TOKEN not in first:
        return turns  # mismatches are left for validate() to report with their index
    first = IMAGE_PREFIX + first.replace(IMAGE_TOKEN, "", 1).strip()
    return [(first, turns[0][1])] + turns[1:]


def _check_format(fmt: str, path: Path) -> None:
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown annotation format {fmt!r}; choose one of {', '.join(FORMATS)}")


def read_split(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, task: str | None = None,
               fmt: str = "auto") -> tuple[list[Sample], list[RecordError]]:
    """Parse every record, collecting per-record errors instead of stopping at the first (used by validate)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    task = task or path.stem
    if fmt in RELEASE_FORMATS:
        from mcit.data.releases import read_release  # it builds on this module (RecordError, read_raw)

        samples, errors = read_release(path, image_root=root, task=task, fmt=fmt)
        errors.sort(key=lambda e: -1 if e.index is None else e.index)
        return samples, errors
    raw_records, errors = read_raw(path, fmt)
    samples: list[Sample] = []
    for raw in raw_records:
        try:
            samples.append(parse_record(raw, file=path, image_root=root, task=task, fmt=fmt))
        except RecordError as exc:
            errors.append(exc)
    errors.sort(key=lambda e: -1 if e.index is None else e.index)
    return samples, errors


def load_split(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, task: str | None = None,
               fmt: str = "auto", skip_malformed: bool = False) -> list[Sample]:
    """Load one annotation file as Samples; image paths are resolved against `image_root` (default: the file's
    folder). Raises the first structural error unless `skip_malformed` (then bad records are dropped; run
    `mcit data validate` to see them)."""
    samples, errors = read_split(path, image_root=image_root, task=task, fmt=fmt)
    if errors and not (skip_malformed and all(e.index is not None for e in errors)):
        first = errors[0]
        more = f" (and {len(errors) - 1} more problems; run `mcit data validate`)" if len(errors) > 1 else ""
        raise RecordError(first.detail + more, file=first.file, index=first.index, line=first.line, kind=first.kind)
    return samples
