"""`mcit export`: turn a run's stage checkpoint into something others can load, with a model card, optionally pushed.

    mcit export RUN_OR_STAGE_DIR --out DIR [--stage N|last] [--merge METHOD [--weights W ...] [--density D]]
                [--full [--dtype bf16]] [--push REPO_ID [--private] [--token T] [--endpoint URL]]

What DIR receives:
- default: one PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`) that
  `PeftModel.from_pretrained(base, DIR)` loads. A single trained adapter is copied as is; several (task experts) are
  merged into one with `--merge` (mcit.export.merge). Weights trained outside the adapters (the projector, the
  vision tower) ride along as PEFT `modules_to_save`, since the run's own `adapter/` folder does not hold them.
- `--full`: the base model with that adapter merged in (or, for a full fine-tune such as the tiny base's
  pretraining, the checkpoint's whole state dict), saved with its processor by `save_pretrained`.
- always: README.md (model card with the accuracy matrix up to that stage, scrubbed of local paths and tokens), the
  run's resolved recipe (scrubbed), and PROVENANCE.json (what was exported, from which stage, merged how).

DIR is assembled in a hidden sibling folder and renamed into place at the end, so a failed export leaves nothing
half-written behind (and never a folder that a later `--push` would upload).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

import mcit
from mcit.errors import CheckpointError, McitError
from mcit.export.merge import (
    DEFAULT_DENSITY,
    METHODS,
    lowrank_factors,
    merge_loras,
    merge_non_lora,
    merged_lora_config,
    split_lora_state,
)
from mcit.export.stage import ADAPTER_WEIGHTS, Stage, find_stage, load_adapter
from mcit.train import checkpoint as ckpt

DTYPES = ("fp32", "bf16", "fp16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `mcit export`'s arguments to `parser` (the `export` subparser of `mcit`)."""
    parser.description = (
        "Export a run's stage as a PEFT adapter (several task adapters merged into one with --merge) or, with "
        "--full, as a full transformers model; writes a model card and can push the folder to the Hugging Face Hub."
    )
    parser.add_argument("source", metavar="RUN_OR_STAGE_DIR", help="a run folder or one of its checkpoints/stage-*")
    parser.add_argument("--out", required=True, help="output folder (must be new or empty, unless --force)")
    parser.add_argument("--stage", default="last", help="stage number (as in stage-XX) or 'last' (default)")
    parser.add_argument("--merge", choices=METHODS, help="how to merge several task adapters into one")
    parser.add_argument("--weights", nargs="+", help="one merge weight per adapter, in adapter order (e.g. 0.5 0.5)")
    parser.add_argument("--density", type=float, help=f"kept fraction for ties/dare/copa (default {DEFAULT_DENSITY})")
    parser.add_argument("--adapters", help="comma-separated adapter names to export (default: all in the stage)")
    parser.add_argument("--full", action="store_true", help="merge into the base weights; save a full model")
    parser.add_argument("--experts", action="store_true",
                        help="export the stage as it is (every expert, router and method state); load it with "
                             "mcit.load(DIR) or evaluate it with `mcit eval --checkpoint DIR`")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of a --full model's weights (default: the recipe's)")
    parser.add_argument("--base-model", help="base model name for the card and adapter_config (default: recipe's)")
    parser.add_argument("--license", help="license id for the model card (default: the recipe's, else 'other')")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument("--push", "--push-to-hub", dest="push", metavar="REPO_ID", help="upload DIR to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--token", help="Hub token (prefer HF_TOKEN or `hf auth login`: argv is visible to others)")
    parser.add_argument("--endpoint", help="Hub endpoint URL (default: HF_ENDPOINT or the public Hub)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export as `args` asks; print where it went. Errors are McitError subclasses (the CLI prints them)."""
    if args.experts and (args.full or args.merge or args.weights or args.adapters):
        raise McitError("--experts exports the stage unchanged; it cannot be combined with --full, --merge, "
                        "--weights or --adapters")
    stage = find_stage(args.source, args.stage)
    out = Path(args.out).expanduser().resolve()
    _check_out(out, args.force, stage)
    weights = _parse_weights(args.weights)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if args.experts:
            provenance = export_experts(stage, tmp, base_model=args.base_model, license=args.license,
                                        repo_id=args.push)
        else:
            provenance = export_stage(stage, tmp, merge=args.merge, weights=weights, density=args.density,
                                      adapters=_names(args.adapters), full=args.full, dtype=args.dtype,
                                      base_model=args.base_model, license=args.license, repo_id=args.push)
        _shareable(tmp)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = "expert set" if args.experts else "full model" if args.full else "adapter"
    merged = f", merged with {provenance['merge']['method']}" if provenance.get("merge") else ""
    print(f"exported the {what} of stage {stage.number} ({stage.label}){merged}: {out}")
    if args.push:
        from mcit.export.hub import push_folder

        url = push_folder(out, args.push, private=args.private, token=args.token, endpoint=args.endpoint)
        print(f"pushed: {url}")
    return 0


def export_stage(stage: Stage, out: Path, *, merge: str | None = None, weights: list[float] | None = None,
                 density: float | None = None, adapters: list[str] | None = None, full: bool = False,
                 dtype: str | None = None, base_model: str | None = None, license: str | None = None,
                 repo_id: str | None = None) -> dict[str, Any]:
    """Write the export of `stage` into the existing folder `out`; return the provenance record written with it."""
    recipe = stage.recipe
    base_model = base_model or _public_base_name(recipe.model.name_or_path)
    full_finetune = recipe.model.full_finetune
    if not full and full_finetune:
        raise McitError(
            f"{stage.folder.name}: this run fine-tuned the whole model (model.full_finetune=true), so there is no "
            "adapter to export; add --full to save the full model"
        )
    if (merge or weights or adapters) and full_finetune:
        raise McitError("--merge / --weights / --adapters apply to adapters; this run is a full fine-tune")
    provenance: dict[str, Any] = {
        "created_by": f"mcit export {mcit.__version__}", "recipe": recipe.name, "seed": recipe.seed,
        "method": stage.method, "stage": stage.number, "stage_label": stage.label,
        "artifact": "full" if full_finetune else ("merged" if full else "adapter"), "base_model": base_model,
        "merge": None,
    }
    if full_finetune:
        _write_full_model(stage, out, None, dtype)
    elif full:
        with tempfile.TemporaryDirectory(prefix="mcit-export-") as adapter_dir:
            provenance["merge"] = write_adapter(stage, Path(adapter_dir), merge, weights, density, adapters,
                                                base_model, fold_base=False)
            _write_full_model(stage, out, Path(adapter_dir), dtype)
    else:
        provenance["merge"] = write_adapter(stage, out, merge, weights, density, adapters, base_model)
    if full:
        provenance["dtype"] = dtype or recipe.model.dtype
    _write_card(stage, out, provenance, license, repo_id)
    _write_recipe(stage, out)
    (out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return provenance


def export_experts(stage: Stage, out: Path, *, base_model: str | None = None, license: str | None = None,
                   repo_id: str | None = None) -> dict[str, Any]:
    """Write the stage unchanged as a one-stage run folder: `recipe.yaml`, `results.json` and
    `checkpoints/<stage>/` with the files its manifest lists (every expert, the router's prototypes, the method
    state). `mcit.load(out)` and `mcit eval --checkpoint out` rebuild the routed model exactly as the run left it."""
    recipe = stage.recipe
    base_model = base_model or _public_base_name(recipe.model.name_or_path)
    target = out / "checkpoints" / stage.folder.name
    target.mkdir(parents=True)
    files = ckpt.manifest_files(stage.folder)
    for name in [*files, ckpt.MANIFEST]:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stage.folder / name, target / name)
    ckpt.open_checkpoint(target)  # the copy verifies against the manifest
    if stage.results is None:
        raise CheckpointError(f"{stage.run_dir}: results.json is missing (the task order); resume the run first")
    (out / "results.json").write_text(json.dumps(stage.results, indent=1) + "\n", encoding="utf-8")
    data = recipe.to_dict()
    data.pop("source", None)
    data["output_dir"] = "."
    (out / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    provenance: dict[str, Any] = {
        "created_by": f"mcit export {mcit.__version__}", "recipe": recipe.name, "seed": recipe.seed,
        "method": stage.method, "stage": stage.number, "stage_label": stage.label, "artifact": "experts",
        "base_model": base_model, "merge": None,
    }
    _write_card(stage, out, provenance, license, repo_id)
    (out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return provenance


def write_adapter(stage: Stage, out: Path, merge: str | None, weights: list[float] | None, density: float | None,
                  adapters: list[str] | None, base_model: str, fold_base: bool = True) -> dict[str, Any] | None:
    """Write one PEFT adapter for `stage` into `out`; return the merge record (None when nothing was merged).

    With `fold_base`, base weights the method changed (RegLoRA) are carried in the adapter as low-rank factors
    (`fold_base_changes`); without it (the --full path, which applies them exactly) the adapter is left as trained.
    """
    from safetensors.torch import save_file

    found = stage.adapters()
    if not found:
        raise CheckpointError(
            f"{stage.folder} has no adapter/ folder with an adapter_config.json; the run saved no PEFT adapter at "
            "this stage (is the method adapter-free?)"
        )
    if adapters:
        unknown = [name for name in adapters if name not in found]
        if unknown:
            raise McitError(f"--adapters: {', '.join(unknown)} not in {stage.folder.name}; it has {', '.join(found)}")
        found = {name: found[name] for name in adapters}
    loaded = {name: load_adapter(folder) for name, folder in found.items()}
    record = None
    if len(loaded) == 1:
        if merge or weights:
            print(f"[mcit] one adapter ({next(iter(loaded))}): nothing to merge, --merge/--weights ignored",
                  file=sys.stderr)
        config, state = next(iter(loaded.values()))
    else:
        if merge is None:
            raise McitError(
                f"{stage.folder.name} holds {len(loaded)} adapters ({', '.join(loaded)}); choose how to merge them "
                f"into one with --merge {'|'.join(METHODS)} (cat is their exact sum at the summed rank), or pick one "
                "with --adapters NAME"
            )
        config, state = merge_adapters(list(loaded.values()), merge, weights, density, seed=stage.recipe.seed)
        record = {"method": merge, "adapters": list(loaded), "weights": weights,
                  "density": None if merge in ("linear", "cat") else (density or DEFAULT_DENSITY)}
    extras = stage.extra_tensors()
    if extras.base_weights and fold_base:
        config, state, fold = fold_base_changes(stage, config, state, extras.base_weights)
        record = {**(record or {}), "base_changes": fold}
        record.setdefault("method", f"svd of the base-weight changes (rank {fold['rank']})")
    config = copy.deepcopy(config)
    config.base_model_name_or_path = base_model
    config.revision = stage.recipe.model.revision
    config.inference_mode = True
    if extras.modules:
        config.modules_to_save = sorted(set(config.modules_to_save or []) | set(extras.modules))
    config.save_pretrained(str(out))
    tensors = {**state, **extras.modules_to_save}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return record


def fold_base_changes(stage: Stage, config: Any, state: dict, base_weights: dict) -> tuple[Any, dict, dict]:
    """Carry base weights changed by the method (RegLoRA's merges) in the adapter: (config, state, record).

    The change W_stage - W_base of every adapted matrix becomes a LoRA of rank stage*r by truncated SVD (one rank-r
    merge per finished stage, so exact up to rounding in fp32), concatenated along the rank with the adapter as
    trained (`cat`: the sum of both updates). In a bf16 run the merged weights were rounded, so the change is not
    exactly low-rank; the record's `residual` (relative, worst matrix) says how close the adapter is, and a warning
    points to --full for the exact model.
    """
    from mcit.models.loading import load_base

    bad = [key for key in base_weights if not key.endswith(".weight")]
    if bad:
        raise McitError(f"{stage.folder.name}: the method changed {bad[0]!r}, which a LoRA cannot carry; use --full")
    cfg = copy.deepcopy(stage.recipe.model)
    cfg.gradient_checkpointing = False
    base, _ = load_base(cfg)  # in the run's dtype: the change is measured against the weights the run started from
    rank = stage.number * config.r
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    lora, rest = split_lora_state(state)
    changes: dict = {}
    used, worst = set(), 0.0
    for a_key, value in lora.items():
        if ".lora_A." not in a_key:
            continue
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        name = a_key.removeprefix("base_model.model.").replace(".lora_A.", ".").rsplit(".", 1)[0] + ".weight"
        if name in base_weights:
            original = base.get_parameter(name)
            A, B, residual = lowrank_factors(base_weights[name].float() - original.float(), rank)
            used.add(name)
            worst = max(worst, residual)
        else:
            A, B = torch.zeros(rank, value.shape[1]), torch.zeros(lora[b_key].shape[0], rank)
        changes[a_key], changes[b_key] = A.to(value.dtype), B.to(value.dtype)
    missing = sorted(set(base_weights) - used)
    if missing:
        raise McitError(f"{stage.folder.name}: the base weight {missing[0]!r} changed but no adapter wraps it; use "
                        "--full to export the exact model")
    del base
    merged = merge_loras([changes, lora], "cat", [1.0, 1.0], scaling=[1.0, scaling])
    if worst > 1e-3:
        warnings.warn(f"{stage.folder.name}: the changed base weights are carried at rank {rank} with a relative "
                      f"error of up to {worst:.1e} (a bf16 run rounds its merges); --full exports the exact model",
                      UserWarning, stacklevel=3)
    new_rank = rank + config.r
    return merged_lora_config(config, new_rank), {**merged, **rest}, {"rank": rank, "residual": worst,
                                                                      "matrices": len(used)}


def merge_adapters(loaded: list[tuple[Any, dict]], method: str, weights: list[float] | None, density: float | None,
                   seed: int = 0) -> tuple[Any, dict]:
    """(config, state) of the merge of several (LoraConfig, PEFT state dict) adapters; see mcit.export.merge."""
    configs = [config for config, _ in loaded]
    for index, config in enumerate(configs):
        if config.rank_pattern or config.alpha_pattern:
            raise McitError(f"adapter {index} uses rank_pattern/alpha_pattern; mcit merges uniform-rank LoRAs only")
        if config.target_modules != configs[0].target_modules:
            raise McitError(f"adapter {index} targets other modules than adapter 0; they cannot be merged")
    splits = [split_lora_state(state) for _, state in loaded]
    scaling = [c.lora_alpha / (math.sqrt(c.r) if c.use_rslora else c.r) for c in configs]
    merged = merge_loras([lora for lora, _ in splits], method, weights, scaling=scaling,
                         density=DEFAULT_DENSITY if density is None else density, seed=seed)
    rests = [rest for _, rest in splits]
    if any(rests):  # per-adapter modules_to_save copies: averaged, as CoPA does for the projector
        merged.update(merge_non_lora(rests))
    rank = next(v.shape[0] for k, v in merged.items() if ".lora_A." in k)
    return merged_lora_config(configs[0], rank), merged


# --- full model --------------------------------------------------------------------------------------------------


def _write_full_model(stage: Stage, out: Path, adapter_dir: Path | None, dtype: str | None) -> None:
    """Base + adapter merged (or the full fine-tune's state dict) saved with its processor by save_pretrained."""
    from mcit.models.loading import DTYPES as TORCH_DTYPES
    from mcit.models.loading import load_base

    cfg = copy.deepcopy(stage.recipe.model)
    if cfg.load_in_4bit:
        raise McitError("--full cannot merge into 4-bit weights; set model.load_in_4bit=false in the run's recipe "
                        "copy and export again (the base is then loaded in full precision)")
    target = TORCH_DTYPES[dtype or cfg.dtype]
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


def _write_card(stage: Stage, out: Path, provenance: dict[str, Any], license: str | None,
                repo_id: str | None) -> None:
    from mcit.export.modelcard import build_model_card, card_info

    recipe = stage.recipe
    merge = provenance.get("merge")
    info = card_info(stage.card_results(), base_model=provenance["base_model"], artifact=provenance["artifact"],
                     merge=merge["method"] if merge else None, hyperparameters=_hyperparameters(stage),
                     license=license or getattr(recipe, "license", None), repo_id=repo_id)
    build_model_card(info).save(str(out / "README.md"))


def _write_recipe(stage: Stage, out: Path) -> None:
    from mcit.export.modelcard import scrub

    data = stage.recipe.to_dict()
    data.pop("source", None)
    (out / "recipe.yaml").write_text(scrub(yaml.safe_dump(data, sort_keys=False)), encoding="utf-8")


def _hyperparameters(stage: Stage) -> dict[str, Any]:
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


# --- helpers -------------------------------------------------------------------------------------------------------


def _public_base_name(name_or_path: str) -> str:
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


def _parse_weights(values: list[str] | None) -> list[float] | None:
    if not values:
        return None
    parts = [part for value in values for part in value.split(",") if part.strip()]
    try:
        return [float(part) for part in parts]
    except ValueError:
        raise McitError(f"--weights: expected numbers (e.g. --weights 0.5 0.5), got {' '.join(values)}") from None


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def _check_out(out: Path, force: bool, stage: Stage) -> None:
    if out.exists() and not out.is_dir():
        raise McitError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise McitError(f"--out {out} already exists and is not empty; choose a new folder or add --force to replace")
    # replacing the run (or a folder holding it) would delete the checkpoint being exported
    checkpoints = stage.run_dir / "checkpoints"
    if out == stage.run_dir or out in stage.run_dir.parents or out == checkpoints or checkpoints in out.parents:
        raise McitError(f"--out {out} would overwrite or sit inside the run's checkpoints; choose another folder")


def _shareable(folder: Path) -> None:
    """Give every file the permissions of a plain new file: safetensors writes 0600, but an export is for sharing."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.is_dir():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
