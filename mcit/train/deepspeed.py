"""DeepSpeed for training: the config filled from the recipe, the HF integration context, the engine, and the guard
that keeps every rank running the vision tower.

Why the pieces exist:
- A model built under ZeRO-3 must be created inside `deepspeed.zero.Init`, or every rank first holds the whole
  model. transformers does that for `from_pretrained` and `Model._from_config(config)` while an `HfDeepSpeedConfig`
  is alive (`hf_deepspeed_context`); a direct `Model(config)` call does NOT, and is then only sharded later by
  `deepspeed.initialize`.
- ZeRO all-gathers each layer's shards when the layer runs, so every rank must run the same modules in the same
  order. A micro-batch without images skips the vision tower and deadlocks the job; `ensure_vision_forward` appends
  an inert dummy image so that every rank always runs it.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mcit.errors import RecipeError
from mcit.runtime.dist import world_size
from mcit.runtime.zero import is_sharded
from mcit.train.schedule import cosine_lambda


def _node(config: dict, dotted: str) -> tuple[dict | None, str]:
    *parents, leaf = dotted.split(".")
    node: Any = config
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None, leaf
    return (node if isinstance(node, dict) else None), leaf


def build_ds_config(
    template: str | Path | dict | None,
    *,
    micro_batch: int,
    grad_accum: int,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    bf16: bool,
    zero_stage: int | None,
    hidden_size: int | None = None,
) -> dict:
    """Return a DeepSpeed config with every `"auto"` of `template` replaced by the recipe's value.

    `template` is a JSON file (mcit/assets/launch/zero2.json, ...), a dict, or None for a minimal config. `zero_stage` (when not
    None) overrides the template's stage. A value in the template that is not "auto" and disagrees with the recipe is
    an error, so a run never trains with numbers other than those its recipe.yaml records. The train batch is
    `micro_batch * grad_accum * world_size()` (world size from the launcher's environment). The bucket sizes that
    depend on the model width are filled from `hidden_size`, or left to DeepSpeed's defaults when it is None.
    mcit supplies the optimizer (torch AdamW) and the schedule, so a template may not carry a "scheduler"; an
    "optimizer" section is allowed and then DeepSpeed builds that optimizer with lr/weight_decay filled in.
    """
    where = str(template) if isinstance(template, (str, Path)) else "the DeepSpeed config"
    if template is None:
        config: dict = {"zero_optimization": {"stage": 0 if zero_stage is None else zero_stage}}
    elif isinstance(template, dict):
        config = copy.deepcopy(template)
    else:
        path = Path(template)
        if not path.is_file():
            raise RecipeError(f"DeepSpeed config {path} does not exist (set train.deepspeed to zero2 | zero3 | zero3_offload or a JSON file)")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RecipeError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    if "scheduler" in config:
        raise RecipeError(f"{where}: remove the 'scheduler' section; mcit sets the cosine schedule from the recipe")
    if zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = zero_stage
    stage = int(config.get("zero_optimization", {}).get("stage", 0))

    values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size(),
        "gradient_clipping": grad_clip,
        "bf16.enabled": bf16,
        "optimizer.params.lr": lr,
        "optimizer.params.weight_decay": weight_decay,
    }
    # The batch keys must always be present: DeepSpeed needs them and they must match the recipe.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        config.setdefault(key, "auto")
    if bf16:
        config.setdefault("bf16", {"enabled": "auto"})
    mismatches = []
    for key, value in values.items():
        node, leaf = _node(config, key)
        if node is None or leaf not in node:
            continue
        if node[leaf] == "auto":
            node[leaf] = value
        elif node[leaf] != value:
            mismatches.append(f"{key}={node[leaf]!r} but the recipe gives {value!r}")
    if mismatches:
        raise RecipeError(f"{where} disagrees with the recipe: " + "; ".join(mismatches) + " (set these to \"auto\")")
    if config.get("fp16", {}).get("enabled") is True and bf16:
        raise RecipeError(f"{where}: fp16.enabled and the recipe's bf16 are both on; keep one")

    width = {
        "zero_optimization.reduce_bucket_size": lambda h: h * h,
        "zero_optimization.stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    for key, rule in width.items():
        node, leaf = _node(config, key)
        if node is not None and node.get(leaf) == "auto":
            if hidden_size is None or (stage < 3 and "stage3" in leaf):
                del node[leaf]  # DeepSpeed's default
            else:
                node[leaf] = rule(hidden_size)
    left = [k for k, v in _walk(config) if v == "auto"]
    if left:
        raise RecipeError(f"{where}: mcit cannot fill {', '.join(left)}; give numbers instead of \"auto\"")
    # mcit's optimizer is a plain torch one, which DeepSpeed only accepts with this flag.
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def zero_stage_of(ds_config: Mapping | None) -> int:
    """The ZeRO stage a config asks for (0 when there is no config)."""
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def hf_deepspeed_context(ds_config: dict | None) -> Iterator[Any]:
    """Make transformers aware of the DeepSpeed config for as long as the body runs.

    Enter it BEFORE building the model and keep it open for the whole run. Under ZeRO-3, `from_pretrained` and
    `Model._from_config(config)` then create every weight inside `deepspeed.zero.Init` (already sharded, initialised
    on rank 0 and broadcast), and `generate` turns on `synced_gpus` so that ranks finishing early keep joining the
    others' forward passes. transformers only keeps a weak reference, which is why the object must stay alive here.
    With no config (or a stage below 3) it is still harmless. Yields the `HfDeepSpeedConfig` or None.
    """
    if ds_config is None:
        yield None
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(ds_config)
    try:
        yield hf_config
    finally:
        unset_hf_deepspeed_config()
        del hf_config


# --- engine --------------------------------------------------------------------------------------------------------

def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, num_training_steps: int) -> Any:
    """Linear warmup then cosine decay to 0, counted in optimizer steps; the very factor a single-process run uses."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(warmup_steps, max(1, num_training_steps)))


def initialize(
    model: torch.nn.Module,
    param_groups: list[dict],
    ds_config: dict,
    num_training_steps: int,
    warmup_steps: int,
) -> Any:
    """Wrap `model` in a DeepSpeed engine with torch AdamW over `param_groups` and the cosine schedule.

    `param_groups` are torch optimizer groups (`{"params": [...], "lr": ..., "weight_decay": ...}`); only
    trainable parameters may appear. `num_training_steps`/`warmup_steps` count optimizer steps (after gradient
    accumulation). Then, for every micro-batch: `out = engine(**batch)`, `engine.backward(out.loss)`,
    `engine.step()`; the engine divides the loss by the accumulation count, averages gradients over ranks, clips,
    steps the optimizer and the schedule at accumulation boundaries. Call `init_distributed()` first.

    torch AdamW rather than DeepSpeedCPUAdam: the latter is JIT-compiled on first use (~100 s here) and torch's runs
    everywhere. A config with its own "optimizer" section gets DeepSpeed's optimizer instead.
    """
    import deepspeed

    for index, group in enumerate(param_groups):
        frozen = [p for p in group["params"] if not p.requires_grad]
        if frozen:
            raise RecipeError(f"param_groups[{index}] holds {len(frozen)} frozen parameters; pass trainable ones only")
    _match_zero3_dtype(model, ds_config)
    # a config with its own "optimizer" section gets DeepSpeed's optimizer over the groups, otherwise torch AdamW
    optimizer = ({"model_parameters": param_groups} if "optimizer" in ds_config
                 else {"optimizer": torch.optim.AdamW(param_groups)})
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=ds_config, **optimizer,
        lr_scheduler=lambda opt: cosine_schedule(opt, warmup_steps, num_training_steps))
    return engine


