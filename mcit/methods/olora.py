"""O-LoRA (`olora`): one LoRA per task, earlier ones frozen, new ones pushed into an orthogonal subspace.

Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual Learning". Task t trains a new LoRA
(adapter `task<t>`) while the adapters of tasks s < t stay active but frozen, so the forward pass sums all of them.
The loss adds

    λ1 · Σ_layers Σ_{s<t} Σ_{i,j} |(A_t · A_sᵀ)_ij|   (λ1 = 0.05)   +   λ2 · (‖A_t‖² + ‖B_t‖²)   (λ2 = 0 by default)

The first term drives the rows of the new A (the input directions the new LoRA reads) to be orthogonal to those of
every earlier task, so the new update leaves the earlier adapters' inputs alone.

Only the newest adapter has requires_grad, so the optimizer (built from trainable parameters only) keeps no state for
frozen adapters. Every adapter is part of `state_tensors` (names contain `lora_`), and `prepare` adds adapters in
stage order, so a resumed run rebuilds the same structure before loading them.

Deviations from the reference implementation:
- The reference grows one LoRA by concatenating the old A/B along the rank (a "lora_" and a "loranew_" pair); here
  each task keeps its own PEFT adapter and PEFT sums the active adapters. The forward pass is the same sum.
- The reference's L2 term is the (unsquared) norm of the new LoRA's parameters; we use the squared norm written in
  the paper. It is off (λ2 = 0) unless a recipe sets `lambda_l2`.
- Multi-process training is supported at ZeRO-2 (or stage 0); the loss reads the A matrices directly, which under
  ZeRO-3 would be empty shards outside their modules' forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mcit.errors import RecipeError
from mcit.methods.base import Method, register
from mcit.methods.lora import add_lora, set_lora_trainable
from mcit.runtime.zero import zero_stage


def adapter_name(task: int) -> str:
    return f"task{task}"


@dataclass
class OLoRAOptions:
    lambda_orth: float = 0.05
    """λ1: weight of the L1 norm of A_t·A_sᵀ summed over earlier tasks and adapted layers (the reference's 0.05)."""
    lambda_l2: float = 0.0
    """λ2: weight of the squared L2 norm of the new LoRA's A and B (off by default, as in the reference)."""


def orthogonality_loss(new_a: Sequence[torch.Tensor], old_a: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Σ_layers Σ|A_t · A_prevᵀ| where A_prev stacks the frozen A of every earlier task of that layer."""
    terms = [(a @ prev.t().to(a.dtype)).abs().sum() for a, prev in zip(new_a, old_a, strict=True) if prev is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@register("olora")
class OLoRA(Method):
    Options = OLoRAOptions

    def __init__(self, recipe, options: OLoRAOptions):
        super().__init__(recipe, options)
        if options.lambda_orth < 0 or options.lambda_l2 < 0:
            raise RecipeError("method.lambda_orth and method.lambda_l2 must be >= 0")
        if zero_stage(recipe.train.deepspeed) >= 3:
            raise RecipeError("train.deepspeed: olora reads its A matrices outside the forward pass, which ZeRO-3 "
                              "shards; use zero2 (LoRA weights are small enough to stay whole)")
        self._stage = -1
        self._pairs: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def setup(self, model):
        return add_lora(model, self.recipe, adapter_name(0))

    def prepare(self, model, stage: int, task_ids: Sequence[int]) -> None:
        """Add this stage's adapter (once), activate all adapters so far, train only the newest."""
        name = adapter_name(stage)
        if name not in model.peft_config:
            add_lora(model, self.recipe, name)
        model.base_model.set_adapter([adapter_name(s) for s in range(stage + 1)])
        set_lora_trainable(model, {name})
        self._stage = stage
        self._pairs = None  # frozen A's are stacked lazily, after a resume has loaded their values

    def _layer_pairs(self, model) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        from peft.tuners.lora import LoraLayer

        pairs = []
        new = adapter_name(self._stage)
        for module in model.modules():
            if isinstance(module, LoraLayer) and new in module.lora_A:
                old = [module.lora_A[adapter_name(s)].weight.detach() for s in range(self._stage)
                       if adapter_name(s) in module.lora_A]
                pairs.append((module.lora_A[new].weight, torch.cat(old) if old else None))
        return pairs

    def extra_loss(self, model, batch: dict, outputs) -> torch.Tensor | None:
        opts = self.options
        if self._pairs is None:
            self._pairs = self._layer_pairs(model)
        loss = None
        if self._stage > 0 and opts.lambda_orth > 0:
            loss = opts.lambda_orth * orthogonality_loss([a for a, _ in self._pairs], [p for _, p in self._pairs])
        if opts.lambda_l2 > 0:
            new = f".{adapter_name(self._stage)}."
            l2 = sum(p.pow(2).sum() for n, p in model.named_parameters() if "lora_" in n and new in n)
            loss = opts.lambda_l2 * l2 if loss is None else loss + opts.lambda_l2 * l2
        return loss
