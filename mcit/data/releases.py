"""Readers for the general-ability benchmarks' official release files, as LLaVA-1.5 users have them.

Continual-instruction-tuning papers measure how much general ability a run keeps on the benchmarks LLaVA-1.5 reports,
evaluated the way LLaVA-1.5's evaluation does (its docs/Evaluation.md and `llava/eval/*`, `scripts/v1_5/eval/*`).
That evaluation reads question files of its own (`llava_mme.jsonl`, `llava_pope_test.jsonl`, ... from its `eval.zip`),
which are conversions nobody else publishes; these readers read the benchmarks' *official* files instead, in the tree
LLaVA's docs have users build under `playground/data/eval/`, and produce the same questions:

============ ================================================ ========================================================
format       reads (path relative to playground/data/eval/)  record
============ ================================================ ========================================================
mme          ``MME/MME_Benchmark_release_version/`` (folder): one per question of every ``<stem>.txt``
             per subtask either images beside ``<stem>.txt``  (``question<TAB>Yes|No``, two lines per image); the
             files, or ``images/`` + ``questions_answers_YN/``  trailing "Please answer yes or no." is dropped, as
             (subtasks directly inside, or inside              LLaVA-1.5's llava_mme.jsonl and lmms-eval's ``mme`` task
             ``MME_Benchmark/`` as newer copies of the zip     do (the card appends the short-answer instruction);
             nest them)                                        meta ``category`` (subtask), ``image_id``
mmbench      ``mmbench/mmbench_dev_20230712.tsv``              one per row: hint (when present) + question + the
                                                               row's options "A. ..", as model_vqa_mmbench.py builds
                                                               them; meta ``index``, ``choices``, ``category``. The
                                                               TSV already holds the CircularEval copies (index
                                                               ``q + k * 1e6``, options rotated), so every row is read
                                                               as published; the base64 images are decoded once into
                                                               a content-addressed cache (`decoded_image_root`)
pope         ``pope/coco/coco_pope_<category>.json`` (JSONL)   ``text`` as is; answer and meta ``label`` = ``label``,
                                                               meta ``category`` from the file name (eval_pope.py)
seed_bench   ``seed_bench/SEED-Bench.json``                    image questions only (``data_type == "image"``,
                                                               dimensions 1-9): question + "A. .." .. "D. ..";
                                                               image ``data_id``; meta ``question_type_id``, ``choices``
scienceqa    ``scienceqa/problems.json`` (+ ``pid_splits.json`` the ``test`` problems that have an image
             beside it)                                        (ScienceQA-IMG): "Context: <hint>" (when there is one),
                                                               question, options "A. .."; answer = the letter;
                                                               image ``<pid>/<image>``; meta ``choices``
textvqa      ``textvqa/TextVQA_0.5.1_val.json``                question (first letter capitalised, as LLaVA's file);
                                                               image ``<image_id>.jpg``; meta ``references`` = the ten
                                                               human answers (VQA accuracy), answer = the most common
gqa          ``gqa/data/testdev_balanced_questions.json``      the balanced questions; image ``<imageId>.jpg``; the
                                                               answer GQA's eval.py compares against
============ ================================================ ========================================================

MME's and MMBench's records also carry ``meta["subsample_group"]`` (the image; the question), so a sample limit
(`max_test`) keeps an image's two questions and a question's circular copies together (`mcit.data.cards`).

Image paths are resolved against the card's image root of the task (e.g. ``pope/val2014``), except for MME (images
live beside their question files in the release folder) and MMBench (decoded from the TSV). The instruction LLaVA-1.5
appends ("Answer the question using a single word or phrase.", "Answer with the option's letter from the given choices
directly.") is data of the card (`instruction_suffix`), not of the readers.

Every problem is a `RecordError` naming the file, the record (index, and the line for line-based files) and the key;
the readers collect them all (`mcit data validate` lists every one) instead of stopping at the first. Files are read
with plain `json` / `csv`: the largest (GQA's testdev questions, MMBench's TSV) parse in about a second.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcit.data.formats import FOLDER_FORMATS, RELEASE_FORMATS, RecordError, read_raw
from mcit.data.records import IMAGE_PREFIX, Sample
from mcit.runtime.files import sha256

MME_SUBTASKS = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                "OCR", "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
"""The 14 subtask folders of MME_Benchmark_release_version, spelled as MME's eval tool (``eval_type_dict``) spells
them; the same names as `mcit.evaluation.general.MME_PERCEPTION` + ``MME_COGNITION`` (a test keeps them equal)."""
MME_INSTRUCTION = "Please answer yes or no."
"""The instruction every MME question ends with; LLaVA-1.5 replaces it by its short-answer instruction."""
_MME_NESTED = "MME_Benchmark"
_MME_SPLIT_DIRS = ("images", "questions_answers_YN")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MMBENCH_OPTIONS = "ABCD"  # model_vqa_mmbench.py reads these four columns
_MMBENCH_REQUIRED = ("index", "question", "A", "B", "image")
_MMBENCH_MANIFEST = "manifest.json"
MMBENCH_COPY_STRIDE = 1_000_000
"""MMBench numbers CircularEval copy k of question q as q + k * 1e6 (the same stride the `mmbench` scorer groups by)."""

Reader = Callable[[Path, Path, str], tuple[list[Sample], list[RecordError]]]


def cache_dir() -> Path:
    """mcit's cache folder: ``$MCIT_CACHE``, else ``~/.cache/mcit`` (absolute)."""
    return Path(os.environ.get("MCIT_CACHE") or "~/.cache/mcit").expanduser().absolute()


