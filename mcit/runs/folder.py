"""Where everything of a run lives, and how a stage folder is recognised. Nothing else in mcit builds these paths.

```
<output_dir>/
  recipe.yaml  env.json  results.json  results.md  timing.json  log.jsonl  asd_stats.json  tb/
  asd/rewrites.jsonl              brief/detailed answers an LLM rewriter generated (ASD), reused on resume
  checkpoints/stage-01-<label>/   a finished stage (runs.checkpoint: MANIFEST.json written last)
  checkpoints/last-step/          the newest mid-stage step checkpoint, removed when the stage completes
  predictions/stage-01/<task>.jsonl
  report/   eval/<stage>-<card>/
```
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from mcit.config import Recipe, recipe_from_dict, save_recipe
from mcit.errors import RecipeError
from mcit.runs.checkpoint import MANIFEST, clean_stale
from mcit.runtime import dist
from mcit.runtime.files import write_json_atomic

STAGE_FOLDER = re.compile(r"^stage-(?P<number>\d+)-(?P<label>.+)$")
PREDICTION_FOLDER = re.compile(r"^stage-(?P<row>\d+)$")
METHOD_META = "method.json"


def stage_folder_name(number: int, label: str) -> str:
    """`stage-03-count` for the 1-based stage `number`."""
    return f"stage-{number:02d}-{label}"


def parse_stage_folder(path: Path) -> tuple[int, str] | None:
    """(1-based number, label) of a `stage-XX-<label>` folder name, else None."""
    match = STAGE_FOLDER.match(Path(path).name)
    return (int(match["number"]), match["label"]) if match else None


def has_stage_state(path: Path) -> bool:
    """A folder holding a stage's method state (method.json): what a stage checkpoint or an expert-set export loads
    from."""
    return (Path(path) / METHOD_META).is_file()


def is_stage_folder(path: Path) -> bool:
    """A run's stage checkpoint, complete or interrupted: named `stage-XX-<label>` or holding a stage's files (the
    loose test export uses to explain what is wrong with a folder)."""
    path = Path(path)
    return parse_stage_folder(path) is not None or any(
        (path / name).exists() for name in (METHOD_META, "model.safetensors", MANIFEST))


class RunFolder:
    """The folder of one run (`recipe.output_dir`), or of the run a stage folder belongs to (`RunFolder.of_stage`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.recipe = self.root / "recipe.yaml"
        self.env = self.root / "env.json"
        self.results = self.root / "results.json"
        self.results_md = self.root / "results.md"
        self.timing = self.root / "timing.json"
        self.log = self.root / "log.jsonl"
        self.tensorboard = self.root / "tb"
        self.checkpoints = self.root / "checkpoints"
        self.last_step = self.checkpoints / "last-step"
        self.report = self.root / "report"
        self.analysis = self.root / "analysis"
        self.asd_stats = self.root / "asd_stats.json"
        self.asd_rewrites = self.root / "asd" / "rewrites.jsonl"
        self.suites = self.root / "suites"
        """`mcit eval SUITE --checkpoints RUN` files the run's rows here (`<suite>.json`), for `mcit report`."""

    @classmethod
    def of_stage(cls, stage_dir: Path) -> RunFolder:
        return cls(Path(stage_dir).expanduser().resolve().parent.parent)

    # --- stages ----------------------------------------------------------------------------------------------------
    def stage_dir(self, stage: int, label: str) -> Path:
        """Checkpoint folder of the 0-based `stage`."""
        return self.checkpoints / stage_folder_name(stage + 1, label)

    def stage_dirs(self) -> dict[int, Path]:
        """1-based stage number -> folder for every `checkpoints/stage-XX-*` folder (complete or not)."""
        folders = {}
        for path in sorted(self.checkpoints.glob("stage-*")):
            parsed = parse_stage_folder(path)
            if parsed and path.is_dir():
                folders[parsed[0]] = path
        return folders

    def predictions_dir(self, row: int) -> Path:
        """Prediction files of results row `row` (0: zero-shot)."""
        return self.root / "predictions" / f"stage-{row:02d}"

    def prediction_dirs(self) -> dict[int, Path]:
        """results row -> its prediction folder, for every row that has one."""
        found = {}
        for path in sorted((self.root / "predictions").glob("stage-*")):
            match = PREDICTION_FOLDER.match(path.name)
            if match and path.is_dir():
                found[int(match["row"])] = path
        return found

    def eval_dir(self, stage_dir: Path, card: str) -> Path:
        """Where `mcit eval` of one of this run's stage folders writes (the stage folder stays as its manifest says)."""
        return self.root / "eval" / f"{Path(stage_dir).name}-{card}"

    # --- files -----------------------------------------------------------------------------------------------------
    def read_results(self) -> dict[str, Any]:
        """results.json, or {} before the first row is written."""
        return json.loads(self.results.read_text(encoding="utf-8")) if self.results.is_file() else {}

    def task_names(self) -> list[str]:
        """The run's task order (from results.json, which every evaluated row rewrites)."""
        if not self.results.is_file():
            raise FileNotFoundError(self.results)
        return self.read_results()["tasks"]

    def write_results(self, results: dict[str, Any]) -> None:
        if dist.is_main():
            write_json_atomic(self.results, results)

    def write_asd_stats(self, stats: dict[str, Any]) -> None:
        """ASD's conversions per style and task and its skips with their reasons (mcit.data.asd), for the report;
        the data are the same on every rank, so only the main rank writes."""
        if dist.is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.asd_stats, stats)

    def read_asd_stats(self) -> dict[str, Any] | None:
        """asd_stats.json, or None for a run without ASD (or one from before the file existed)."""
        return json.loads(self.asd_stats.read_text(encoding="utf-8")) if self.asd_stats.is_file() else None

    def record_timing(self, kind: str, label: str, record: dict) -> None:
        """Wall-clock, memory and storage records go to timing.json: results.json holds only what the seed determines
        (`train`: per stage seconds, samples/s, peak RSS; `eval`: per row and task seconds; `storage`: bytes of each
        stage checkpoint and trainable parameters)."""
        if not dist.is_main():
            return
        timing = json.loads(self.timing.read_text(encoding="utf-8")) if self.timing.is_file() else {}
        timing.setdefault(kind, {})[label] = record
        write_json_atomic(self.timing, timing)

    # --- claiming the folder for a recipe --------------------------------------------------------------------------
    def claim(self, recipe: Recipe, environment: dict[str, Any]) -> None:
        """Refuse a folder holding another recipe's run; the main rank checks and writes first, the other ranks
        check after the barrier (never while the main rank is writing the file)."""
        if dist.is_main():
            self.check_same_recipe(recipe)
            self.root.mkdir(parents=True, exist_ok=True)
            self.checkpoints.mkdir(exist_ok=True)
            clean_stale(self.checkpoints)
            if not self.recipe.is_file():
                save_recipe(recipe, self.recipe)
            write_json_atomic(self.env, environment)
        dist.barrier()
        if not dist.is_main():
            self.check_same_recipe(recipe)

    def check_same_recipe(self, recipe: Recipe) -> None:
        if not self.recipe.is_file():
            return
        current = recipe.to_dict()
        current.pop("source", None)
        previous = yaml.safe_load(self.recipe.read_text(encoding="utf-8")) or {}
        try:  # a key added to the recipe schema after this run started takes its default on both sides
            previous = recipe_from_dict(previous, where=str(self.recipe)).to_dict()  # it copies its input
        except RecipeError:  # a file this version cannot read: compared as written, so the refusal names the keys
            pass
        previous.pop("source", None)
        if previous != current:
            changed = sorted(_diff_keys(previous, current))
            raise RecipeError(f"{self.root} holds a run of a different recipe (changed: {', '.join(changed)}); "
                              "resume with the same recipe or choose another output_dir")


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [prefix or "recipe"]
