"""Find and read one stage of a finished (or partly finished) run, for `mcit export`.

A run folder holds `recipe.yaml`, `results.json` and `checkpoints/stage-XX-<label>/`; each stage folder holds
`model.safetensors` (the method's model tensors under their PeftModel names), `method.json`, `adapter/` (PEFT's
`save_pretrained` output: the `default` adapter at its root, any other adapter in `adapter/<name>/`) and, written
last, `MANIFEST.json`. A folder without a valid manifest was interrupted while being written and is never exported.

What the stage's `adapter/` folder does *not* hold: weights trained outside PEFT's adapters (the projector with
`model.train_projector`, the vision tower with `model.train_vision`) and base weights a method changed (RegLoRA's
merges). They are in `model.safetensors` only; `Stage.extra_tensors` sorts them out for the export.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mcit.config import Recipe, load_recipe
from mcit.errors import CheckpointError, McitError
from mcit.evaluation.metrics import continual_metrics
from mcit.export.merge import is_lora_key
from mcit.models.families import family_for_type
from mcit.models.loading import resolve_path
from mcit.runs import checkpoint as ckpt
from mcit.runs.folder import METHOD_META, RunFolder, is_stage_folder, parse_stage_folder
from mcit.runtime.files import load_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
def savable_modules(recipe: Recipe) -> tuple[str, ...]:
    """Modules trained next to the adapters that PEFT can carry as `modules_to_save`, by the names PEFT matches (the
    last part of the family's projector and vision-tower paths: `multi_modal_projector`, Qwen2-VL's `merger` ...)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_path(recipe.model.name_or_path), revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code)
    except OSError as exc:
        raise CheckpointError(f"model.name_or_path {recipe.model.name_or_path!r}: its config is needed to name the "
                              f"trained projector and vision modules ({exc})") from exc
    family = family_for_type(config.model_type, f"model.name_or_path {recipe.model.name_or_path!r}")
    return (family.leaf("projector"), family.leaf("vision_tower"))


@dataclass
class Extras:
    """The non-LoRA tensors of a stage's `model.safetensors`, by what an export does with them.

    - `modules_to_save`: modules trained next to the adapters (the projector, the vision tower) under their PeftModel
      names (`base_model.model.model.multi_modal_projector.linear_1.weight`), exactly how PEFT stores a
      `modules_to_save` module in adapter_model.safetensors; `modules` are their names for the adapter config.
    - `base_weights`: base weights of adapted layers that the method changed (RegLoRA merges each task's LoRA into
      the base), under the bare model's names (`model.language_model.layers.0.self_attn.q_proj.weight`).
    - `dropped`: anything else (a method's own buffers), which no plain PEFT adapter or transformers model can hold.
    """

    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


@dataclass
class Stage:
    """One finished stage checkpoint and what the export needs from its run."""

    run_dir: Path
    folder: Path
    number: int
    label: str
    recipe: Recipe
    results: dict[str, Any] | None
    meta: dict[str, Any]
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def method(self) -> str:
        return str(self.meta.get("method") or self.recipe.method.name)

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The stage's `model.safetensors` (loaded once)."""
        if self._tensors is None:
            self._tensors = load_tensors(self.folder / "model.safetensors")
        return self._tensors

    def adapters(self) -> dict[str, Path]:
        """Adapter name -> folder with adapter_config.json, in natural order (task_2 before task_10)."""
        return adapter_folders(self.folder / "adapter")

    def extra_tensors(self) -> Extras:
        """Sort the non-LoRA tensors of `model.safetensors` by what an export can do with them (see `Extras`)."""
        extras = Extras()
        modules: set[str] = set()
        savable: tuple[str, ...] | None = None  # read from the base's config only when a stage holds such tensors
        for key, value in self.model_tensors().items():
            if is_lora_key(key) or ".modules_to_save." in key or ".original_module." in key:
                continue  # adapter weights, or modules PEFT already saved in adapter/
            if ".base_layer." in key:
                extras.base_weights[key.removeprefix("base_model.model.").replace(".base_layer.", ".")] = value
                continue
            savable = savable or savable_modules(self.recipe)
            module = next((m for m in savable if f".{m}." in f".{key}"), None)
            if module is None:
                extras.dropped.append(key)
            else:
                extras.modules_to_save[key] = value
                modules.add(module)
        extras.modules = sorted(modules)
        if extras.dropped:
            warnings.warn(
                f"{self.folder.name}/model.safetensors: {len(extras.dropped)} tensor(s) are neither LoRA weights, "
                f"base weights nor a module PEFT can save (e.g. {extras.dropped[0]!r}); the export leaves them out",
                UserWarning,
                stacklevel=2,
            )
        return extras

    def card_results(self) -> dict[str, Any]:
        """results.json cut to the rows up to this stage, metrics recomputed for them; missing rows become `None`s.

        An intermediate stage's card must describe that stage's model, not the end of the run.
        """
        if self.results is None:
            raise CheckpointError(
                f"{self.run_dir / 'results.json'} is missing: the model card needs the run's task order and scores; "
                "run `mcit train` on the same recipe again to finish the evaluation"
            )
        results = dict(self.results)
        tasks, stages = results.get("tasks") or [], results.get("stages") or []
        if len(stages) <= self.number:
            raise CheckpointError(
                f"{self.run_dir / 'results.json'} lists {len(stages)} rows (stages) but the export is of stage "
                f"{self.number}; the results belong to another run"
            )
        rows = self.number + 1
        matrix = [row if row is not None else [None] * len(tasks) for row in results.get("matrix", [])[:rows]]
        results.update(stages=stages[:rows], matrix=matrix, stage_tasks=(results.get("stage_tasks") or [])[:rows])
        if rows < len(stages) or not results.get("metrics"):
            results["metrics"] = _metrics(matrix, results["stage_tasks"])
        return results