def decoded_image_root(fmt: str) -> Path | None:
    """Where a release whose images are embedded in its annotation file has them decoded (the task's image root:
    validation confines image paths to it), or None when the images are files of the release."""
    return cache_dir() / "mmbench" if fmt == "mmbench" else None


def read_release(path: str | os.PathLike, *, image_root: str | os.PathLike, task: str,
                 fmt: str) -> tuple[list[Sample], list[RecordError]]:
    """Every question of one official release file (for ``mme``: the release folder) and every problem found."""
    if fmt not in READERS:
        raise ValueError(f"not a release format: {fmt!r}; one of {', '.join(READERS)}")
    path = Path(path)
    folder = fmt in FOLDER_FORMATS
    if not (path.is_dir() if folder else path.is_file()):
        what = "release folder" if folder else "annotation file"
        return [], [RecordError(f"{what} not found", file=path, kind="missing_file")]
    return READERS[fmt](path, Path(image_root), task)


class _Collector:
    """The samples and problems of one read."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.samples: list[Sample] = []
        self.errors: list[RecordError] = []
        self._ids: set[str] = set()

    def fail(self, message: str, *, file: Path, index: int | None = None, line: int | None = None,
             kind: str = "malformed") -> None:
        self.errors.append(RecordError(message, file=file, index=index, line=line, kind=kind))

    def add(self, *, sample_id: str, image: Path | None, question: str, answer: str, meta: dict[str, Any],
            file: Path, index: int, line: int | None = None) -> None:
        meta["origin"] = {"file": str(file), "index": index, "line": line}
        user = IMAGE_PREFIX + question if image is not None else question
        self.samples.append(Sample(id=sample_id, task=self.task,
                                   image=os.path.normpath(image) if image is not None else None,
                                   turns=[(user, answer)], meta=meta))

    def result(self) -> tuple[list[Sample], list[RecordError]]:
        return self.samples, self.errors


def _load_json(path: Path, out: _Collector, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        out.fail(f"{what} not found", file=path, kind="missing_file")
    except json.JSONDecodeError as exc:
        out.fail(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", file=path, kind="unreadable_json")
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        out.fail(f"cannot read {what} ({type(exc).__name__}: {str(exc)[:120]})", file=path, kind="unreadable_json")
    return None


def _text(record: dict, key: str, *, allow_empty: bool = False) -> str | None:
    value = record.get(key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        return None
    return value


def _missing(record: dict, keys: tuple[str, ...]) -> str:
    """Which of `keys` a record lacks (or, when none is absent, what they hold, for a key of the wrong type)."""
    absent = [k for k in keys if record.get(k) is None or record.get(k) == ""]
    if absent:
        return f"missing or empty: {', '.join(absent)}"
    return "got " + ", ".join(f"{k}={str(record.get(k))[:40]!r}" for k in keys)


def _options(choices: list[str]) -> str:
    return "".join(f"\n{_LETTERS[i]}. {choice}" for i, choice in enumerate(choices))


# --- POPE ------------------------------------------------------------------------------------------------------------


def read_pope(path: Path, image_root: Path, task: str) -> tuple[list[Sample], list[RecordError]]:
    """AoiDragon/POPE ``output/coco/coco_pope_<category>.json``: one JSON object per line, ``{"question_id", "image",
    "text", "label"}``; the category is the file name's last word, as eval_pope.py takes it."""
    out = _Collector(task)
    raws, out.errors = read_raw(path, "jsonl")
    category = path.stem.rsplit("_", 1)[-1]
    for raw in raws:
        record = raw.data
        where = {"file": path, "index": raw.index, "line": raw.line}
        if not isinstance(record, dict):
            out.fail(f"expected a JSON object, got {type(record).__name__}", **where)
            continue
        qid, image, text = record.get("question_id"), _text(record, "image"), _text(record, "text")
        label = record.get("label")
        if qid is None or image is None or text is None:
            shown = _missing(record, ("question_id", "image", "text"))
            out.fail(f'POPE records need "question_id", "image" and "text" ({shown})', **where)
            continue
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            out.fail(f'"label" must be "yes" or "no", got {label!r}', **where)
            continue
        label = label.strip().lower()
        out.add(sample_id=str(qid), image=image_root / image, question=text, answer=label,
                meta={"label": label, "category": category}, **where)
    return out.result()


