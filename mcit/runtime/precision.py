"""Numeric mode: autocast by the recipe's dtype name, on the device the tensors live on; evaluation mode for a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

AUTOCAST: dict[str | None, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}
"""`model.autocast` values of a recipe and the dtype each one computes in (None: no autocast)."""


def autocast(dtype: torch.dtype | str | None, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """torch.autocast on `device`'s type for `dtype` (a dtype or a recipe name such as "bf16"); a no-op for None."""
    if isinstance(dtype, str) or dtype is None:
        dtype = AUTOCAST[dtype]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module.eval()` for the body; every submodule's own train/eval flag is put back afterwards (a frozen vision
    tower may sit in eval mode inside a model that trains, and dropout must not depend on who called last)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
