"""Data cards: a benchmark as data (YAML) — where its files are, in which order its tasks come, how to score them.

A card is validated when loaded, so a typo (`scorer_option:`) fails at once with the closest valid key instead of
being silently ignored hours into a run. The root is kept as written (`${MCIT_UCIT_ROOT}`) and expanded only when
files are touched, so recipes can name a card whose data is not on this machine (listing tasks, dry runs).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mcit.data.boxes import BOX_FRAMES
from mcit.data.formats import FOLDER_FORMATS, FORMATS, load_split
from mcit.data.records import ANSWER_STYLES, Sample
from mcit.data.references import ANSWER_SOURCES, attach_caption_references, attach_official_answers
from mcit.data.releases import decoded_image_root
from mcit.data.signature import AnswerSignature
from mcit.errors import DataError
from mcit.schema import NOT_A_KEY, from_mapping, suggest

SCORERS = ("exact_match", "mc_letter", "numeric", "yesno", "contains", "caption", "caption_mean", "iou", "vqa",
           "mllm_dcl", "mme", "pope", "mmbench", "seed_bench", "scene_attributes")
"""The scorer names a card may use. Cards are validated here, below the evaluation layer, so the names are declared
here; `mcit.evaluation.scorers.register_scorer` refuses any other name."""
SPLITS = ("train", "test")

CARDS_DIR = Path(__file__).resolve().parents[1] / "assets" / "data_cards"
"""The shipped cards (`mcit/assets/data_cards/<name>.yaml`), package data so that `card: ucit` works in any install."""
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class TaskSpec:
    """One task of a benchmark. Paths are relative to the card root."""

    name: str
    train: str | None = None
    """Training annotation file."""
    test: str | None = None
    """Test annotation file."""
    image_root: str | None = None
    """Folder image paths are relative to (default: the card root, as in the UCIT/CoIN releases)."""
    format: str = "auto"
    """auto | llava | jsonl | sharegpt, or a general-ability release format (formats.RELEASE_FORMATS)."""
    answer_style: str = "free"
    """The form answers take; the format checker and ASD use it."""
    scorer: str = "exact_match"
    scorer_options: dict[str, Any] = field(default_factory=dict)
    candidates: list[str] | str | None = None
    """Valid answers for constrained scoring, or `auto` = the set of training answers."""
    max_train: int | None = None
    """Keep at most this many training samples (a deterministic subset chosen by the seed)."""
    max_test: int | None = None
    instruction_suffix: str | None = None
    """Appended on a new line to the first user turn when the data does not already end with it."""
    references: str | None = None
    """A COCO-style caption file (`{"images": [...], "annotations": [{"image_id", "caption"}]}`) holding every
    reference caption of the test split; image_id k names the k-th test record (1-based, file order), as the UCIT
    evaluation matches them. The captions go to `meta["references"]` of the test samples."""
    annotations: str | None = None
    """An official annotation file the test answers are joined from (by question id), e.g. TextVQA's ten human
    answers per question; `annotations_kind` says which format (mcit/data/references.py: ANSWER_SOURCES)."""
    annotations_kind: str | None = None
    eval_suffix: str | None = None
    """Appended (after a space) to the first user turn of the test split only, as the released inference script does
    for this task (e.g. MLLM-DCL Med: " Answer the question with a single word (or phrase).")."""
    eval_suffix_by_answer: dict[str, str] = field(default_factory=dict)
    """Test-split suffix chosen by the reference answer (MLLM-DCL Fin: a yes/no instruction for Yes/No answers, a
    letter instruction otherwise: `{"Yes": ..., "No": ..., "*": ...}`); wins over `eval_suffix`."""
    box_frame: str = "image"
    """For box answers: the frame the release's boxes are normalised in (`image`, `square` = LLaVA's padded square,
    `crop`); a run rewrites them into the frame its preprocessing shows the model (mcit/data/boxes.py)."""


@dataclass
class LayoutTask:
    """Where one task's files are in one release layout (paths relative to the card root)."""

    name: str
    train: str | None = None
    test: str | None = None
    image_root: str | None = None
    references: str | None = None
    annotations: str | None = None