# --- MME -------------------------------------------------------------------------------------------------------------


def read_mme(folder: Path, image_root: Path, task: str) -> tuple[list[Sample], list[RecordError]]:
    """MME_Benchmark_release_version/: per subtask, ``<stem>.txt`` files of two ``question<TAB>Yes|No`` lines, with the
    image ``<stem>.jpg|.png`` beside them, or ``questions_answers_YN/<stem>.txt`` with ``images/<stem>.*`` (the
    release arranges artwork, celebrity, landmark, posters and scene that way)."""
    out = _Collector(task)
    base = folder
    if not any((folder / s).is_dir() for s in MME_SUBTASKS) and (folder / _MME_NESTED).is_dir():
        base = folder / _MME_NESTED
    present = [s for s in MME_SUBTASKS if (base / s).is_dir()]
    if not present:
        held = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
        out.fail(f"no MME subtask folder ({', '.join(MME_SUBTASKS[:3])}, ...) here nor under {_MME_NESTED}/; it "
                 f"holds: {held}. Point the card at the unzipped MME_Benchmark_release_version/", file=folder,
                 kind="missing_file")
        return out.result()
    for subtask in present:
        sub = base / subtask
        split = all((sub / d).is_dir() for d in _MME_SPLIT_DIRS)
        qa_dir, img_dir = (sub / "questions_answers_YN", sub / "images") if split else (sub, sub)
        images = {p.stem: p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES}
        txts = sorted(qa_dir.glob("*.txt"))
        if not txts:
            out.fail(f"subtask {subtask!r} has no question file (<image>.txt)", file=qa_dir, kind="missing_file")
        for txt in txts:
            _read_mme_pair(txt, subtask, images.get(txt.stem), img_dir, out)
    return out.result()


