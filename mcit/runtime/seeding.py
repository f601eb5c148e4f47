"""Random state: seed every generator a run draws from, and save/restore torch's generator for step resume."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, torch.Tensor]:
    return {"torch_rng": torch.get_rng_state()}


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if "torch_rng" in tensors:
        torch.set_rng_state(tensors["torch_rng"])
