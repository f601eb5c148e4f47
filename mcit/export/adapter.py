"""One PEFT adapter out of a stage: a single trained adapter as is, several task adapters merged into one, and base
weights the method changed (RegLoRA's merges) carried along as low-rank factors.

Weights trained outside the adapters (the projector, the vision tower) ride along as PEFT `modules_to_save`, since
the run's own `adapter/` folder does not hold them.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

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
from mcit.export.stage import ADAPTER_WEIGHTS, Stage, load_adapter
from mcit.models.loading import load_base


def write_adapter(stage: Stage, out: Path, merge: str | None, weights: list[float] | None, density: float | None,
                  adapters: list[str] | None, base_model: str, fold_base: bool = True) -> dict[str, Any] | None:
    """Write one PEFT adapter for `stage` into `out`; return the merge record (None when nothing was merged).

    With `fold_base`, base weights the method changed (RegLoRA) are carried in the adapter as low-rank factors
    (`fold_base_changes`); without it (the --full path, which applies them exactly) the adapter is left as trained.
    """
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