def _read_mme_pair(txt: Path, subtask: str, image: Path | None, img_dir: Path, out: _Collector) -> None:
    if image is None:
        out.fail(f"no image {txt.stem}.jpg or {txt.stem}.png in {img_dir} for this question file", file=txt,
                 kind="missing_image")
        return
    try:
        lines = txt.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        out.fail(f"cannot read MME question file ({exc})", file=txt, kind="unreadable_json")
        return
    pairs: list[tuple[int, str, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # the release's files may end with an empty line
        parts = line.split("\t")
        if len(parts) != 2:
            found = "no tab" if len(parts) == 1 else f"{len(parts) - 1} tabs"
            out.fail(f"{found} in the line; MME question files hold `question<TAB>Yes|No` per line", file=txt,
                     index=len(pairs), line=number)
            return
        question, answer = parts[0].strip(), parts[1].strip()
        if answer.lower() not in ("yes", "no") or not question:
            out.fail(f"expected `question<TAB>Yes|No`, got the answer {answer!r}", file=txt, index=len(pairs),
                     line=number)
            return
        pairs.append((number, question, answer))
    if len(pairs) != 2:
        out.fail(f"{len(pairs)} question(s); MME asks two per image (acc+ counts the image when both are right)",
                 file=txt)
        return
    image_id = f"{subtask}/{image.name}"
    for k, (number, question, answer) in enumerate(pairs):
        asked = question[: -len(MME_INSTRUCTION)].rstrip() if question.endswith(MME_INSTRUCTION) else question
        out.add(sample_id=f"{image_id}#{k + 1}", image=image, question=asked, answer=answer,
                meta={"category": subtask, "image_id": image_id, "subsample_group": image_id,
                      "source": {"question": question}},
                file=txt, index=k, line=number)


# --- MMBench ---------------------------------------------------------------------------------------------------------


def _is_none(value: str | None) -> bool:
    """model_vqa_mmbench.py's test for an absent cell (pandas reads it as NaN): empty, "nan" or "none"."""
    return value is None or value.strip().lower() in ("", "nan", "none")


def _image_suffix(data: bytes) -> str:
    for magic, suffix in ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp")):
        if data.startswith(magic):
            return suffix
    return ".webp" if data[8:12] == b"WEBP" else ".img"


def read_mmbench(tsv: Path, image_root: Path, task: str) -> tuple[list[Sample], list[RecordError]]:
    """MMBench's TSV (``index, question, hint, A-D, answer, category, image`` (base64), ``source, l2-category,
    comment, split``): one record per row, the CircularEval copies included as the file holds them.

    The images go to ``<cache>/mmbench/<sha256 of the TSV>/<sha256 of the image>.<ext>`` (one file per distinct image,
    so a question's rotated copies share one): built row by row in a private temporary folder (one image in memory at
    a time) and renamed into place with a ``manifest.json`` (index -> file) once complete, so a reader never sees half
    a folder and a second load decodes nothing. Two processes building at once both finish; the first rename wins.
    """
    out = _Collector(task)
    folder = decoded_image_root("mmbench") / sha256(tsv)[:32]
    manifest = _read_manifest(folder, out)
    if manifest is None and folder.exists():
        return out.result()  # a folder we did not write: _read_manifest reported it
    build = manifest is None
    target = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}") if build else folder
    written: dict[str, str] = dict(manifest or {})
    try:
        if build:
            target.mkdir(parents=True)
        _read_mmbench_rows(tsv, folder, target, written, build, out)
        if build:
            (target / _MMBENCH_MANIFEST).write_text(json.dumps(written), encoding="utf-8")
            try:
                os.rename(target, folder)
            except OSError:  # another process published the same folder first (same TSV, same content)
                if not (folder / _MMBENCH_MANIFEST).is_file():
                    raise
    except OSError as exc:
        out.fail(f"cannot write the decoded images to {folder} ({exc}); set MCIT_CACHE to a writable folder",
                 file=tsv, kind="unreadable_image")
    finally:
        if build and target.exists():
            shutil.rmtree(target, ignore_errors=True)
    return out.result()


def _read_manifest(folder: Path, out: _Collector) -> dict[str, str] | None:
    path = folder / _MMBENCH_MANIFEST
    if not folder.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            return data
    except (OSError, ValueError):
        pass
    out.fail(f"the image cache folder {folder} has no readable {_MMBENCH_MANIFEST}: it was not written by mcit or was "
             f"damaged; delete the folder and load again", file=path, kind="unreadable_image")
    return None


def _read_mmbench_rows(tsv: Path, folder: Path, target: Path, written: dict[str, str], build: bool,
                       out: _Collector) -> None:
    # MMBench rows carry whole base64 images, far above csv's default 128 KiB field bound; raising the (process-wide)
    # bound only lets larger fields through.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with open(tsv, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        missing = [c for c in _MMBENCH_REQUIRED if c not in (header or [])]
        if header is None or missing:
            out.fail(f"not an MMBench TSV: the header lacks the column(s) {', '.join(missing)} (header: "
                     f"{(header or [])[:14]})", file=tsv, line=1)
            return
        letters = [c for c in _MMBENCH_OPTIONS if c in header]
        start = rows.line_num + 1
        for index, row in enumerate(rows):
            where = {"file": tsv, "index": index, "line": start}
            start = rows.line_num + 1
            if len(row) != len(header):
                out.fail(f"{len(row)} tab-separated fields, the header has {len(header)}", **where)
                continue
            _mmbench_record(dict(zip(header, row)), letters, folder, target, written, build, out, where)


def _mmbench_record(cells: dict[str, str], letters: list[str], folder: Path, target: Path, written: dict[str, str],
                    build: bool, out: _Collector, where: dict) -> None:
    raw_index = cells["index"].strip()
    if not raw_index.isdigit():
        out.fail(f"'index' must be an integer (copies are numbered index + k * 1000000), got {raw_index[:20]!r}",
                 **where)
        return
    if _is_none(cells["question"]):
        out.fail("'question' is empty", **where)
        return
    choices: list[str] = []
    for letter in letters:  # model_vqa_mmbench.py: the options stop at the first absent one
        if _is_none(cells[letter]):
            break
        choices.append(cells[letter])
    if len(choices) < 2:
        out.fail(f"{len(choices)} option(s) in columns {', '.join(letters)}; a multiple-choice row needs two", **where)
        return
    answer = "" if _is_none(cells.get("answer")) else cells["answer"].strip()
    if answer and answer not in _LETTERS[: len(choices)]:
        out.fail(f"'answer' {answer!r} is not one of the row's option letters {_LETTERS[: len(choices)]}", **where)
        return
    name = written.get(raw_index)
    if name is None:  # building, or a row the cache could not decode last time
        name = _decode_mmbench_image(cells["image"], target if build else None, out, where)
        if name is None:
            return
        if build:
            written[raw_index] = name
    question = cells["question"] if _is_none(cells.get("hint")) else f"{cells['hint']}\n{cells['question']}"
    meta: dict[str, Any] = {"index": int(raw_index), "choices": choices,
                            "subsample_group": int(raw_index) % MMBENCH_COPY_STRIDE}
    if not _is_none(cells.get("category")):
        meta["category"] = cells["category"]
    extra = {k: v for k, v in cells.items() if k not in ("index", "question", "hint", "answer", "category", "image",
                                                         *letters) and not _is_none(v)}
    if extra:
        meta["source"] = extra
    out.add(sample_id=raw_index, image=folder / name, question=question + _options(choices), answer=answer,
            meta=meta, **where)


def _decode_mmbench_image(value: str, target: Path | None, out: _Collector, where: dict) -> str | None:
    """Decode one row's base64 image and (when building) write it under its content hash; returns the file name."""
    try:
        data = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        out.fail(f"'image' is not base64 ({exc})", kind="unreadable_image", **where)
        return None
    if not data:
        out.fail("'image' is empty", kind="unreadable_image", **where)
        return None
    name = hashlib.sha256(data).hexdigest()[:32] + _image_suffix(data)
    if target is not None and not (target / name).exists():
        (target / name).write_bytes(data)
    return name


# --- SEED-Bench ------------------------------------------------------------------------------------------------------


def read_seed_bench(path: Path, image_root: Path, task: str) -> tuple[list[Sample], list[RecordError]]:
    """AILab-CVC/SEED-Bench ``SEED-Bench.json``: ``{"questions": [{"question_id", "question", "choice_a".."choice_d",
    "answer", "data_id", "data_type", "question_type_id"}], "question_type": {...}}``; the image questions only (the
    video dimensions need frames extracted from separately downloaded videos)."""
    out = _Collector(task)
    data = _load_json(path, out, "SEED-Bench annotation file")
    if data is None:
        return out.result()
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list):
        out.fail('expected an object with a "questions" list (SEED-Bench.json)', file=path)
        return out.result()
    keys = ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_id",
            "question_type_id")
    for i, q in enumerate(questions):
        where = {"file": path, "index": i}
        if not isinstance(q, dict):
            out.fail(f"questions[{i}] is not an object", **where)
            continue
        if q.get("data_type") != "image":
            continue
        choices = [_text(q, f"choice_{c}", allow_empty=True) for c in "abcd"]
        type_id = q.get("question_type_id")
        if (q.get("question_id") is None or _text(q, "question") is None or None in choices
                or _text(q, "data_id") is None or not isinstance(type_id, int) or isinstance(type_id, bool)):
            out.fail(f"questions[{i}]: an image question needs {', '.join(keys)} ({_missing(q, keys)})", **where)
            continue
        if q.get("answer") not in ("A", "B", "C", "D"):
            out.fail(f"questions[{i}].answer must be A, B, C or D, got {q.get('answer')!r}", **where)
            continue
        out.add(sample_id=str(q["question_id"]), image=image_root / q["data_id"],
                question=q["question"] + _options(choices), answer=q["answer"],
                meta={"question_type_id": type_id, "choices": choices}, **where)
    return out.result()


