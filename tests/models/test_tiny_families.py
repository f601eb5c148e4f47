"""The tiny random-init checkpoints of the other families (mcit.models.tiny_families): every folder loads with the Auto
classes and its family class, trains (finite loss, gradients) and generates, and the number of image placeholder
tokens always equals the number of image features the model produces, for images of two different sizes."""

from __future__ import annotations

import importlib.util
import inspect
import json

import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from mcit.config import ModelConfig
from mcit.errors import ModelError
from mcit.models.loading import load_processor
from mcit.models.tiny_families import FAMILIES, FAMILY_BUILDERS, create_family_init

FAMILY_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
}
IMAGE_TOKENS = {"qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "llava_onevision": "<image>",
                "internvl": "<IMG_CONTEXT>", "idefics3": "<image>", "qwen3_vl": "<|image_pad|>",
                "llava_next": "<image>", "smolvlm": "<image>"}
# Parameters (by name prefix) that the family's forward never reaches, as on the hub checkpoints: OneVision reads
# hidden_states[-1], i.e. before SigLIP's post-layernorm; LLaVA-NeXT reads the second-to-last CLIP layer, so the last
# one (here layer 1 of 2) and the post-layernorm do nothing
NO_GRADIENT = {"llava_onevision": ("model.vision_tower.post_layernorm.",),
               "llava_next": ("model.vision_tower.encoder.layers.1.",
                              "model.vision_tower.post_layernorm.")}
SIZES = [(64, 64), (96, 32)]  # (width, height): square vs wide gives a different token count in every family
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the shape of the object?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
]
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """model_type -> folder, each built once for this module (well under a second each)."""
    root = tmp_path_factory.mktemp("tiny-families")
    return {model_type: build(root / model_type, 0) for model_type, build in FAMILY_BUILDERS.items()}


