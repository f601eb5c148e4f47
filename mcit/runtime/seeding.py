"""Random state: seed every generator a run draws from, and save/restore torch's generators for step resume (the
CPU generator and, on a GPU machine, every visible GPU's: dropout masks on the GPU come from the latter)."""

from __future__ import annotations

import random

import numpy as np
import torch

from mcit.errors import CheckpointError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds the GPUs' generators too


def rng_state() -> dict[str, torch.Tensor]:
    """torch's generator states as tensors (safetensors-ready): `torch_rng`, and `cuda_rng_<i>` per visible GPU."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.update({f"cuda_rng_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if "torch_rng" in tensors:
        torch.set_rng_state(tensors["torch_rng"])
    cuda = [tensors[f"cuda_rng_{i}"] for i in range(len(tensors)) if f"cuda_rng_{i}" in tensors]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise CheckpointError(f"the step checkpoint holds the random state of {len(cuda)} GPU(s) but this process "
                               f"sees {torch.cuda.device_count()}; resume with the same CUDA_VISIBLE_DEVICES")
        torch.cuda.set_rng_state_all(cuda)
