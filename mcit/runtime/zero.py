"""ZeRO-3 parameter access: read, gather and write parameters whether or not DeepSpeed has sharded them.

ZeRO-3 shards every parameter, so a parameter read outside a forward pass sees an empty tensor. `gathered_parameters`,
`state_dict_for_saving` and `load_parameters` gather around such reads and writes (adapter saving, loading a previous
task's adapter, merging LoRA into base weights); without DeepSpeed they are plain reads and writes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib.resources import files
from pathlib import Path

import torch

from mcit.errors import CheckpointError

# Gathering a whole model at once would need its full size on every rank; gather in pieces of this many elements.
_GATHER_CHUNK_NUMEL = 1 << 26

ParamFilter = Callable[[str, torch.nn.Parameter], bool]


def zero_stage(setting: str | None) -> int:
    """The ZeRO stage a recipe's `train.deepspeed` names: a shipped template (zero2 | zero3 | zero3_offload) or a
    DeepSpeed JSON file, read for its `zero_optimization.stage`. 0 when unset, or when the file is missing or unreadable
    (the launcher reports those itself). Methods that need whole weights between steps refuse stage 3 with it, so a
    user's own stage-3 JSON is refused like the `zero3` template."""
    if not setting:
        return 0
    template = files("mcit") / "assets" / "launch" / f"{setting}.json"
    path = Path(str(template)) if "/" not in setting and template.is_file() else Path(setting).expanduser()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        return int(config.get("zero_optimization", {}).get("stage", 0))
    except (ValueError, TypeError, AttributeError, OSError):
        return 0

def is_sharded(param: torch.Tensor) -> bool:
    """True for a parameter ZeRO-3 has partitioned (its `.data` is then a placeholder)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The real shape of a parameter, sharded or not."""
    return param.ds_shape if is_sharded(param) else param.shape


@contextlib.contextmanager
def gathered_parameters(params: torch.Tensor | Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Make the full values of `params` visible inside the body; a no-op for parameters that are not sharded.

    It is a collective under ZeRO-3: every rank must enter it with the same parameters in the same order. With
    `modifier_rank=None` the values are read-only (changes are lost); with `modifier_rank=r` the values rank `r`
    holds when the body ends are broadcast and re-sharded, which is how a loaded adapter or a merged weight is
    written into a sharded model.
    """
    if isinstance(params, torch.Tensor):
        params = [params]
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=modifier_rank):
        yield


def _chunks(items: list[tuple[str, torch.nn.Parameter]]) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    chunk: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for name, param in items:
        numel = full_shape(param).numel()
        if chunk and size + numel > _GATHER_CHUNK_NUMEL:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, param))
        size += numel
    if chunk:
        yield chunk


def state_dict_for_saving(model: torch.nn.Module, keys_filter: ParamFilter | None = None) -> dict[str, torch.Tensor]:
    """Full-size CPU copies of the parameters `keys_filter(name, param)` selects (default: the trainable ones).

    Names are those of `model.named_parameters()` (pass the unwrapped module, `engine.module`). Under ZeRO-3 the
    tensors are gathered, so an adapter saved from them has its real shapes and loads with plain PEFT. Collective:
    call it on every rank; every rank gets the result, and only `is_main()` should write it.
    """
    keep = keys_filter or (lambda _name, param: param.requires_grad)
    selected = [(name, param) for name, param in model.named_parameters() if keep(name, param)]
    out: dict[str, torch.Tensor] = {}
    for chunk in _chunks(selected):
        with gathered_parameters([p for _, p in chunk]):
            for name, param in chunk:
                out[name] = param.detach().to("cpu", copy=True).contiguous()
    return out


def load_parameters(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy `tensors` (names as in `model.named_parameters()`) into the model, sharded or not.

    Collective under ZeRO-3: call it on every rank with the same names (rank 0's values are the ones kept).
    Raises CheckpointError naming the first unknown name or mismatched shape before anything is written.
    """
    params = dict(model.named_parameters())
    unknown = [name for name in tensors if name not in params]
    if unknown:
        raise CheckpointError(f"{len(unknown)} tensors match no parameter of the model, e.g. {unknown[0]!r}")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(full_shape(params[name])):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(value.shape)} but the model expects {tuple(full_shape(params[name]))}"
            )
    items = [(name, params[name]) for name in tensors]
    for chunk in _chunks(items):
        with gathered_parameters([p for _, p in chunk], modifier_rank=0), torch.no_grad():
            for name, param in chunk:
                param.data.copy_(tensors[name].to(param.device, param.dtype))


@contextlib.contextmanager
def visible_parameters(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Gather the ZeRO-3 shards among `params` that are not already gathered (the runner gathers everything around
    evaluation and `after_task`; gathering again there would re-shard on exit under the runner's feet)."""
    hidden = [p for p in params if is_sharded(p) and getattr(getattr(p, "ds_status", None), "name", "")
              == "NOT_AVAILABLE"]
    with gathered_parameters(hidden):
        yield
