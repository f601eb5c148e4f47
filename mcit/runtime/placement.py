"""Where tensors go: the device a model computes on, and batches moved there (collate builds them on the CPU)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A copy of `batch` with every tensor on `device` (non-blocking from pinned memory; other values unchanged)."""
    device = torch.device(device)
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) and value.device != device else value
            for key, value in batch.items()}
