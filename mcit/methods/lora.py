"""PEFT helpers shared by the LoRA methods: the adapter config from a recipe, adding an adapter, choosing which
adapters train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
        return model
    peft_model = get_peft_model(model, lora_config(model, recipe, r, alpha), adapter_name=adapter)
    set_trainable_extras(peft_model, recipe.model)
    return peft_model


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
