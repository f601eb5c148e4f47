"""Data cards: a benchmark as data (YAML) — where its files are, in which order its tasks come, how to score them.

A card is validated when loaded, so a typo (`scorer_option:`) fails at once with the closest valid key instead of
being silently ignored hours into a run. The root is kept as written (`${MCIT_UCIT_ROOT}`) and expanded only when
files are touched, so recipes can name a card whose data is not on this machine (listing tasks, dry runs).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mcit.data.formats import FORMATS, load_split
from mcit.data.records import ANSWER_STYLES, Sample
from mcit.errors import DataError
from mcit.schema import NOT_A_KEY, from_mapping, suggest

SCORERS = ("exact_match", "mc_letter", "numeric", "yesno", "contains", "caption", "caption_mean", "iou",
           "scene_attributes")
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
    """auto | llava | jsonl | sharegpt."""
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
    path: Path | None = field(default=None, compare=False, repr=False, metadata=NOT_A_KEY)
    """The card file (not a YAML key); relative roots hang off its folder."""
    _candidate_cache: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def task(self, name: str) -> TaskSpec:
        for task in self.tasks:
            if task.name == name:
                return task
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

    def image_root(self, task: str) -> Path:
        spec = self.task(task)
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
        if not path.is_file():
            raise DataError(f"{self._where()}: task {name!r} {split} file {path} not found; root {self.root!r} "
                            f"expands to {self.root_dir} (see docs/DATA.md for the expected layout)")
        samples = load_split(path, image_root=self.image_root(name), task=name, fmt=spec.format,
                             skip_malformed=skip_malformed)
        limit = spec.max_train if split == "train" else spec.max_test
        if limit is not None and len(samples) > limit:
            rng = random.Random(f"{seed}:{self.name}:{name}:{split}")
            samples = [samples[i] for i in sorted(rng.sample(range(len(samples)), limit))]
        candidates = self.candidates(name)
        for sample in samples:
            sample.meta["style"] = spec.answer_style
            if candidates is not None or "candidates" not in sample.meta:
                sample.meta["candidates"] = candidates
            if spec.instruction_suffix and sample.turns:
                user, reply = sample.turns[0]
                if not user.rstrip().endswith(spec.instruction_suffix):
                    sample.turns[0] = (user.rstrip() + "\n" + spec.instruction_suffix, reply)
        return samples

    def candidates(self, name: str) -> list[str] | None:
        """The task's valid answers: the card's list, or for `auto` the sorted distinct training answers."""
        spec = self.task(name)
        if spec.candidates != "auto":
            return list(spec.candidates) if spec.candidates is not None else None
        if name not in self._candidate_cache:
            train = load_split(self.annotation_path(name, "train"), image_root=self.image_root(name), task=name,
                               fmt=spec.format, skip_malformed=True)
            self._candidate_cache[name] = sorted({s.answer.strip() for s in train if s.answer.strip()})
        return list(self._candidate_cache[name])

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
        if task.train is None and task.test is None:
            raise DataError(f"{key}: task {task.name!r} needs a 'train' or a 'test' file")
        for attr, allowed in (("format", FORMATS), ("answer_style", ANSWER_STYLES), ("scorer", SCORERS)):
            value = getattr(task, attr)
            if value not in allowed:
                raise DataError(f"{key}.{attr}: {value!r} is not valid{suggest(value, allowed)}; "
                                f"choose one of {', '.join(allowed)}")
        if isinstance(task.candidates, str) and task.candidates != "auto":
            raise DataError(f"{key}.candidates: expected a list of answers or 'auto', got {task.candidates!r}")
        for attr in ("max_train", "max_test"):
            if getattr(task, attr) is not None and getattr(task, attr) <= 0:
                raise DataError(f"{key}.{attr}: expected a positive integer, got {getattr(task, attr)}")
    card.path = path
    return card
