"""MoELoRA (`moelora`): a mixture of LoRA experts with a per-layer, per-token softmax gate (the CoIN baseline).

Chen et al., "CoIN: A Benchmark of Continual Instruction tuNing for Multimodel Large Language Model", 2024. The total
rank r (`lora.r`) is split into E experts of rank r/E; in every LoRA'd linear a gate (linear d_in -> E, softmax,
per token) mixes them: `W x + s * sum_e g_e(x) B_e A_e x`. All experts and gates train on every task (no protection
beyond the mixture itself). Reference on UCIT: 6 experts, total rank 18.

Built on one PEFT adapter of rank r: expert e is rank rows [e*r/E, (e+1)*r/E) of A and the matching columns of B, and
the gate scales those rank channels of A x. That is the same function and the same parameters as E separate adapters
of rank r/E, with PEFT's plain forward path and one matmul per factor instead of E. The gate (`mcit_moe_gate`, zero
initialised so training starts from a uniform mixture) lives next to the adapter and is saved in the run's
checkpoints; a PEFT-only export (`adapter/`) lacks the gate and so computes the ungated sum, not this model.

Deviations: the scaling is PEFT's alpha / r with r the total rank; the gate reads the adapter's input after LoRA
dropout (identical at inference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mcit.errors import RecipeError
from mcit.methods.base import register
from mcit.methods.lora import add_lora, lora_layers
from mcit.methods.lora_ft import ADAPTER, SequentialLoRA


@dataclass
class MoELoRAOptions:
    experts: int = 6
    """Number of experts E; `lora.r` is the total rank and must be a multiple of E."""


def _gate_hook(layer, experts: int):
    """Forward hook on lora_A: multiply each expert's rank channels by its per-token gate value."""

    def hook(_module, args, output):
        gates = torch.softmax(layer.mcit_moe_gate(args[0]).float(), dim=-1).to(output.dtype)
        return output * torch.repeat_interleave(gates, output.shape[-1] // experts, dim=-1)

    return hook


@register("moelora")
class MoELoRA(SequentialLoRA):
    Options = MoELoRAOptions

    def __init__(self, recipe, options: MoELoRAOptions):
        super().__init__(recipe, options)
        r = recipe.method.lora.r
        if options.experts < 1 or r % options.experts:
            raise RecipeError(f"method.experts ({options.experts}) must divide method.lora.r ({r}): each expert gets "
                              "rank r / experts (CoIN: 6 experts, r = 18)")
        self.handles: list = []

    def setup(self, model):
        model = add_lora(model, self.recipe, ADAPTER)
        for ref in lora_layers(model):
            linear = ref.module.lora_A[ADAPTER]
            if not hasattr(ref.module, "mcit_moe_gate"):
                gate = nn.Linear(linear.in_features, self.options.experts, bias=False,
                                 dtype=linear.weight.dtype, device=linear.weight.device)
                nn.init.zeros_(gate.weight)
                ref.module.mcit_moe_gate = gate
            self.handles.append(linear.register_forward_hook(_gate_hook(ref.module, self.options.experts)))
        return model

    def prepare(self, model, stage, task_ids) -> None:
        super().prepare(model, stage, task_ids)
        for ref in lora_layers(model):
            ref.module.mcit_moe_gate.requires_grad_(True)
