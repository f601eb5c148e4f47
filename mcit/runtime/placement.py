"""Where tensors go: the device this process computes on, the model placed there once right after loading, and
batches moved to the model's device (collate builds them on the CPU).

The rule is the one accelerate and the deepspeed launcher follow: a process launched with LOCAL_RANK=k uses GPU
k of the GPUs it can see, a plain process uses the current GPU, and a machine without a visible GPU (or with
DS_ACCELERATOR=cpu, which asks for a CPU run on a GPU host) uses the CPU. Everything else (batches, routers, feature
extractors, caches) follows the model: `module_device(model)`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from mcit.runtime import dist
from mcit.runtime.zero import is_sharded


def gpu_count() -> int:
    """CUDA GPUs this process can see (honours CUDA_VISIBLE_DEVICES); 0 when DS_ACCELERATOR=cpu asks for the CPU."""
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu" or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def compute_device() -> torch.device:
    """The device this process computes on: `cuda:LOCAL_RANK` under a launcher, the first visible GPU in a plain
    process (CUDA_VISIBLE_DEVICES chooses it), else the CPU."""
    count = gpu_count()
    if count == 0:
        return torch.device("cpu")
    if dist.launched():
        index = dist.local_rank()
        if index >= count:
            raise RuntimeError(f"LOCAL_RANK={index} but this process sees only {count} GPU(s) "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                               f"{count} processes per node")
        return torch.device("cuda", index)
    return torch.device("cuda", 0)


def place_model(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move a freshly loaded model to `device`, unless its weights are already placed elsewhere on purpose: a ZeRO-3
    model (DeepSpeed owns its shards) or a model loaded with a device map (4-bit: bitsandbytes placed it)."""
    if any(is_sharded(p) for p in model.parameters()) or getattr(model, "hf_device_map", None):
        return model
    return model.to(device)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A copy of `batch` with every tensor on `device` (non-blocking from pinned memory; other values unchanged)."""
    device = torch.device(device)
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) and value.device != device else value
            for key, value in batch.items()}