# --- ScienceQA -------------------------------------------------------------------------------------------------------


def read_scienceqa(path: Path, image_root: Path, task: str) -> tuple[list[Sample], list[RecordError]]:
    """lupantech/ScienceQA ``data/scienceqa/problems.json`` (``{pid: {"question", "choices", "answer", "hint",
    "image", ...}}``) with ``pid_splits.json`` beside it: the ``test`` problems that have an image (ScienceQA-IMG, the
    number LLaVA-1.5 reports). Images are ``images/test/<pid>/<image>``, i.e. ``<pid>/<image>`` under the image
    root."""
    out = _Collector(task)
    problems = _load_json(path, out, "ScienceQA problems.json")
    splits_path = path.parent / "pid_splits.json"
    splits = _load_json(splits_path, out, "ScienceQA pid_splits.json (expected beside problems.json)")
    if problems is None or splits is None:
        return out.result()
    if not isinstance(problems, dict):
        out.fail("expected an object of problems keyed by problem id", file=path)
        return out.result()
    test = splits.get("test") if isinstance(splits, dict) else None
    if not isinstance(test, list):
        out.fail('expected an object with a "test" list of problem ids', file=splits_path)
        return out.result()
    for i, pid in enumerate(test):
        problem = problems.get(str(pid))
        if not isinstance(problem, dict):
            out.fail(f"test[{i}] names problem {pid!r}, which problems.json does not hold", file=splits_path, index=i)
            continue
        if problem.get("image") is None:
            continue
        where = {"file": path, "index": i}
        choices, answer, hint = problem.get("choices"), problem.get("answer"), problem.get("hint") or ""
        if (_text(problem, "question") is None or not isinstance(problem["image"], str) or not isinstance(hint, str)
                or not isinstance(choices, list) or not 2 <= len(choices) <= len(_LETTERS)
                or not all(isinstance(c, str) for c in choices)):
            out.fail(f"problem {pid!r} needs 'question', 'image', 'choices' (2 or more strings) and 'hint' "
                     f"({_missing(problem, ('question', 'image', 'choices', 'hint'))})", **where)
            continue
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            out.fail(f"problem {pid!r}: 'answer' must index its {len(choices)} choices, got {answer!r}", **where)
            continue
        context = f"Context: {hint}\n" if hint.strip() else ""
        source = {k: problem[k] for k in ("subject", "topic", "category", "skill", "grade") if k in problem}
        out.add(sample_id=str(pid), image=image_root / str(pid) / problem["image"],
                question=context + problem["question"] + _options(choices), answer=_LETTERS[answer],
                meta={"choices": list(choices), "source": source}, **where)
    return out.result()


