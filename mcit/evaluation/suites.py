"""Evaluation suites: a YAML file (`eval/*.yaml`) naming the tasks a checkpoint is evaluated on, independent of any
training recipe. A suite is what "evaluate these checkpoints against a new-task benchmark" or "how much general
ability did the run keep" means, written once and shared.

    name: synthcit-heldout
    description: ...
    extends: base.yaml                      # optional; deep-merged, this file wins
    generation: {max_new_tokens: 32, batch_size: 64, constrained: true}
    tasks:
      - {card: synthcit-coin, task: ocr, max_test: 100}              # a task of a data card
      - {card: synthcit-coin, task: grounding, name: boxes}           # renamed in the suite
      - {name: digits, root: data/digits, test: test.json, answer_style: number, scorer: numeric}   # inline

A card task may override its `scorer`, `scorer_options`, `max_test` and `eval_suffix`; an inline task takes the
keys of a data card's task (mcit/data/cards.py) plus `root` (relative to the suite file). Every key is validated when
the suite is loaded, with the key path in the message, so a typo fails before any model is built.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcit.config import read_extended_yaml
from mcit.data.cards import DataCard, card_from_dict, load_card
from mcit.errors import DataError, EvalError, RecipeError
from mcit.schema import NOT_A_KEY, from_mapping, suggest

SUITES_DIR = Path(__file__).resolve().parents[1] / "assets" / "eval"
"""The shipped suites, found by bare name (`mcit eval synthcit-heldout ...`): `eval/` at the repository root, which
`mcit/assets/eval` links to, so an installed wheel carries them too."""
REPORTED = ("score", "format", "superficial", "essential", "constrained")
_CARD_TASK_OVERRIDES = ("scorer", "scorer_options", "max_test", "eval_suffix")


@dataclass
class SuiteTask:
    """One task of a suite: a task of a data card (`card` + `task`) or an inline task (`test` + card task keys)."""

    card: str | None = None
    """A data card name or path (relative paths: from the suite file)."""
    task: str | None = None
    """The card's task."""
    name: str | None = None
    """The task's name in the suite's results (default: the card task's name)."""
    root: str | None = None
    """Inline tasks: the data folder (relative to the suite file; `${VAR}` expanded as in cards)."""
    test: str | None = None
    image_root: str | None = None
    format: str = "auto"
    answer_style: str | None = None
    scorer: str | None = None
    scorer_options: dict[str, Any] | None = None
    candidates: list[str] | str | None = None
    max_test: int | None = None
    eval_suffix: str | None = None


@dataclass
class SuiteGeneration:
    max_new_tokens: int = 64
    batch_size: int = 64
    constrained: bool = True
    """Also score closed tasks by likelihood ranking of their candidates (what the weights know, whatever the
    output format)."""


@dataclass
class EvalSuite:
    name: str
    tasks: list[SuiteTask]
    description: str = ""
    generation: SuiteGeneration = field(default_factory=SuiteGeneration)
    report: list[str] = field(default_factory=lambda: list(REPORTED))
    """Columns of the suite's tables, from `REPORTED`."""
    path: Path | None = field(default=None, compare=False, repr=False, metadata=NOT_A_KEY)

    def task_names(self) -> list[str]:
        return [t.name or t.task or "" for t in self.tasks]

    def resolve(self) -> list[tuple[DataCard, str]]:
        """(card, task name) for every suite task, in suite order: each card task as its card defines it with the
        suite's overrides applied, each inline task as a one-task card. Cards are loaded here, data is not read."""
        base = self.path.parent if self.path else Path.cwd()
        resolved: list[tuple[DataCard, str]] = []
        loaded: dict[str, DataCard] = {}
        for i, entry in enumerate(self.tasks):
            key = f"{self._where()}: tasks[{i}]"
            if entry.card is not None:
                ref = entry.card
                if ref.endswith((".yaml", ".yml")) and not os.path.isabs(ref):
                    ref = str(base / ref)
                if ref not in loaded:
                    loaded[ref] = load_card(ref)
                card = loaded[ref]
                names = [t.name for t in card.tasks]
                if entry.task not in names:
                    raise EvalError(f"{key}.task: {entry.task!r} is not a task of card {card.name!r}"
                                    f"{suggest(str(entry.task), names)}; its tasks: {', '.join(names)}")
                spec = next(t for t in card.tasks if t.name == entry.task)
                changes = {k: getattr(entry, k) for k in _CARD_TASK_OVERRIDES if getattr(entry, k) is not None}
                if entry.name:
                    changes["name"] = entry.name
                one = dataclasses.replace(card.select([entry.task]), tasks=[dataclasses.replace(spec, **changes)])
                if entry.name and card.layouts:  # the renamed task keeps its place in every layout
                    one.layouts = [dataclasses.replace(lay, tasks=[dataclasses.replace(t, name=entry.name)
                                                                   for t in lay.tasks if t.name == entry.task])
                                   for lay in card.layouts]
                resolved.append((one, entry.name or entry.task))
            else:
                spec = {k: getattr(entry, k) for k in ("name", "test", "image_root", "format", "answer_style",
                                                          "scorer", "scorer_options", "candidates", "max_test",
                                                          "eval_suffix") if getattr(entry, k) is not None}
                try:
                    card = card_from_dict({"name": f"{self.name}/{entry.name}", "root": entry.root or ".",
                                           "tasks": [spec]}, path=self.path)
                except DataError as exc:
                    raise EvalError(f"{key}: {exc}") from exc
                resolved.append((card, entry.name))
        return resolved

    def _where(self) -> str:
        return str(self.path) if self.path else f"suite {self.name!r}"


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml")) if SUITES_DIR.is_dir() else []


