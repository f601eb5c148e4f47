"""Validate a data card: every problem of every sample, each with its file and index (and line for JSONL).

A loader stops at the first error; a user fixing a 40k-sample file wants the whole list at once, grouped by kind,
so this module parses leniently (formats.read_split) and keeps going.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mcit.data.cards import DataCard
from mcit.data.formats import RecordError, read_split
from mcit.data.images import open_image, probe_image, resolve_within
from mcit.data.records import IMAGE_TOKEN, Sample
from mcit.errors import DataError

IMAGE_CHECKS = ("none", "exists", "header", "decode")
"""How hard images are checked: not at all, that the file exists, that its header reads within the pixel bound (the
default), or that all its pixels decode (finds truncated files a header check passes; slower: it reads every byte)."""


@dataclass(frozen=True)
class Problem:
    """One defect. `index` is the sample's position in the file (None for file-level problems)."""

    file: str
    index: int | None
    kind: str
    message: str
    line: int | None = None
    task: str = ""
    split: str = ""

    def format(self) -> str:
        where = self.file
        if self.index is not None:
            where += f": sample {self.index}"
        if self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: [{self.kind}] {self.message}"


@dataclass
class ValidationReport:
    """All problems found, plus how many samples each task split holds."""

    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    """"task/split" -> number of samples that parsed."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def format(self, max_per_kind: int | None = 20) -> str:
        """Human-readable report; long lists are cut per kind so one systematic defect does not hide the rest."""
        lines = [f"{name}: {n} samples" for name, n in self.counts.items()]
        if self.ok:
            return "\n".join(lines + ["OK: no problems found"])
        lines.append(f"{len(self.problems)} problems: " + ", ".join(f"{k} {n}" for k, n in self.by_kind().items()))
        shown: Counter = Counter()
        for problem in self.problems:
            shown[problem.kind] += 1
            if max_per_kind is None or shown[problem.kind] <= max_per_kind:
                lines.append("  " + problem.format())
        for kind, n in shown.items():
            if max_per_kind is not None and n > max_per_kind:
                lines.append(f"  ... and {n - max_per_kind} more [{kind}] problems")
        return "\n".join(lines)


def validate_card(card: DataCard, splits: tuple[str, ...] = ("train", "test"), *, check_images: str = "header",
                  max_pixels: int | None = None) -> ValidationReport:
    """Check every sample of every task split of `card` and report all problems at once."""
    if check_images not in IMAGE_CHECKS:
        raise DataError(f"check_images must be one of {', '.join(IMAGE_CHECKS)}, got {check_images!r}")
    report = ValidationReport()
    image_cache: dict[str, tuple[str, str] | None] = {}
    train_keys: dict[tuple[str | None, str], tuple[str, int | None]] = {}
    test_samples: list[tuple[Sample, str]] = []
    for raw in card.tasks:
        task = card.task(raw.name)  # with the paths of the release layout in use
        for split in splits:
            if getattr(task, split) is None:
                continue
            path = card.annotation_path(task.name, split)
            samples, problems = _check_split(path, card.image_root(task.name), task.name, split, task.format,
                                             check_images, max_pixels, image_cache,
                                             answers_joined=split == "test" and bool(task.annotations))
            report.counts[f"{task.name}/{split}"] = len(samples)
            report.problems.extend(problems)
            if split == "test" and not problems and (task.references or task.annotations):
                report.problems.extend(_check_test_answers(card, task.name, path))
            for sample in samples:
                key = _overlap_key(sample)
                if split == "train":
                    train_keys.setdefault(key, (str(path), sample.meta["origin"]["index"]))
                else:
                    test_samples.append((sample, split))
    for sample, split in test_samples:
        hit = train_keys.get(_overlap_key(sample))
        if hit is not None:
            report.problems.append(_problem(sample, split, "train_test_overlap",
                                            f"same image and question as training sample {hit[1]} of {hit[0]}"))
    return report


def _check_test_answers(card: DataCard, task: str, path: Path) -> list[Problem]:
    """The joins a test split is scored with (caption references by position, official answers by question id):
    a mismatch is one file-level problem naming the files, rather than a run that scores against a partial set."""
    try:
        card.load_task(task, "test")
    except DataError as exc:
        kind = "references" if card.task(task).references and "caption" in str(exc) else "annotations"
        return [Problem(file=str(path), index=None, kind=kind, message=str(exc), task=task, split="test")]
    return []


def validate_file(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, fmt: str = "auto",
                  task: str | None = None, check_images: str = "header",
                  max_pixels: int | None = None) -> ValidationReport:
    """Validate one annotation file outside any card (e.g. before writing a card for it)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    samples, problems = _check_split(path, root, task or path.stem, "", fmt, check_images, max_pixels, {})
    return ValidationReport(problems=problems, counts={str(path): len(samples)})