# --- TextVQA ---------------------------------------------------------------------------------------------------------


def read_textvqa(path: Path, image_root: Path, task: str) -> tuple[list[Sample], list[RecordError]]:
    """TextVQA ``TextVQA_0.5.1_val.json``: ``{"data": [{"question_id", "question", "image_id", "answers": [10]}]}``;
    the images are ``train_images/<image_id>.jpg`` (TextVQA's val images ship in the train_val zip)."""
    out = _Collector(task)
    data = _load_json(path, out, "TextVQA annotation file")
    if data is None:
        return out.result()
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        out.fail('expected an object with a "data" list (TextVQA_0.5.1_val.json)', file=path)
        return out.result()
    for i, entry in enumerate(entries):
        where = {"file": path, "index": i}
        answers = entry.get("answers") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or entry.get("question_id") is None or _text(entry, "question") is None
                or _text(entry, "image_id") is None or not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) for a in answers)):
            shown = _missing(entry, ("question_id", "question", "image_id", "answers")) if isinstance(entry, dict) \
                else type(entry).__name__
            out.fail(f"data[{i}] needs 'question_id', 'question', 'image_id' and a list of human 'answers' ({shown})",
                     **where)
            continue
        question = entry["question"].strip()
        counts = Counter(answers)
        answer = max(answers, key=lambda a: counts[a])  # the first of the most common answers
        out.add(sample_id=str(entry["question_id"]), image=image_root / f"{entry['image_id']}.jpg",
                question=question[:1].upper() + question[1:], answer=answer,
                meta={"references": list(answers)}, **where)
    return out.result()