def load_suite(path_or_name: str | os.PathLike) -> EvalSuite:
    """Load and validate a suite from a path, or from a bare name of a shipped suite (`eval/<name>.yaml`)."""
    text = str(path_or_name)
    path = Path(text).expanduser()
    if not path.is_file() and os.sep not in text and not text.endswith((".yaml", ".yml")):
        if (SUITES_DIR / f"{text}.yaml").is_file():
            path = SUITES_DIR / f"{text}.yaml"
        else:
            names = available_suites()
            raise EvalError(f"no evaluation suite named {text!r}{suggest(text, names)}; shipped: "
                            f"{', '.join(names) or 'none'} (or give a path to a .yaml file)")
    try:
        data = read_extended_yaml(path.resolve(), what="evaluation suite")
    except RecipeError as exc:
        raise EvalError(str(exc)) from exc
    return suite_from_dict(data, path=path.resolve())


def suite_from_dict(data: Any, *, path: Path | None = None) -> EvalSuite:
    where = str(path) if path else "evaluation suite"
    if not isinstance(data, dict):
        raise EvalError(f"{where}: expected a mapping, got {type(data).__name__}")
    suite = from_mapping(EvalSuite, data, where=where, error=EvalError)
    suite.path = path
    if not suite.tasks:
        raise EvalError(f"{where}: tasks: expected a non-empty list of tasks")
    for i, entry in enumerate(suite.tasks):
        key = f"{where}: tasks[{i}]"
        if entry.card is not None:
            if entry.task is None:
                raise EvalError(f"{key}: a card task needs `task` (which of the card's tasks)")
            extra = [k for k in ("root", "test", "image_root", "answer_style", "candidates")
                     if getattr(entry, k) is not None]
            if extra:
                raise EvalError(f"{key}: {', '.join(extra)} belong to inline tasks; a card task takes only "
                                f"{', '.join(('name', *_CARD_TASK_OVERRIDES))} besides card and task")
        elif entry.test is None or entry.name is None:
            raise EvalError(f"{key}: expected `card` + `task` (a data card's task) or an inline task with `name` and "
                            f"`test` (a question file)")
        elif entry.task is not None:
            raise EvalError(f"{key}.task: `task` names a card's task; this entry has no `card`")
    names = suite.task_names()
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise EvalError(f"{where}: tasks[{i}]: task name {name!r} used twice; give one of them `name:`")
    for column in suite.report:
        if column not in REPORTED:
            raise EvalError(f"{where}: report: {column!r} is not a column{suggest(column, REPORTED)}; choose from "
                            f"{', '.join(REPORTED)}")
    for attr in ("max_new_tokens", "batch_size"):
        if getattr(suite.generation, attr) < 1:
            raise EvalError(f"{where}: generation.{attr}: expected a positive integer")
    return suite