def filter_valid(samples: list[Sample], report: ValidationReport) -> tuple[list[Sample], int]:
    """Drop the samples a report flagged (matched by their origin file and index); returns (kept, skipped).

    For recipes that choose to skip bad samples rather than stop; the caller should log the skipped count.
    """
    bad = {(p.file, p.index) for p in report.problems if p.index is not None}
    kept = [s for s in samples if _origin(s) not in bad]
    return kept, len(samples) - len(kept)


def _check_split(path: Path, image_root: Path, task: str, split: str, fmt: str, check_images: str,
                 max_pixels: int | None, image_cache: dict, *, answers_joined: bool = False,
                 ) -> tuple[list[Sample], list[Problem]]:
    """Problems of one annotation file; `answers_joined`: the answers come from an official annotation file (the
    card's `annotations`), so a record without one is expected."""
    samples, errors = read_split(path, image_root=image_root, task=task, fmt=fmt)
    problems = [_from_record_error(e, task, split) for e in errors]
    first_index_of: dict[str, int] = {}
    for sample in samples:
        index = sample.meta["origin"]["index"]
        if sample.id in first_index_of:
            problems.append(_problem(sample, split, "duplicate_id",
                                     f"id {sample.id!r} already used by sample {first_index_of[sample.id]}"))
        else:
            first_index_of[sample.id] = index
        n_placeholders = sum(user.count(IMAGE_TOKEN) + reply.count(IMAGE_TOKEN) for user, reply in sample.turns)
        n_images = 0 if sample.image is None else 1
        if n_placeholders != n_images:
            problems.append(_problem(sample, split, "placeholder_count",
                                     f"{n_placeholders} '{IMAGE_TOKEN}' placeholders but {n_images} images"))
        for turn, (_, reply) in enumerate(sample.turns):
            if reply.strip() or (answers_joined and turn == len(sample.turns) - 1):
                continue
            if split == "test":
                problems.append(_problem(sample, split, "missing_answer", "test record without an answer: nothing to "
                                         "score it against (add it, or name the official annotation file that holds "
                                         "the answers in the card's `annotations`)"))
            else:
                problems.append(_problem(sample, split, "missing_answer", f"turn {turn} has an empty or missing answer"))
        if sample.image is not None and check_images != "none":
            issue = _check_image(sample.image, image_root, check_images, max_pixels, image_cache)
            if issue is not None:
                problems.append(_problem(sample, split, *issue))
    problems.sort(key=lambda p: -1 if p.index is None else p.index)
    return samples, problems


def _check_image(image: str, root: Path, mode: str, max_pixels: int | None,
                 cache: dict) -> tuple[str, str] | None:
    """(kind, message) for a bad image, cached per path because VQA sets ask many questions about one image."""
    key = (image, str(root))
    if key in cache:
        return cache[key]
    issue: tuple[str, str] | None = None
    try:
        real = resolve_within(image, root)
    except DataError:
        issue = ("image_escape", f"image {image} resolves to {os.path.realpath(image)}, outside the image root {root}")
    else:
        if not real.is_file():
            issue = ("missing_image", f"image {image} not found")
        elif mode in ("header", "decode"):
            try:
                if mode == "header":
                    probe_image(real, root, max_pixels=max_pixels)
                else:
                    open_image(real, root, max_pixels=max_pixels).close()
            except DataError as exc:
                issue = ("unreadable_image", str(exc))
    cache[key] = issue
    return issue


def _overlap_key(sample: Sample) -> tuple[str | None, str]:
    image = os.path.realpath(sample.image) if sample.image else None
    return image, " ".join(sample.question.lower().split())


def _origin(sample: Sample) -> tuple[str, int] | None:
    origin = sample.meta.get("origin")
    return (origin["file"], origin["index"]) if origin else None


def _problem(sample: Sample, split: str, kind: str, message: str) -> Problem:
    origin = sample.meta["origin"]
    return Problem(file=origin["file"], index=origin["index"], line=origin["line"], kind=kind, message=message,
                   task=sample.task, split=split)


def _from_record_error(error: RecordError, task: str, split: str) -> Problem:
    return Problem(file=error.file, index=error.index, line=error.line, kind=error.kind, message=error.detail,
                   task=task, split=split)