def release(engine: Any) -> torch.nn.Module:
    """Tear down an engine between tasks and return its module, ready for the next `initialize`.

    The continual runner builds one engine per task (new parameter groups, new optimizer). `destroy()` removes the
    engine's ZeRO hooks from the module, which would otherwise stay registered next to the new engine's; the old
    optimizer state is freed once the caller drops its reference to the engine. Under ZeRO-3 the parameters stay
    sharded, so the module is only usable through a new engine (or `gathered_parameters`).
    """
    module = engine.module
    engine.destroy()
    return module


def _match_zero3_dtype(model: torch.nn.Module, ds_config: Mapping) -> None:
    # Under ZeRO-3 with bf16/fp16, zero.Init creates the base weights in half precision and DeepSpeed then skips its
    # own cast, so parameters added after the model was built (LoRA, a fresh projector) stay fp32 and the ZeRO-3
    # optimizer refuses the mix (AssertionError in `defragment`). Cast those, and only those, here.
    if config_true(ds_config, "bf16"):
        dtype = torch.bfloat16
    elif config_true(ds_config, "fp16"):
        dtype = torch.float16
    else:
        return
    params = list(model.parameters())
    if not any(is_sharded(p) for p in params):
        return
    for param in params:
        if not is_sharded(param) and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def config_true(ds_config: Mapping, section: str) -> bool:
    """Whether `ds_config[section]["enabled"]` is on (bf16/fp16)."""
    return bool((ds_config.get(section) or {}).get("enabled", False))




def ensure_vision_forward(
    batch: dict[str, torch.Tensor],
    *,
    image_ids: Sequence[int],
    image_inputs: dict[str, torch.Tensor],
    image_token_id: int | None = None,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Return `batch` unchanged if it has images, else a copy that carries one inert image.

    Under ZeRO-3 a micro-batch without `pixel_values` skips the vision tower, so that rank stops joining the
    all-gathers of the vision layers the other ranks are running: the job deadlocks. The dummy image's tokens
    (`image_ids`, as the processor expands a small blank image: mcit.data.collate.ImageTokens.dummy) are appended after
    row 0's last position, the other rows padded alike, all with attention_mask 0 and labels -100, and its model
    inputs (`image_inputs`: pixel_values and the family's extras) are added: causal attention never lets a real token
    see them and no loss is taken on them, so the loss and every gradient are those of the text-only batch (the vision
    tower and projector receive exactly zero gradient), and the model's image-token count check is satisfied. Apply
    it to every micro-batch whenever more than one rank trains.
    """
    pixels = batch.get("pixel_values")
    if pixels is not None and pixels.shape[0] > 0:
        return batch
    input_ids = batch["input_ids"]
    rows = input_ids.shape[0]
    extra = torch.full((rows, len(image_ids)), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    extra[0] = torch.tensor(list(image_ids), dtype=input_ids.dtype, device=input_ids.device)
    out = dict(batch)
    out["input_ids"] = torch.cat([input_ids, extra], dim=1)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    out["attention_mask"] = torch.cat([mask, torch.zeros_like(extra, dtype=mask.dtype)], dim=1)
    if "labels" in batch:
        out["labels"] = torch.cat([batch["labels"], torch.full_like(extra, -100, dtype=batch["labels"].dtype)], dim=1)
    if "mm_token_type_ids" in batch:  # Qwen2-VL: the dummy's image tokens are image tokens to its RoPE index too
        types = (extra == image_token_id).to(batch["mm_token_type_ids"].dtype)
        out["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], types], dim=1)
    out.update({key: value.to(input_ids.device) for key, value in image_inputs.items()})
    return out
