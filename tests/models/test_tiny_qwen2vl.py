"""`builtin:tiny-qwen2vl`, the second shipped SynthCIT base (Qwen2-VL architecture at tiny-llava's capacity): both
builtin names resolve, the shipped folder loads with the Auto classes and with mcit's loader, it speaks Qwen2-VL's
chat format and stops on its end-of-turn token, an image's token count follows its size (dynamic resolution), and the
weights are the ones PROVENANCE.json records."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from mcit.config import ModelConfig
from mcit.data.collate import ImageTokens
from mcit.errors import ModelError
from mcit.models.families import family_of
from mcit.models.loading import load_base
from mcit.models.tiny import resolve_builtin
from mcit.models.tiny_families import QWEN2_VL_TEMPLATE, QWEN2VL_ASSET_DIR, TinyQwen2VLSpec
from mcit.runtime.files import sha256

SPEC = TinyQwen2VLSpec()
SYNTHCIT_SIZE = (48, 48)  # every SynthCIT image (mcit.data.synthcit_scenes.IMAGE_SIZE)
OTHER_SIZE = (96, 64)
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}]


@pytest.fixture(scope="module")
def shipped():
    path = resolve_builtin("builtin:tiny-qwen2vl")
    model, processor = load_base(ModelConfig(name_or_path="builtin:tiny-qwen2vl"))
    return path, model, processor


def scene(size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (235, 235, 235))
    image.paste((200, 30, 30), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image


def test_shipped_name_resolves_to_the_asset_folder():
    assert resolve_builtin("builtin:tiny-qwen2vl") == QWEN2VL_ASSET_DIR
    assert (QWEN2VL_ASSET_DIR / "model.safetensors").is_file()


def test_init_is_built_into_the_cache_at_the_spec_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("MCIT_CACHE", str(tmp_path))
    path = resolve_builtin("builtin:tiny-qwen2vl-init")
    assert path.is_relative_to(tmp_path)
    assert resolve_builtin("builtin:tiny-qwen2vl-init") == path  # built once, then reused
    config = json.loads((path / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert config["model_type"] == "qwen2_vl"
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
            text["intermediate_size"]) == (256, 4, 4, 704)
    assert (vision["embed_dim"], vision["depth"], vision["patch_size"], vision["spatial_merge_size"],
            vision["temporal_patch_size"]) == (128, 4, 4, 2, 2)
    assert sum(text["rope_parameters"]["mrope_section"]) == text["hidden_size"] // text["num_attention_heads"] // 2
    assert json.loads((path / "PROVENANCE.json").read_text())["kind"] == "random-init"


def test_unknown_builtin_names_both_bases():
    with pytest.raises(ModelError, match="builtin:tiny-qwen2vl"):
        resolve_builtin("builtin:tiny-qwen")


def test_shipped_weights_match_provenance():
    provenance = json.loads((QWEN2VL_ASSET_DIR / "PROVENANCE.json").read_text())
    assert provenance["model_safetensors_sha256"] == sha256(QWEN2VL_ASSET_DIR / "model.safetensors")
    assert provenance["base_model"] == "builtin:tiny-qwen2vl-init"
    assert provenance["kind"] == "pretrained"


def test_shipped_config_is_the_spec():
    """The weights were pretrained from the spec's init: a changed spec needs a new pretraining, not a silent drift."""
    config = json.loads((QWEN2VL_ASSET_DIR / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], text["num_key_value_heads"],
            text["intermediate_size"]) == (SPEC.text_hidden, SPEC.text_layers, SPEC.text_heads, SPEC.text_kv_heads,
                                           SPEC.text_intermediate)
    assert (vision["embed_dim"], vision["depth"], vision["num_heads"], vision["patch_size"]) == (
        SPEC.vision_hidden, SPEC.vision_layers, SPEC.vision_heads, SPEC.patch_size)
    images = json.loads((QWEN2VL_ASSET_DIR / "processor_config.json").read_text())["image_processor"]
    assert images["size"] == {"shortest_edge": SPEC.min_pixels, "longest_edge": SPEC.max_pixels}
    assert (images["patch_size"], images["merge_size"], images["temporal_patch_size"]) == (
        SPEC.patch_size, SPEC.merge_size, SPEC.temporal_patch_size)


def test_loads_with_the_auto_classes():
    model = AutoModelForImageTextToText.from_pretrained(QWEN2VL_ASSET_DIR)
    assert type(model) is transformers.Qwen2VLForConditionalGeneration
    assert type(AutoImageProcessor.from_pretrained(QWEN2VL_ASSET_DIR)).__name__.startswith("Qwen2VLImageProcessor")
    tokenizer = AutoTokenizer.from_pretrained(QWEN2VL_ASSET_DIR)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_loads_with_mcits_loader(shipped):
    _, model, processor = shipped
    assert family_of(model).name == "qwen2-vl"
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert not any(p.requires_grad for p in model.parameters())  # a frozen base, as load_base promises


def test_chat_template_and_eos_are_qwens(shipped):
    _, model, processor = shipped
    tokenizer = processor.tokenizer
    assert processor.chat_template == QWEN2_VL_TEMPLATE
    assert processor.apply_chat_template(MESSAGES, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What shape is it?<|im_end|>\n"
        "<|im_start|>assistant\ncircle<|im_end|>\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token is None
    assert tokenizer("x")["input_ids"] == tokenizer("x", add_special_tokens=False)["input_ids"]  # no BOS, like Qwen
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert model.generation_config.eos_token_id == stops
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert tokenizer.convert_ids_to_tokens(tokenizer(token, add_special_tokens=False)["input_ids"]) == [token]


def test_two_image_sizes_give_two_token_counts(shipped):
    """Dynamic resolution stays real: a SynthCIT image is tiny-llava's 36 tokens, another size another count, and the
    model turns each into exactly as many features as the text has placeholders."""
    _, model, processor = shipped
    tokens = ImageTokens(processor)
    assert tokens.fixed is None
    counts = {size: tokens.for_size(size)[1] for size in (SYNTHCIT_SIZE, OTHER_SIZE)}
    assert counts[SYNTHCIT_SIZE] == SPEC.image_tokens(*SYNTHCIT_SIZE) == 36
    assert counts[OTHER_SIZE] == SPEC.image_tokens(*OTHER_SIZE) != counts[SYNTHCIT_SIZE]
    text = processor.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    image_id = model.config.image_token_id
    for size, count in counts.items():
        batch = processor(text=[text], images=[scene(size)], return_tensors="pt")
        assert int((batch["input_ids"] == image_id).sum()) == count
        with torch.no_grad():
            pooled = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        pooled = pooled if isinstance(pooled, (list, tuple)) else [pooled]
        assert sum(f.numel() for f in pooled) == count * model.config.get_text_config().hidden_size
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert out.shape[1] > batch["input_ids"].shape[1]
