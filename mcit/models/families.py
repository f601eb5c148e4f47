"""Model families: where each multimodal architecture keeps its parts.

Everything architecture-specific that the rest of mcit needs is a field of `Family`: the module path of the language
model (LoRA targets, CKA and expert layers), of the projector and the vision tower (what `train_projector` /
`train_vision` unfreeze, what an export saves beside the adapters), and whether the tower's output starts with a CLS
token (router pooling drops it). How many image tokens an image becomes and which extra inputs (`image_grid_thw`,
`image_sizes`, `pixel_attention_mask`) a forward needs are read from the family's own processor at run time
(mcit.data.collate), never tabulated here, so they follow the processor's settings (Qwen2-VL's `max_pixels`,
OneVision's grid pinpoints) exactly.

Module paths are those of transformers 5 (`model.language_model.*`, `model.visual.merger`, ...). Adding a family is
one `Family(...)` line in `FAMILIES`, its tiny random-init builder in mcit.models.tiny_families and its test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mcit.errors import ModelError


@dataclass(frozen=True)
class Family:
    """One multimodal architecture, as mcit addresses its parts (paths from the bare HF model's root)."""

    name: str
    model_types: tuple[str, ...]
    """`config.model_type` values of this family."""
    model_class: str
    """The transformers class (also what `AutoModelForImageTextToText` picks for these model types)."""
    language_model: str = "model.language_model"
    """The decoder LM: `<language_model>.layers.N.*` are its decoder layers."""
    projector: str = "model.multi_modal_projector"
    vision_tower: str = "model.vision_tower"
    vision_cls: bool = True
    """The tower's hidden states start with a CLS token (CLIP, InternViT), which patch pooling leaves out; SigLIP and
    Qwen's ViT have none."""
    vision_cache: bool = False
    """The tower sees one row of `pixel_values` per image and the model selects its hidden states by index, so they
    can be kept per image across checkpoints (mcit/models/vision_cache.py); not for tiled or dynamic-resolution
    towers."""

    def part(self, model: Any, which: str):
        """The `language_model` / `projector` / `vision_tower` module of `model` (a bare model or a PeftModel)."""
        module = model.get_base_model() if hasattr(model, "get_base_model") else model
        path = getattr(self, which)
        for attr in path.split("."):
            if not hasattr(module, attr):
                raise ModelError(f"{type(model).__name__}: no module {path!r} ({which} of the {self.name} family); "
                                 f"the installed transformers may lay this architecture out differently")
            module = getattr(module, attr)
        return module

    def leaf(self, which: str) -> str:
        """The last name of a part's path (`multi_modal_projector`, `merger`): what PEFT's `modules_to_save` and
        parameter-name tests match by."""
        return getattr(self, which).rsplit(".", 1)[-1]

    def contains(self, parameter_name: str, which: str) -> bool:
        """Whether a parameter (or module) name, bare or under PeftModel's `base_model.model.` prefix, lies in a
        part."""
        return f".{getattr(self, which)}." in f".{parameter_name}"


FAMILIES: dict[str, Family] = {}
for _family in (
    Family("llava", ("llava",), "LlavaForConditionalGeneration", vision_cache=True),
    Family("llava-next", ("llava_next",), "LlavaNextForConditionalGeneration"),
    Family("llava-onevision", ("llava_onevision",), "LlavaOnevisionForConditionalGeneration", vision_cls=False),
    Family("qwen2-vl", ("qwen2_vl",), "Qwen2VLForConditionalGeneration", projector="model.visual.merger",
           vision_tower="model.visual", vision_cls=False),
    Family("qwen2.5-vl", ("qwen2_5_vl",), "Qwen2_5_VLForConditionalGeneration", projector="model.visual.merger",
           vision_tower="model.visual", vision_cls=False),
    Family("qwen3-vl", ("qwen3_vl",), "Qwen3VLForConditionalGeneration", projector="model.visual.merger",
           vision_tower="model.visual", vision_cls=False),
    Family("internvl", ("internvl",), "InternVLForConditionalGeneration"),
    Family("idefics3", ("idefics3",), "Idefics3ForConditionalGeneration", language_model="model.text_model",
           projector="model.connector", vision_tower="model.vision_model", vision_cls=False),
    Family("smolvlm", ("smolvlm",), "SmolVLMForConditionalGeneration", language_model="model.text_model",
           projector="model.connector", vision_tower="model.vision_model", vision_cls=False),
):
    for _type in _family.model_types:
        FAMILIES[_type] = _family


def family_for_type(model_type: str, where: str = "model") -> Family:
    family = FAMILIES.get(model_type)
    if family is None:
        known = ", ".join(sorted({f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values()}))
        raise ModelError(f"{where} is a {model_type!r} model, which mcit has no family for; supported: {known}. "
                         f"A new family is one Family(...) entry in mcit/models/families.py (docs/MODELS.md)")
    return family


def family_of(model: Any) -> Family:
    """The family of a model (bare, PeftModel or DeepSpeed-wrapped: anything with the HF `config`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None) or getattr(getattr(base, "module", None), "config", None)
    return family_for_type(getattr(config, "model_type", ""), type(base).__name__)


LM_LAYER = re.compile(
    rf"(?:{'|'.join(sorted({re.escape(f.language_model.rsplit('.', 1)[-1]) for f in FAMILIES.values()}))})"
    r"\.(?:model\.)?layers\.(\d+)\.")
"""A module or parameter name inside decoder layer N of any family's language model (group 1: N)."""
