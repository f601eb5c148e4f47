"""What an export folder receives, written into a folder that already exists (the workflow makes it and moves it
into place):

- default: one PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`) that
  `PeftModel.from_pretrained(base, DIR)` loads (mcit.export.adapter): a single trained adapter as is, several (task
  experts) merged into one (mcit.export.merge).
- `full=True`: the base model with that adapter merged in (or, for a full fine-tune such as the tiny base's
  pretraining, the checkpoint's whole state dict), saved with its processor by `save_pretrained`.
- experts (`export_experts`): the stage unchanged as a one-stage run folder, every expert with its router.
- always: README.md (model card with the accuracy matrix up to that stage, scrubbed of local paths and tokens), the
  run's resolved recipe (scrubbed), and PROVENANCE.json (what was exported, from which stage, merged how).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import yaml

from mcit.errors import CheckpointError, McitError
from mcit.export.adapter import write_adapter
from mcit.export.modelcard import build_model_card, card_info, model_prompt_format, scrub
from mcit.export.stage import Stage
from mcit.models.loading import DTYPES, load_base
from mcit.runs import checkpoint as ckpt
from mcit.runs.folder import RunFolder
from mcit.version import __version__


def export_stage(stage: Stage, out: Path, *, merge: str | None = None, weights: list[float] | None = None,
                 density: float | None = None, adapters: list[str] | None = None, full: bool = False,
                 dtype: str | None = None, base_model: str | None = None, license: str | None = None,
                 repo_id: str | None = None) -> dict[str, Any]:
    """Write the export of `stage` into the existing folder `out`; return the provenance record written with it."""
    recipe = stage.recipe
    base_model = base_model or public_base_name(recipe.model.name_or_path)
    full_finetune = recipe.model.full_finetune
    if not full and full_finetune:
        raise McitError(
            f"{stage.folder.name}: this run fine-tuned the whole model (model.full_finetune=true), so there is no "
            "adapter to export; add --full to save the full model"
        )
    if (merge or weights or adapters) and full_finetune:
        raise McitError("--merge / --weights / --adapters apply to adapters; this run is a full fine-tune")
    provenance: dict[str, Any] = {
        "created_by": f"mcit export {__version__}", "recipe": recipe.name, "seed": recipe.seed,
        "method": stage.method, "stage": stage.number, "stage_label": stage.label,
        "artifact": "full" if full_finetune else ("merged" if full else "adapter"), "base_model": base_model,
        "merge": None,
    }
    if full_finetune:
        write_full_model(stage, out, None, dtype)
    elif full:
        with tempfile.TemporaryDirectory(prefix="mcit-export-") as adapter_dir:
            provenance["merge"] = write_adapter(stage, Path(adapter_dir), merge, weights, density, adapters,
                                                base_model, fold_base=False)
            write_full_model(stage, out, Path(adapter_dir), dtype)
    else:
        provenance["merge"] = write_adapter(stage, out, merge, weights, density, adapters, base_model)
    if full:
        provenance["dtype"] = dtype or recipe.model.dtype
    write_card(stage, out, provenance, license, repo_id)
    write_recipe(stage, out)
    (out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return provenance


def export_experts(stage: Stage, out: Path, *, base_model: str | None = None, license: str | None = None,
                   repo_id: str | None = None) -> dict[str, Any]:
    """Write the stage unchanged as a one-stage run folder: `recipe.yaml`, `results.json` and
    `checkpoints/<stage>/` with the files its manifest lists (every expert, the router's prototypes, the method
    state). `mcit.load(out)` and `mcit eval --checkpoint out` rebuild the routed model exactly as the run left it."""
    recipe = stage.recipe
    base_model = base_model or public_base_name(recipe.model.name_or_path)
    target = RunFolder(out).checkpoints / stage.folder.name
    target.mkdir(parents=True)
    files = ckpt.manifest_files(stage.folder)
    for name in [*files, ckpt.MANIFEST]:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stage.folder / name, target / name)
    ckpt.open_checkpoint(target)  # the copy verifies against the manifest
    if stage.results is None:
        raise CheckpointError(f"{stage.run_dir}: results.json is missing (the task order); resume the run first")
    RunFolder(out).results.write_text(json.dumps(stage.results, indent=1) + "\n", encoding="utf-8")
    data = recipe.to_dict()
    data.pop("source", None)
    data["output_dir"] = "."
    RunFolder(out).recipe.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    provenance: dict[str, Any] = {
        "created_by": f"mcit export {__version__}", "recipe": recipe.name, "seed": recipe.seed,
        "method": stage.method, "stage": stage.number, "stage_label": stage.label, "artifact": "experts",
        "base_model": base_model, "merge": None,
    }
    write_card(stage, out, provenance, license, repo_id)
    (out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return provenance


# --- full model --------------------------------------------------------------------------------------------------


def write_full_model(stage: Stage, out: Path, adapter_dir: Path | None, dtype: str | None) -> None:
    """Base + adapter merged (or the full fine-tune's state dict) saved with its processor by save_pretrained."""
    cfg = copy.deepcopy(stage.recipe.model)
    if cfg.load_in_4bit:
        raise McitError("--full cannot merge into 4-bit weights; set model.load_in_4bit=false in the run's recipe "
                        "copy and export again (the base is then loaded in full precision)")
    target = DTYPES[dtype or cfg.dtype]
    cfg.dtype, cfg.gradient_checkpointing = "fp32", False  # merge in fp32, cast once at the end
    model, processor = load_base(cfg)
    base_weights = stage.extra_tensors().base_weights if adapter_dir is not None else {}
    if base_weights:  # the method changed base weights (RegLoRA's merges): put them in before the adapter
        unexpected = model.load_state_dict(base_weights, strict=False).unexpected_keys
        if unexpected:
            raise CheckpointError(f"{stage.folder / 'model.safetensors'}: changed base weight {unexpected[0]!r} is "
                                  f"not a weight of the base model {cfg.name_or_path}")
    if adapter_dir is None:
        state = stage.model_tensors()
        result = model.load_state_dict(state, strict=False)
        problems = list(result.missing_keys) + list(result.unexpected_keys)
        if problems:
            raise CheckpointError(
                f"{stage.folder / 'model.safetensors'} does not match the base model {cfg.name_or_path} "
                f"(e.g. {problems[0]!r}; {len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected); "
                "a full fine-tune's checkpoint holds the whole state dict of the recipe's model"
            )
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.to(target)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))