@dataclass
class Layout:
    """One published arrangement of a benchmark's files. A card may list several (the same benchmark released by
    different projects); the first whose files are all present under the root is used, or the one `layout:` names."""

    name: str
    tasks: list[LayoutTask]
    description: str = ""
    image_root: str | None = None
    """Image folder of every task in this layout (a task's own `image_root` wins)."""


@dataclass
class DataCard:
    """A benchmark: an ordered list of tasks under one root."""

    name: str
    tasks: list[TaskSpec]
    description: str = ""
    root: str = "."
    """Data folder; `${ENV}`, `${ENV:-default}` and `~` are expanded; relative roots are relative to the card."""
    citation: str | None = None
    generator: str | None = None
    """`synthcit`: the data is generated on first use into `root` (see mcit/data/synthcit.py)."""
    layouts: list[Layout] = field(default_factory=list)
    """Release layouts this card accepts (empty: the tasks' own paths are the only layout)."""
    layout: str | None = None
    """The layout to use; unset: detected from the files under the root."""
    path: Path | None = field(default=None, compare=False, repr=False, metadata=NOT_A_KEY)
    """The card file (not a YAML key); relative roots hang off its folder."""
    _candidate_cache: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)
    _resolved: str | None = field(default=None, compare=False, repr=False)
    _signature_cache: dict[str, dict] = field(default_factory=dict, compare=False, repr=False)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def task(self, name: str) -> TaskSpec:
        """The task's spec; where the card has layouts, its file paths are those of the layout in use (resolved from
        the files under the root on first use)."""
        for task in self.tasks:
            if task.name == name:
                return self._with_layout(task) if self.layouts else task
        raise DataError(f"{self._where()}: no task {name!r}{suggest(name, self.task_names)}; "
                        f"tasks: {', '.join(self.task_names)}")

    @property
    def root_dir(self) -> Path:
        """The expanded root (raises DataError naming the environment variable when it is unset).

        In a launched process (one rank of a multi-node job) a root that is not a folder is an error at once, naming
        the variable, the host and the rank: each node reads its own environment and disks, and a node without the
        data should stop the job before the model is built. A generated card (SynthCIT) is exempt: it builds its root.
        """
        root = expand_root(self.root, self.path)
        if self.generator is None and not root.is_dir():
            where = _launched_where()
            if where:
                names = [m.group(1) for m in _ENV_PATTERN.finditer(self.root)]
                what = f"the environment variable {names[0]}" if names else "the card's root"
                value = f"={os.environ.get(names[0])!r}" if names else f" {self.root!r}"
                raise DataError(f"{self._where()}: {what}{value} points to {root}, which is not a folder {where}; "
                                f"every node needs the data at that path (or its own value of the variable)")
        return root

    def select(self, names: list[str]) -> DataCard:
        """A copy of the card with only these tasks, in this order (an unknown name raises with a suggestion). Layout
        detection then looks only for these tasks' files, so a partial download can run the tasks it has."""
        specs = {t.name: t for t in self.tasks}
        for name in names:
            if name not in specs:
                self.task(name)  # raises with a suggestion
        return dataclasses.replace(self, tasks=[specs[n] for n in names], _resolved=None, _candidate_cache={},
                                   _signature_cache={})

    def _with_layout(self, task: TaskSpec) -> TaskSpec:
        layout = self.layout_in_use()
        entry = next(t for t in layout.tasks if t.name == task.name)
        return dataclasses.replace(
            task, train=entry.train, test=entry.test, references=entry.references,
            annotations=entry.annotations or task.annotations,
            image_root=task.image_root or entry.image_root or layout.image_root)

    def layout_in_use(self) -> Layout:
        """The layout whose files are under the root: the one `layout:` names, else the first listed whose every
        annotation file (train, test, caption references) of the card's tasks exists. When none matches, one
        DataError lists each layout tried, the files it expected and what the root holds."""
        if not self.layouts:
            raise DataError(f"{self._where()}: the card lists no layouts")
        if self._resolved is None:
            if self.layout is not None:
                self._resolved = self.layout_named(self.layout).name
            else:
                self._resolved = self._detect_layout().name
        return self.layout_named(self._resolved)

    def layout_named(self, name: str) -> Layout:
        for layout in self.layouts:
            if layout.name == name:
                return layout
        names = [lay.name for lay in self.layouts]
        raise DataError(f"{self._where()}: layout {name!r} is not one of this card's layouts"
                        f"{suggest(name, names)}; choose one of {', '.join(names)}")

    def _layout_files(self, layout: Layout) -> list[str]:
        wanted = {t.name for t in self.tasks}
        entries = [t for t in layout.tasks if t.name in wanted]
        return [p for t in entries for p in (t.train, t.test, t.references, t.annotations) if p]

    def _detect_layout(self) -> Layout:
        root = self.root_dir
        if not root.is_dir():
            raise DataError(f"{self._where()}: data root {root} not found (root {self.root!r}); point it at the "
                            f"benchmark's folder (see docs/DATA.md for each release's tree)")
        tried = []
        formats = {t.name: t.format for t in self.tasks}
        for layout in self.layouts:
            files = self._layout_files(layout)
            folders = {t.test for t in layout.tasks if formats.get(t.name) in FOLDER_FORMATS}
            missing = [p for p in files if not _present(root / p, folder=p in folders)]
            if not missing:
                return layout
            tried.append((layout, len(files) - len(missing), len(files), missing))
        lines = [f"{self._where()}: the files under {root} match none of this card's layouts "
                 f"(root {self.root!r}):"]
        for layout, found, total, missing in tried:
            shown = ", ".join(missing[:6]) + (f", ... ({len(missing) - 6} more)" if len(missing) > 6 else "")
            lines.append(f"  - layout {layout.name!r} ({layout.description.strip() or 'no description'}): "
                         f"found {found} of {total} files; missing {shown}")
        best = max(tried, key=lambda t: t[1] / t[2])
        if best[1]:
            lines.append(f"  closest: {best[0].name!r}; a task's files missing from a download, or a renamed folder? "
                         f"Set `layout: {best[0].name}` in the card (or benchmark.layout in the recipe) to see "
                         f"every missing file in the validation report")
        lines.append(f"  the root holds: {_listing(root)}")
        lines.append("  see docs/DATA.md for each release's tree")
        raise DataError("\n".join(lines))

    def references_path(self, task: str) -> Path | None:
        """The task's caption reference file (COCO style), or None."""
        relative = self.task(task).references
        return self.root_dir / relative if relative else None

    def image_root(self, task: str) -> Path:
        """The folder the task's image paths are confined to; for a release whose images are embedded in its file
        (MMBench's base64 TSV) the folder they are decoded to (mcit/data/releases.py)."""
        spec = self.task(task)
        decoded = decoded_image_root(spec.format)
        if decoded is not None:
            return decoded
        return self.root_dir / spec.image_root if spec.image_root else self.root_dir

    def annotation_path(self, task: str, split: str) -> Path:
        if split not in SPLITS:
            raise DataError(f"{self._where()}: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        relative = getattr(self.task(task), split)
        if relative is None:
            raise DataError(f"{self._where()}: task {task!r} has no {split!r} file")
        return self.root_dir / relative

    def load_task(self, name: str, split: str, *, seed: int = 0, skip_malformed: bool = False) -> list[Sample]:
        """Samples of one task split with `meta["style"]` and `meta["candidates"]` attached, subsampled to
        max_train/max_test (same seed, same subset) and with the instruction suffix applied."""
        spec = self.task(name)
        path = self.annotation_path(name, split)
        if not _present(path, folder=spec.format in FOLDER_FORMATS):
            raise DataError(f"{self._where()}: task {name!r} {split} file {path} not found; root {self.root!r} "
                            f"expands to {self.root_dir} (see docs/DATA.md for the expected layout)")
        samples = load_split(path, image_root=self.image_root(name), task=name, fmt=spec.format,
                             skip_malformed=skip_malformed)
        if split == "test":
            self._attach_test_answers(spec, samples, path)
        limit = spec.max_train if split == "train" else spec.max_test
        if limit is not None and len(samples) > limit:
            rng = random.Random(f"{seed}:{self.name}:{name}:{split}")
            samples = [samples[i] for i in _subsample(samples, limit, rng)]
        candidates = self.candidates(name)
        signature = self.signature(name) if split == "test" and not candidates else None
        for sample in samples:
            if signature is not None:
                sample.meta["signature"] = signature
            sample.meta["style"] = spec.answer_style
            if candidates is not None or "candidates" not in sample.meta:
                sample.meta["candidates"] = candidates
            if spec.instruction_suffix and sample.turns:
                user, reply = sample.turns[0]
                if not user.rstrip().endswith(spec.instruction_suffix):
                    sample.turns[0] = (user.rstrip() + "\n" + spec.instruction_suffix, reply)
        return samples

    def _attach_test_answers(self, spec: TaskSpec, samples: list[Sample], path: Path) -> None:
        """What scoring a test split as released needs besides the file itself: multi-reference captions, official
        answers, the released inference suffix, and (for MLLM-DCL's per-source rules) the prompt and image name."""
        if spec.references:
            attach_caption_references(samples, self.root_dir / spec.references, path)
        if spec.annotations:
            attach_official_answers(samples, self.root_dir / spec.annotations, spec.annotations_kind or "", path)
        for sample in samples:
            suffix = spec.eval_suffix_by_answer.get(sample.answer, spec.eval_suffix_by_answer.get("*",
                                                                                                  spec.eval_suffix))
            if suffix and sample.turns:
                user, reply = sample.turns[0]
                if not user.rstrip().endswith(suffix.strip()):
                    sample.turns[0] = (user.rstrip() + " " + suffix.strip(), reply)
            if spec.scorer == "mllm_dcl":
                sample.meta["question"] = sample.question
                sample.meta["image_name"] = os.path.basename(sample.image) if sample.image else ""

    def signature(self, name: str) -> dict | None:
        """The answer signature learned from the task's training answers (`AnswerSignature.to_dict()`), which the
        format check uses to tell superficial from essential forgetting when the task has no candidate list; None
        for a task without a training file or without any answer."""
        if self.task(name).train is None:
            return None
        if name not in self._signature_cache:
            answers = self._training_answers(name)
            self._signature_cache[name] = AnswerSignature.learn(answers).to_dict() if answers else None
        return self._signature_cache[name]

    def candidates(self, name: str) -> list[str] | None:
        """The task's valid answers: the card's list, or for `auto` the sorted distinct training answers."""
        spec = self.task(name)
        if spec.candidates != "auto":
            return list(spec.candidates) if spec.candidates is not None else None
        if name not in self._candidate_cache:
            self._candidate_cache[name] = sorted({a.strip() for a in self._training_answers(name)})
        return list(self._candidate_cache[name])

    def _training_answers(self, name: str) -> list[str]:
        """The non-empty answers of the task's training file (what `candidates: auto` and the signature learn from;
        malformed records are skipped here, `validate` reports them)."""
        spec = self.task(name)
        train = load_split(self.annotation_path(name, "train"), image_root=self.image_root(name), task=name,
                           fmt=spec.format, skip_malformed=True)
        return [s.answer for s in train if s.answer.strip()]

    def _where(self) -> str:
        return str(self.path) if self.path else f"data card {self.name!r}"


def expand_root(raw: str, card_path: Path | None = None) -> Path:
    """Expand `${VAR}`, `${VAR:-default}` and `~`; a relative result is taken from the card's folder."""

    from_env: list[bool] = []

    def substitute(match: re.Match) -> str:
        var, default = match.group(1), match.group(2)
        value = os.environ.get(var)
        from_env.append(bool(value) and match.start() == 0)
        if value:
            return value
        if default is not None:
            return default
        where = str(card_path) if card_path else "data card"
        node = _launched_where()
        if node:
            raise DataError(f"{where}: root {raw!r} needs the environment variable {var}, which is unset {node}; "
                            f"set it on every node (`mcit launch --hostfile` forwards the MCIT_* variables it sees, "
                            f"see docs/DISTRIBUTED.md)")
        raise DataError(f"{where}: root {raw!r} needs the environment variable {var}; set it to the folder that "
                        f"holds this benchmark (see docs/DATA.md), e.g. `export {var}=/data/...`")

    expanded = os.path.expanduser(_ENV_PATTERN.sub(substitute, raw))
    path = Path(expanded)
    if not path.is_absolute():
        # A relative value typed into an environment variable means "from where I am"; one written in the card
        # means "from the card".
        base = card_path.parent if card_path and not any(from_env[:1]) else Path.cwd()
        path = base / path
    return path


def _subsample(samples: list[Sample], limit: int, rng: random.Random) -> list[int]:
    """Indices (file order) of at most `limit` samples drawn by `rng`. Samples sharing `meta["subsample_group"]`
    are kept or dropped together: a score defined over a group (MME's acc+ over an image's two questions, MMBench's
    circular copies of one question) would otherwise be computed on torn groups. Without groups the draw is the plain
    `rng.sample` it always was, so existing subsets stay the same."""
    if not any("subsample_group" in s.meta for s in samples):
        return sorted(rng.sample(range(len(samples)), limit))
    groups: dict[Any, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.meta.get("subsample_group", ("sample", i)), []).append(i)
    members = list(groups.values())
    kept: list[int] = []
    for g in rng.sample(range(len(members)), len(members)):
        if len(kept) + len(members[g]) <= limit:
            kept.extend(members[g])
    return sorted(kept)


def _present(path: Path, *, folder: bool) -> bool:
    """Whether a card path is there: a file, or a folder for the formats that read one (MME's release folder)."""
    return path.is_dir() if folder else path.is_file()


def _listing(root: Path, limit: int = 20) -> str:
    """The names directly under `root` (folders with a trailing /), for error messages."""
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        return f"(cannot list: {exc.strerror or exc})"
    if not entries:
        return "(nothing: an empty folder)"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    return ", ".join(names) + (f", ... ({len(entries) - limit} more)" if len(entries) > limit else "")


def _launched_where() -> str:
    """"on host H (rank R of W)" in a process a launcher started, else "" (a plain process has one machine)."""
    from mcit.runtime import dist  # imports torch: only on this error path, so loading a card stays light

    if not dist.launched():
        return ""
    import socket

    return f"on host {socket.gethostname()} (rank {dist.rank()} of {dist.world_size()})"


def card_search_paths() -> list[Path]:
    """Folders a bare card name is looked up in: the cards shipped inside the package."""
    return [CARDS_DIR]


def available_cards() -> list[str]:
    names: set[str] = set()
    for folder in card_search_paths():
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def load_card(path_or_name: str | os.PathLike) -> DataCard:
    """Load and validate a card from a file path, or from a bare name such as `ucit`."""
    text = str(path_or_name)
    path = Path(text).expanduser()
    if not path.is_file() and os.sep not in text and not text.endswith((".yaml", ".yml")):
        for folder in card_search_paths():
            if (folder / f"{text}.yaml").is_file():
                path = folder / f"{text}.yaml"
                break
        else:
            names = available_cards()
            raise DataError(f"no data card named {text!r}{suggest(text, names)}; available: {', '.join(names)} "
                            f"(or give a path to a .yaml file)")
    if not path.is_file():
        hint = ""
        if path.parent.name == "data_cards" and path.stem in available_cards():
            # The cards lived in a top-level data_cards/ folder before they became package data.
            hint = f"; the shipped card is found by its name: `card: {path.stem}`"
        raise DataError(f"data card file not found: {path}{hint}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: invalid YAML ({exc})") from exc
    return card_from_dict(data, path=path.resolve())


def card_from_dict(data: Any, *, path: Path | None = None) -> DataCard:
    """Validate a parsed card. Every message carries the key path (`tasks[2].scorer`) and what was expected."""
    where = str(path) if path else "data card"
    if not isinstance(data, dict):
        raise DataError(f"{where}: card: expected a mapping, got {type(data).__name__}")
    card = from_mapping(DataCard, data, where=where, error=DataError)
    if not card.tasks:
        raise DataError(f"{where}: tasks: expected a non-empty list of task mappings")
    seen: set[str] = set()
    for i, task in enumerate(card.tasks):
        key = f"{where}: tasks[{i}]"
        if task.name in seen:
            raise DataError(f"{key}.name: duplicate task name {task.name!r}")
        seen.add(task.name)
        if task.train is None and task.test is None and not card.layouts:
            raise DataError(f"{key}: task {task.name!r} needs a 'train' or a 'test' file")
        for attr, allowed in (("format", FORMATS), ("answer_style", ANSWER_STYLES), ("scorer", SCORERS)):
            value = getattr(task, attr)
            if value not in allowed:
                raise DataError(f"{key}.{attr}: {value!r} is not valid{suggest(value, allowed)}; "
                                f"choose one of {', '.join(allowed)}")
        if task.box_frame not in BOX_FRAMES:
            raise DataError(f"{key}.box_frame: {task.box_frame!r} is not valid{suggest(task.box_frame, BOX_FRAMES)}; "
                            f"choose one of {', '.join(BOX_FRAMES)}")
        if task.annotations_kind is not None and task.annotations_kind not in ANSWER_SOURCES:
            raise DataError(f"{key}.annotations_kind: {task.annotations_kind!r} is not valid"
                            f"{suggest(task.annotations_kind, ANSWER_SOURCES)}; choose one of "
                            f"{', '.join(ANSWER_SOURCES)}")
        if isinstance(task.candidates, str) and task.candidates != "auto":
            raise DataError(f"{key}.candidates: expected a list of answers or 'auto', got {task.candidates!r}")
        for attr in ("max_train", "max_test"):
            if getattr(task, attr) is not None and getattr(task, attr) <= 0:
                raise DataError(f"{key}.{attr}: expected a positive integer, got {getattr(task, attr)}")
    _check_layouts(card, where)
    card.path = path
    return card


def _check_layouts(card: DataCard, where: str) -> None:
    """Every layout places every task (and only the card's tasks); `layout:` names one of them."""
    names = card.task_names
    seen: set[str] = set()
    for i, layout in enumerate(card.layouts):
        key = f"{where}: layouts[{i}]"
        if layout.name in seen:
            raise DataError(f"{key}.name: duplicate layout name {layout.name!r}")
        seen.add(layout.name)
        placed = [t.name for t in layout.tasks]
        for j, name in enumerate(placed):
            if name not in names:
                raise DataError(f"{key}.tasks[{j}].name: {name!r} is not a task of this card{suggest(name, names)}")
            if placed.count(name) > 1:
                raise DataError(f"{key}.tasks[{j}].name: task {name!r} placed twice")
            entry = layout.tasks[j]
            if entry.train is None and entry.test is None:
                raise DataError(f"{key}.tasks[{j}]: task {name!r} needs a 'train' or a 'test' file")
        absent = [n for n in names if n not in placed]
        if absent:
            raise DataError(f"{key}: layout {layout.name!r} does not place the task(s) {', '.join(absent)}")
    if card.layout is not None:
        if not card.layouts:
            raise DataError(f"{where}: layout: {card.layout!r} given but the card lists no layouts")
        card.layout_named(card.layout)