def find_stage(path: str | Path, stage: str | int = "last") -> Stage:
    """Resolve a run folder (+ `stage`: a 1-based number or "last") or a stage folder to a complete `Stage`."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise McitError(f"{path} does not exist or is not a folder; give a run folder or a checkpoints/stage-XX-* one")
    if is_stage_folder(path):
        folder, run_dir = path, RunFolder.of_stage(path).root
        parsed = parse_stage_folder(path)
        number = parsed[0] if parsed else None
        if stage != "last" and number is not None and _stage_number(stage) != number:
            raise McitError(f"--stage {stage} does not match the stage folder {path.name}; drop --stage or give the "
                            "run folder")
    elif RunFolder(path).checkpoints.is_dir() or RunFolder(path).recipe.is_file():
        run_dir = path
        folder = _pick_stage(run_dir, stage)
    else:
        raise McitError(
            f"{path} is neither a run folder (recipe.yaml, checkpoints/) nor a stage checkpoint "
            "(checkpoints/stage-XX-<task>/ with MANIFEST.json); give the output_dir of a `mcit train` run"
        )
    if not (folder / ckpt.MANIFEST).is_file():
        raise CheckpointError(
            f"{folder} has no {ckpt.MANIFEST}: the checkpoint is incomplete (interrupted while being written); "
            "export an earlier stage with --stage, or resume the run with `mcit train` to rewrite it"
        )
    ckpt.open_checkpoint(folder)  # every file present with its recorded size and hash
    recipe_path = RunFolder(run_dir).recipe
    if not recipe_path.is_file():
        raise CheckpointError(f"{folder}: the run's recipe.yaml is missing from {run_dir}; it names the base model")
    meta_path = folder / METHOD_META
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    parsed = parse_stage_folder(folder)
    number = int(meta.get("stage") or (parsed[0] if parsed else 0))
    label = str(meta.get("task") or (parsed[1] if parsed else folder.name))
    results_path = RunFolder(run_dir).results
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else None
    return Stage(run_dir, folder, number, label, load_recipe(recipe_path), results, meta)


def adapter_folders(root: Path) -> dict[str, Path]:
    """PEFT's multi-adapter layout: `default` at the root, every other adapter in a subfolder of its name."""
    found = {}
    if (root / ADAPTER_CONFIG).is_file():
        found["default"] = root
    if root.is_dir():
        for sub in root.iterdir():
            if sub.is_dir() and (sub / ADAPTER_CONFIG).is_file():
                found[sub.name] = sub
    return {name: found[name] for name in sorted(found, key=natural_key)}


def load_adapter(folder: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(LoraConfig, state dict) of a saved PEFT adapter; refuses other PEFT types and ZeRO-3 placeholders."""
    from peft import PeftConfig, PeftType

    config = PeftConfig.from_pretrained(str(folder))
    if config.peft_type != PeftType.LORA:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: peft_type is {config.peft_type}; only LoRA is exported")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    state = load_file(str(weights))
    empty = [key for key, value in state.items() if value.numel() == 0]
    if empty:
        raise CheckpointError(
            f"{weights}: {empty[0]!r} is empty, the placeholder of a ZeRO-3 partitioned weight; the checkpoint was "
            "saved without gathering the parameters and cannot be exported"
        )
    return config, state


def natural_key(name: str) -> list[Any]:
    """Sort key that orders task_2 before task_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _pick_stage(run_dir: Path, stage: str | int) -> Path:
    folders = RunFolder(run_dir).stage_dirs()
    if not folders:
        raise McitError(f"{run_dir} has no checkpoints/stage-XX-* folder yet: no stage has finished training")
    available = ", ".join(path.name for path in folders.values())
    if stage == "last":
        return folders[max(folders)]
    number = _stage_number(stage)
    if number == 0:
        raise McitError("--stage 0 is the zero-shot base model, which has nothing to export; stages: " + available)
    if number not in folders:
        raise McitError(f"--stage {number}: {run_dir.name} has no such stage; its stages are {available}")
    return folders[number]


def _stage_number(stage: str | int) -> int:
    try:
        return int(stage)
    except ValueError:
        raise McitError(f"--stage {stage!r}: expected a stage number (as in stage-XX) or 'last'") from None


def _metrics(matrix: list, stage_tasks: list) -> dict[str, Any]:
    try:
        return continual_metrics(matrix, stage_tasks)
    except McitError:  # a malformed or partial results.json: the card shows the matrix without metrics
        return {}