# --- card, recipe --------------------------------------------------------------------------------------------------


def write_card(stage: Stage, out: Path, provenance: dict[str, Any], license: str | None,
               repo_id: str | None) -> None:
    recipe = stage.recipe
    merge = provenance.get("merge")
    info = card_info(stage.card_results(), base_model=provenance["base_model"], artifact=provenance["artifact"],
                     merge=merge["method"] if merge else None, hyperparameters=hyperparameters(stage),
                     license=license or getattr(recipe, "license", None), repo_id=repo_id,
                     prompt_format=model_prompt_format(recipe.model))
    build_model_card(info).save(str(out / "README.md"))


def write_recipe(stage: Stage, out: Path) -> None:
    data = stage.recipe.to_dict()
    data.pop("source", None)
    RunFolder(out).recipe.write_text(scrub(yaml.safe_dump(data, sort_keys=False)), encoding="utf-8")


def hyperparameters(stage: Stage) -> dict[str, Any]:
    """The model card's hyperparameter table: training settings, LoRA shape, what else was trained, method options."""
    recipe = stage.recipe
    train = recipe.train
    hyper: dict[str, Any] = {"train": {"lr": train.lr, "batch_size": train.batch_size * train.grad_accum,
                                       "warmup_ratio": train.warmup_ratio, "max_length": train.max_length}}
    hyper["train"].update({"max_steps": train.max_steps} if train.max_steps else {"epochs": train.epochs})
    if not recipe.model.full_finetune:
        lora = recipe.method.lora
        hyper["lora"] = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                         "target_modules": list(lora.target_modules)}
    trained = [name for name, on in (("projector", recipe.model.train_projector),
                                     ("vision tower", recipe.model.train_vision),
                                     ("full language model", recipe.model.full_finetune)) if on]
    if trained:
        hyper["also trained"] = trained
    if recipe.method.options:
        hyper["method"] = dict(recipe.method.options)
    return hyper


# --- sharing -------------------------------------------------------------------------------------------------------


def public_base_name(name_or_path: str) -> str:
    """The recipe's base model as others can name it: a Hub id or builtin name as is, a local folder by its name."""
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith("builtin:") or not (path.exists() or name_or_path.startswith((".", "/", "~"))):
        return name_or_path
    name = path.resolve().name
    warnings.warn(
        f"the base model is a local folder; the export names it {name!r} only (no local path); give its Hub id "
        "with --base-model so that others can load the adapter",
        UserWarning,
        stacklevel=3,
    )
    return name


def make_shareable(folder: Path) -> None:
    """Give every file the permissions of a plain new file: safetensors writes 0600, but an export is for sharing."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