# --- GQA -------------------------------------------------------------------------------------------------------------


def read_gqa(path: Path, image_root: Path, task: str) -> tuple[list[Sample], list[RecordError]]:
    """GQA ``testdev_balanced_questions.json``: ``{question_id: {"imageId", "question", "answer", "isBalanced",
    ...}}``; the images are ``images/<imageId>.jpg``. GQA's eval.py scores the balanced questions only."""
    out = _Collector(task)
    data = _load_json(path, out, "GQA questions file")
    if data is None:
        return out.result()
    if not isinstance(data, dict):
        out.fail("expected an object of questions keyed by question id (GQA's *_questions.json)", file=path)
        return out.result()
    for i, (qid, q) in enumerate(data.items()):
        where = {"file": path, "index": i}
        if not isinstance(q, dict) or _text(q, "imageId") is None or _text(q, "question") is None \
                or _text(q, "answer") is None:
            shown = _missing(q, ("imageId", "question", "answer")) if isinstance(q, dict) else type(q).__name__
            out.fail(f"question {qid!r} needs 'imageId', 'question' and 'answer' ({shown})", **where)
            continue
        if q.get("isBalanced") is False:
            continue
        meta = {"source": {"fullAnswer": q["fullAnswer"]}} if isinstance(q.get("fullAnswer"), str) else {}
        out.add(sample_id=str(qid), image=image_root / f"{q['imageId']}.jpg", question=q["question"],
                answer=q["answer"], meta=meta, **where)
    return out.result()


READERS: dict[str, Reader] = {"mme": read_mme, "mmbench": read_mmbench, "pope": read_pope,
                              "seed_bench": read_seed_bench, "scienceqa": read_scienceqa, "textvqa": read_textvqa,
                              "gqa": read_gqa}
if set(READERS) != set(RELEASE_FORMATS):  # the names are declared in formats (cards validate against them)
    raise ImportError(f"release readers {sorted(READERS)} do not match formats.RELEASE_FORMATS "
                      f"{sorted(RELEASE_FORMATS)}")
