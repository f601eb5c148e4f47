"""The family registry against the installed transformers: every family's part paths exist in its tiny model, the
layer index reads every family's decoder layers, and the two refusals name what to do."""

from __future__ import annotations

import json

import pytest

from mcit.config import ModelConfig
from mcit.errors import ModelError
from mcit.models.families import FAMILIES, family_of
from mcit.models.loading import LM_LAYER, lm_layer_index, load_base, lora_target_regex
from mcit.models.tiny_families import FAMILY_BUILDERS, create_family_init

TINY = ("llava", *FAMILY_BUILDERS)
"""A tiny checkpoint of each family: builtin:tiny-llava for LLaVA-1.5, a random-init builder for every other."""


def test_every_registered_family_has_a_tiny_checkpoint_tested_here():
    assert {model_type for family in FAMILIES.values() for model_type in family.model_types} == set(TINY)


@pytest.fixture(scope="module", params=TINY)
def loaded(request, tmp_path_factory):
    if request.param == "llava":
        return load_base(ModelConfig(name_or_path="builtin:tiny-llava"))
    folder = create_family_init(request.param, tmp_path_factory.mktemp("family") / request.param)
    return load_base(ModelConfig(name_or_path=str(folder)))


def test_every_part_of_the_family_is_where_the_family_says(loaded):
    model, _ = loaded
    family = family_of(model)
    assert model.config.model_type in family.model_types
    lm, projector, vision = (family.part(model, which) for which in ("language_model", "projector", "vision_tower"))
    layers = {lm_layer_index(name + ".") for name, _ in model.named_modules() if name.endswith("self_attn")}
    layers.discard(None)
    assert layers == set(range(model.config.get_text_config().num_hidden_layers))
    names = {id(m): n for n, m in model.named_modules()}
    assert family.contains(names[id(projector)] + ".x", "projector")
    assert sum(p.numel() for p in projector.parameters()) and sum(p.numel() for p in vision.parameters())
    # the vision tower's own layers are never taken for language-model layers
    assert not any(LM_LAYER.search(n + ".") for n, _ in vision.named_modules(prefix=names[id(vision)]))
    assert lm is not vision


def test_lora_targets_matching_nothing_are_refused_listing_the_layers(loaded):
    model, _ = loaded
    with pytest.raises(ModelError, match=r"method.lora.target_modules \['qkv_proj'\] match no linear layer of the .* "
                                         r"language model .*its linear layers are: .*down_proj.*q_proj"):
        lora_target_regex(model, ["qkv_proj"])
    assert lora_target_regex(model, ["q_proj"])  # the default targets do match


def test_an_unsupported_model_type_names_the_families_and_how_to_add_one(tmp_path):
    from transformers import Blip2Config

    Blip2Config().save_pretrained(tmp_path)
    with pytest.raises(ModelError) as info:
        load_base(ModelConfig(name_or_path=str(tmp_path)))
    message = str(info.value)
    assert "'blip-2' model" in message and "mcit/models/families.py" in message and "\n" not in message
    for family in {f.name for f in FAMILIES.values()}:
        assert family in message
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "blip-2"


def test_processor_settings_apply_and_a_misspelt_one_is_refused(tmp_path):
    folder = create_family_init("qwen2_vl", tmp_path / "qwen")
    from mcit.data.collate import ImageTokens
    from mcit.models.loading import load_processor

    default = load_processor(ModelConfig(name_or_path=str(folder)))
    capped = load_processor(ModelConfig(name_or_path=str(folder), processor={"max_pixels": 28 * 28}))
    big = ImageTokens(default).for_size((64, 64))[1]
    assert ImageTokens(capped).for_size((64, 64))[1] < big  # fewer pixels, fewer image tokens
    with pytest.raises(ModelError, match=r"model.processor.max_pixelz: not a setting of Qwen2VLImageProcessor.*"
                                         r"max_pixels"):
        load_processor(ModelConfig(name_or_path=str(folder), processor={"max_pixelz": 100}))
