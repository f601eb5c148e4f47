"""Frozen fp32 linear weights held in the autocast dtype for the step loop (bitwise-identical steps, no per-call
casts)."""

from __future__ import annotations

from collections import Counter

import torch


class FrozenLinearCast:
    """Hold the frozen fp32 `nn.Linear` weights in the autocast dtype while training, so autocast stops re-casting
    them on every forward (15 % of a tiny-model CPU step, measured in bench/). Exact: autocast rounds an fp32
    weight to the same bf16/fp16 values on every call, so matmuls, loss and gradients are bitwise unchanged.

    Only weights that no gradient reaches, that are fp32 and that no other module shares (tied embeddings stay
    fp32); LoRA factors, trained or frozen, are left alone. `restore()` puts the original fp32 tensors back (the
    objects themselves, so nothing is rounded); the trainer restores around step checkpoints and at the end, so
    whatever reads or writes base weights outside the step loop (RegLoRA's merge and saved base weights, resume)
    sees fp32.
    """

    def __init__(self, model, dtype: torch.dtype | None):
        self.dtype = dtype
        self._saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._weights: list[torch.nn.Parameter] = []
        if dtype is None:
            return
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if (type(module) is torch.nn.Linear and "lora_" not in name and isinstance(weight, torch.nn.Parameter)
                    and not weight.requires_grad and weight.dtype == torch.float32 and uses[id(weight)] == 1):
                self._weights.append(weight)

    def __len__(self) -> int:
        return len(self._weights)

    def apply(self) -> None:
        if self._saved or not self._weights:
            return
        for weight in self._weights:
            self._saved.append((weight, weight.data))
            weight.data = weight.data.to(self.dtype)

    def restore(self) -> None:
        for weight, data in self._saved:
            weight.data = data
        self._saved = []