def image(size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, (20, 20, 200))
    img.paste((230, 30, 30), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return img


def image_token_id(model) -> int:
    config = model.config
    return config.image_token_id if getattr(config, "image_token_id", None) is not None else config.image_token_index


def feature_count(model, pixel_inputs) -> int:
    """How many image-feature vectors the model will scatter into the text for these processor outputs."""
    accepted = inspect.signature(model.model.get_image_features).parameters
    with torch.no_grad():
        features = model.model.get_image_features(**{k: v for k, v in pixel_inputs.items() if k in accepted})
    pooled = features.pooler_output
    pooled = pooled if isinstance(pooled, (list, tuple)) else [pooled]
    return sum(f.numel() for f in pooled) // model.config.get_text_config().hidden_size


def train_and_generate(model, batch, model_type: str) -> None:
    """Forward with labels (finite loss), backward (gradients everywhere the family uses), then 3 greedy tokens."""
    model.zero_grad()
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = {name for name, p in model.named_parameters() if p.grad is None}
    unreached = NO_GRADIENT.get(model_type, ())
    assert missing == {name for name, _ in model.named_parameters() if unreached and name.startswith(unreached)}
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (batch["input_ids"].shape[0], batch["input_ids"].shape[1] + 3)


def test_every_family_has_a_builder():
    assert set(FAMILY_BUILDERS) == set(FAMILY_CLASSES)


def test_unknown_model_type_is_refused(tmp_path):
    with pytest.raises(ModelError, match="qwen2_vl"):
        create_family_init("gpt2", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("model_type", sorted(FAMILY_CLASSES))
def test_folder_loads_with_auto_and_family_classes(checkpoints, model_type):
    family = FAMILIES[model_type]
    path = checkpoints[model_type]
    model = AutoModelForImageTextToText.from_pretrained(path)
    family_class = getattr(transformers, FAMILY_CLASSES[model_type])
    assert type(model) is family_class
    assert type(family_class.from_pretrained(path)) is family_class
    assert model.config.model_type == model_type

    tokenizer = AutoTokenizer.from_pretrained(path)
    for token in family.special_tokens:  # each one id, never split by the BPE
        assert tokenizer.convert_ids_to_tokens(tokenizer(token, add_special_tokens=False).input_ids) == [token]
    assert tokenizer.eos_token == family.eos_token and tokenizer.pad_token == family.pad_token
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in family.stop_tokens]
    assert model.generation_config.eos_token_id == stop_ids
    assert tokenizer.convert_ids_to_tokens(image_token_id(model)) == IMAGE_TOKENS[model_type]
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    for name, token in family.named_tokens.items():  # InternVL's processor reads these tokenizer attributes
        assert getattr(tokenizer, name) == token

    assert AutoImageProcessor.from_pretrained(path) is not None
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == family.processor_class


def test_seed_sets_the_weights(tmp_path):
    def weights(seed):
        path = create_family_init("qwen2_vl", tmp_path / f"s{seed}", seed)
        return AutoModelForImageTextToText.from_pretrained(path).model.visual.merger.mlp[0].weight

    first = weights(0)
    assert torch.equal(first, AutoModelForImageTextToText.from_pretrained(tmp_path / "s0").model.visual.merger.mlp[0]
                       .weight)
    assert not torch.equal(first, weights(1))


@pytest.mark.parametrize("model_type", sorted(FAMILY_CLASSES))
def test_model_consumes_the_image_processor_output(checkpoints, model_type):
    """Without the processor class (it needs torchvision for six families): tokenizer + image processor + model."""
    path = checkpoints[model_type]
    model = AutoModelForImageTextToText.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    image_token = tokenizer.convert_ids_to_tokens(image_token_id(model))
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered.count(image_token) == 1
    forward_args = inspect.signature(model.forward).parameters
    counts = []
    for size in SIZES:
        pixels = image_processor(images=[image(size)], return_tensors="pt")
        n = feature_count(model, pixels)
        batch = {**tokenizer(rendered.replace(image_token, image_token * n), return_tensors="pt"),
                 **{k: v for k, v in pixels.items() if k in forward_args}}
        if "mm_token_type_ids" in forward_args:  # Qwen's M-RoPE needs to know which tokens are image tokens
            batch["mm_token_type_ids"] = (batch["input_ids"] == image_token_id(model)).long()
        train_and_generate(model, batch, model_type)
        counts.append(n)
    assert counts[0] != counts[1]  # dynamic resolution / tiling really depends on the image size


@pytest.mark.parametrize("model_type", sorted(FAMILY_CLASSES))
def test_processor_placeholders_match_the_image_features(checkpoints, model_type):
    """The processor class itself (as mcit loads it: without its video processor where torchvision is missing)."""
    path = checkpoints[model_type]
    model = AutoModelForImageTextToText.from_pretrained(path)
    if HAS_TORCHVISION or FAMILIES[model_type].video_processor is None:
        processor = AutoProcessor.from_pretrained(path)
    else:
        processor = load_processor(ModelConfig(name_or_path=str(path)))
    assert type(processor).__name__ == FAMILIES[model_type].processor_class
    rendered = processor.apply_chat_template(MESSAGES)
    counts = []
    for size in SIZES:
        batch = processor(text=[rendered], images=[image(size)], return_tensors="pt")
        placeholders = int((batch["input_ids"] == image_token_id(model)).sum())
        assert placeholders == feature_count(model, batch)
        train_and_generate(model, batch, model_type)
        counts.append(placeholders)
    assert counts[0] != counts[1]

    processor.tokenizer.padding_side = "left"  # a batch of two differently sized images, as generation batches them
    # one list of images per text (SmolVLM reads a flat list as all images of the first text)
    batch = processor(text=[rendered, rendered], images=[[image(s)] for s in SIZES], padding=True, return_tensors="pt")
    assert int((batch["input_ids"] == image_token_id(model)).sum()) == sum(counts)
    train_and_generate(model, batch, model_type)
