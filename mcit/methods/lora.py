"""PEFT helpers shared by the LoRA methods: the adapter config from a recipe, adding an adapter, choosing which
adapters train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mcit.config import Recipe
from mcit.models.loading import lm_layer_index, lora_target_regex, set_trainable_extras


def lora_config(model, recipe: Recipe, r: int | None = None, alpha: int | None = None):
    from peft import LoraConfig

    lora = recipe.method.lora
    return LoraConfig(r=r or lora.r, lora_alpha=alpha or lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora_target_regex(model, lora.target_modules), bias="none")


def add_lora(model, recipe: Recipe, adapter: str, r: int | None = None, alpha: int | None = None):
    """Add a LoRA adapter to (a PEFT-wrapped) `model`; the first call wraps the model with PEFT."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        model.add_adapter(adapter, lora_config(model.get_base_model(), recipe, r, alpha))
    else:
        model = get_peft_model(model, lora_config(model, recipe, r, alpha), adapter_name=adapter)
        set_trainable_extras(model, recipe.model)
    if recipe.method.lora.dropout_masks == "packed":
        use_packed_dropout(model, adapter)
    return model


class PackedDropout(torch.nn.Module):
    """Inverted dropout whose keep-mask takes 16 random bits per element from 64-bit generator draws.

    `nn.Dropout` draws once per element (`bernoulli_`), and on a CPU that serial draw is the largest single cost of a
    small model's LoRA step (28 adapted projections, each masking its input). Four elements per draw give the same
    Bernoulli(1 - p) mask up to p being rounded to a multiple of 1/65536 (0.05 -> 0.050003), with the survivors scaled by
    1 / (1 - p) as `nn.Dropout` does. Identity in evaluation mode and at p = 0."""

    def __init__(self, p: float):
        super().__init__()
        dropped = round(p * 65536)
        self.p = dropped / 65536
        self.threshold = dropped - 32768  # a signed 16-bit lane below this value is dropped: P = dropped / 65536
        self.scale = 65536 / (65536 - dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
        keep = words.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * keep.to(x.dtype).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p:.6f}, 16-bit lanes of 64-bit draws"


def use_packed_dropout(model, adapter: str) -> int:
    """Swap the `nn.Dropout` of `adapter` in every PEFT LoRA layer for a `PackedDropout` of the same p; returns how
    many were swapped (PEFT's `nn.Identity` for p = 0 is left alone)."""
    from peft.tuners.lora import LoraLayer

    swapped = 0
    for module in model.modules():
        if (isinstance(module, LoraLayer) and adapter in module.lora_dropout
                and isinstance(module.lora_dropout[adapter], torch.nn.Dropout)):
            module.lora_dropout[adapter] = PackedDropout(module.lora_dropout[adapter].p)
            swapped += 1
    return swapped


def set_lora_trainable(model, trainable: set[str]) -> None:
    """requires_grad on exactly the LoRA weights of the named adapters (plus recipe extras left as they are)."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(any(f".{a}." in name or name.endswith(f".{a}") for a in trainable))


@dataclass
class LoraLayerRef:
    name: str
    index: int
    """Language-model layer index (0-based)."""
    module: Any


def lora_layers(model) -> list[LoraLayerRef]:
    """Every PEFT LoRA layer of the language model, with its decoder layer index."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            index = lm_layer_index(name)
            if index is not None:
                out.append(LoraLayerRef(name, index, module))
    return out


def base_weights(layers: dict[str, Any]) -> dict[str, Any]:
    """The (merged-into) base weights of LoRA layers by state-dict key: what a checkpoint must hold once a method has
    merged adapters into the model's weights (RegLoRA, KeepLoRA)."""
    return {f"{name}.base_layer.weight": layer.get_base_layer().weight.detach() for name, layer in layers.items()}
