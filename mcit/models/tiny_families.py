"""Tiny random-init checkpoints of the other model families, one per `model_type`, for the family adapters' tests.

Each is a real transformers architecture of its family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision,
InternVL, Idefics3, SmolVLM) built from config at toy sizes (text d=64 with 2 layers, vision d=64 with 2 layers,
images of at most 64 px), with a tokenizer trained locally on SynthCIT's text (byte-level BPE; LLaVA-NeXT's Mistral:
sentencepiece BPE with byte fallback, like `builtin:tiny-llava`'s), the family's special tokens under their real
names, its real chat-template format and its real processor class. A folder loads with `AutoProcessor` and
`AutoModelForImageTextToText` like the hub checkpoint it stands for, so an adapter tested here meets the same module
paths, processor outputs and placeholder expansion as on the full-size model. Like `builtin:tiny-llava-init`, these
are untrained: they check plumbing (shapes, token counts, losses, generation), never quality.

What is kept from each real checkpoint: the processor class and its placeholder expansion, patch size 14, merge size 2
and temporal patch size 2 of the Qwen vision towers, Qwen2.5-VL's windowed vision attention with its last block
global, SigLIP with the anyres grid and `vision_feature_select_strategy="full"` for LLaVA-OneVision, the CLS-carrying
InternViT with pixel shuffle 0.5 and the "default" strategy for InternVL, the image splitting with row/column tags for
Idefics3, Qwen3-VL's 16 px patches, learned position grid, DeepStack mergers and interleaved multimodal RoPE (theta
5e6, an explicit head_dim), LLaVA-NeXT's CLIP with CLS, the second-to-last layer read with the "default" strategy,
anyres tiles with one image-newline token per row and the Mistral [INST] format with <s> added by the tokenizer,
SmolVLM's Idefics3-style splitting with pixel shuffle 4 and SmolLM2's <|im_start|> BOS, and EOS = the end-of-turn token
that each instruct model's generation config stops on. What is scaled down: widths, depths, the image sizes (so one
image is a handful of tokens) and the anyres/tiling grids.

The processors of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL and SmolVLM carry a video processor,
which transformers only implements with torchvision; `AutoProcessor.from_pretrained` of those folders therefore needs
torchvision installed (mcit.models.loading builds them without their video processor when it is missing). The folder
is written without it (the processor config is data), and the model, tokenizer and image processor load without it.
SmolVLM's processor class also needs the `num2words` package, whichever way it is built.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mcit.data.synthcit import corpus
from mcit.errors import ModelError
from mcit.runtime.files import atomic_folder

QWEN2VL_ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-qwen2vl"
"""Where `builtin:tiny-qwen2vl`, the pretrained `TinyQwen2VLSpec` base, is shipped (with its PROVENANCE.json)."""
VOCAB_SIZE = 512  # target of the BPE trainer; SynthCIT's text runs out of merges near 550 tokens anyway

# Shared toy sizes. head_dim = 64 / 2 = 32, so Qwen's multimodal RoPE sections (t, h, w) must add up to 16.
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=2048)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# --- chat templates: the real checkpoints' formats (data, written as each hub processor ships it) ----------------

_QWEN_NAMESPACES = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
_QWEN_TURN = (  # one ChatML turn; an image is <|vision_start|><|image_pad|><|vision_end|>, expanded by the processor
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
)
_QWEN_GENERATION = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
# Qwen2-VL / Qwen2.5-VL: a default system prompt opens every conversation that has none.
QWEN2_VL_TEMPLATE = (
    _QWEN_NAMESPACES + "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}" + _QWEN_TURN + "{% endfor %}" + _QWEN_GENERATION
)
# Qwen3-VL Instruct (its tool-call branches left out): the same turns, no default system prompt.
QWEN3_VL_TEMPLATE = _QWEN_NAMESPACES + "{% for message in messages %}" + _QWEN_TURN + "{% endfor %}" + _QWEN_GENERATION

# LLaVA-OneVision (llava-hf conversion): images first, then videos, then the text of the turn.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# InternVL (-hf conversion): ChatML; an image is one <IMG_CONTEXT> that the processor expands to <img>...</img>.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Idefics3-8B-Llama3: "User:<image>text<end_of_utterance>\nAssistant: ..." after Llama 3's begin-of-text.
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# SmolVLM(2) Instruct: Idefics3's "User:<image>text<end_of_utterance>" turns, opened by <|im_start|> (its BOS).
SMOLVLM_TEMPLATE = "<|im_start|>" + IDEFICS3_TEMPLATE.removeprefix("<|begin_of_text|>")

# LLaVA-NeXT on Mistral-7B-Instruct (llava-v1.6-mistral): "[INST] <image>\ntext [/INST] answer</s>"; the generation
# prompt adds nothing (the model answers right after [/INST]), and the tokenizer puts <s> first.
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ ' ' + content['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
IDEFICS3_TILES = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))


@dataclass(frozen=True)
class TinyFamily:
    """Everything that differs between the families, as data; `build_family` does the rest."""

    model_type: str
    processor_class: str
    tokenizer_class: str  # the class the real checkpoint's tokenizer_config names
    special_tokens: tuple[str, ...]  # added after the BPE vocabulary, in this order (sentencepiece: its own symbols)
    eos_token: str
    pad_token: str
    stop_tokens: tuple[str, ...]  # generation_config.eos_token_id: the end-of-turn token first
    chat_template: str
    image_processor: dict[str, Any]  # {"class": name, **kwargs}
    make_config: Callable[[Callable[[str], int], int, TinyFamily], Any]  # (token -> id, vocab size, family)
    bos_token: str | None = None
    named_tokens: dict[str, str] = field(default_factory=dict)  # tokenizer attributes (InternVL's image tokens)
    video_processor: dict[str, Any] | None = None  # saved as data: building it would need torchvision
    processor_kwargs: dict[str, Any] = field(default_factory=dict)


def _text(model_type: str, vocab: int, tokens: Callable[[str], int], family: TinyFamily,
          sizes: dict[str, Any] | None = None, **extra) -> dict[str, Any]:
    return dict(sizes or TEXT, model_type=model_type, vocab_size=vocab, eos_token_id=tokens(family.stop_tokens[0]),
                pad_token_id=tokens(family.pad_token),
                bos_token_id=tokens(family.bos_token) if family.bos_token else None, **extra)


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of a head's rotary frequency pairs over (time, height, width): 16 / 24 / 24 of the 64 pairs of
    its 128-wide heads, kept in that proportion at other head sizes (head_dim 32: 4 / 6 / 6; 64: 8 / 12 / 12)."""
    pairs = head_dim // 2
    time = pairs // 4
    height = (pairs - time) // 2
    return [time, height, pairs - time - height]


def interleaved_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's (time, height, width) counts of a head's rotary frequency pairs, 24 / 20 / 20 of 64: height and width
    take every third pair (from pair 1 and 2), time the rest; kept in that proportion at other head sizes (32: 6 / 5 /
    5)."""
    pairs = head_dim // 2
    spatial = pairs * 5 // 16
    return [pairs - 2 * spatial, spatial, spatial]


def _qwen_config(config_class: str, vision: dict[str, Any], text: dict[str, Any] | None = None, *,
                 section: Callable[[int], list[int]] = mrope_section, rope: dict[str, Any] | None = None, **top: Any):
    """`text`: sizes of the language model (default: the shared toy `TEXT`); `section`: the multimodal RoPE split of a
    head; `rope`: further rope parameters (over Qwen2-VL's theta 1e6); `top`: further top-level config keys."""
    sizes = dict(TEXT, **(text or {}))

    def make(tokens: Callable[[str], int], vocab: int, family: TinyFamily):
        import transformers

        head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
        rope_parameters = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section(head_dim),
                           **(rope or {})}
        return getattr(transformers, config_class)(
            text_config=_text(family.model_type + "_text", vocab, tokens, family, sizes,
                              rope_parameters=rope_parameters),
            vision_config=vision, image_token_id=tokens("<|image_pad|>"), video_token_id=tokens("<|video_pad|>"),
            vision_start_token_id=tokens("<|vision_start|>"), vision_end_token_id=tokens("<|vision_end|>"), **top)
    return make


def _onevision_config(tokens: Callable[[str], int], vocab: int, family: TinyFamily):
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        # no attention-pooling head: OneVision reads patch features, so a head would only be weights without gradient
        vision_config=dict(VISION, model_type="siglip_vision_model", image_size=32, patch_size=8, vision_use_head=False),
        text_config=_text("qwen2", vocab, tokens, family),
        image_token_index=tokens("<image>"), video_token_index=tokens("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=family.image_processor["image_grid_pinpoints"], vision_aspect_ratio="anyres_max_9")


def _internvl_config(tokens: Callable[[str], int], vocab: int, family: TinyFamily):
    from transformers import InternVLConfig

    return InternVLConfig(
        vision_config=dict(VISION, image_size=[32, 32], patch_size=[8, 8]),
        text_config=_text("qwen2", vocab, tokens, family),
        image_token_id=tokens("<IMG_CONTEXT>"), image_seq_length=family.processor_kwargs["image_seq_length"],
        downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")


def _idefics3_config(tokens: Callable[[str], int], vocab: int, family: TinyFamily):
    from transformers import Idefics3Config

    return Idefics3Config(
        vision_config=dict(VISION, image_size=32, patch_size=8), text_config=_text("llama", vocab, tokens, family),
        image_token_id=tokens("<image>"), scale_factor=2)


def _smolvlm_config(tokens: Callable[[str], int], vocab: int, family: TinyFamily):
    from transformers import SmolVLMConfig

    # SmolVLM's pixel shuffle is 4 (Idefics3's 2): 8 px patches of a 32 px tile would leave one token, so 4 px ones
    return SmolVLMConfig(
        vision_config=dict(VISION, image_size=32, patch_size=4), text_config=_text("llama", vocab, tokens, family),
        image_token_id=tokens("<image>"), scale_factor=4)


def _llava_next_config(tokens: Callable[[str], int], vocab: int, family: TinyFamily):
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=dict(VISION, model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=64),
        text_config=_text("mistral", vocab, tokens, family, sliding_window=None),
        image_token_index=tokens("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_grid_pinpoints=family.image_processor["image_grid_pinpoints"], image_seq_length=16,
        tie_word_embeddings=False)


QWEN_IMAGES = {"class": "Qwen2VLImageProcessorPil", "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
               "min_pixels": 28 * 28, "max_pixels": 56 * 56}  # 1 to 4 merged tokens per image
QWEN_VIDEOS = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14, "merge_size": 2,
               "temporal_patch_size": 2, "size": {"shortest_edge": 28 * 28 * 2, "longest_edge": 56 * 56 * 4}}
QWEN_VISION_TOWER = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
# Qwen3-VL: 16 px patches, so one merged token covers 32 px; SigLIP-2's mean and std of 0.5
QWEN3_IMAGES = {"class": "Qwen2VLImageProcessorPil", "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
                "size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 64},  # 1 to 4 merged tokens per image
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
QWEN3_VIDEOS = {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 16, "merge_size": 2,
                "temporal_patch_size": 2, "size": {"shortest_edge": 32 * 32 * 2, "longest_edge": 64 * 64 * 4},
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
QWEN3_VISION_TOWER = dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2)

FAMILIES: dict[str, TinyFamily] = {
    family.model_type: family for family in (
        TinyFamily(
            model_type="qwen2_vl", processor_class="Qwen2VLProcessor", tokenizer_class="Qwen2Tokenizer",
            special_tokens=CHATML + QWEN_VISION, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            stop_tokens=("<|im_end|>", "<|endoftext|>"), chat_template=QWEN2_VL_TEMPLATE,
            image_processor=QWEN_IMAGES, video_processor=QWEN_VIDEOS,
            make_config=_qwen_config("Qwen2VLConfig", dict(
                QWEN_VISION_TOWER, depth=2, embed_dim=64, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2))),
        TinyFamily(
            model_type="qwen2_5_vl", processor_class="Qwen2_5_VLProcessor", tokenizer_class="Qwen2Tokenizer",
            special_tokens=CHATML + QWEN_VISION, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            stop_tokens=("<|im_end|>", "<|endoftext|>"), chat_template=QWEN2_VL_TEMPLATE,
            image_processor=QWEN_IMAGES, video_processor=QWEN_VIDEOS,
            # window_size 28 px = one merged token per window, so the windowed blocks really are windowed at 56 px
            make_config=_qwen_config("Qwen2_5_VLConfig", dict(
                QWEN_VISION_TOWER, depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                out_hidden_size=TEXT["hidden_size"], window_size=28, fullatt_block_indexes=[1]))),
        TinyFamily(
            model_type="llava_onevision", processor_class="LlavaOnevisionProcessor", tokenizer_class="Qwen2Tokenizer",
            special_tokens=CHATML + ("<image>", "<video>"), eos_token="<|im_end|>", pad_token="<|endoftext|>",
            stop_tokens=("<|im_end|>", "<|endoftext|>"), chat_template=ONEVISION_TEMPLATE,
            image_processor={"class": "LlavaOnevisionImageProcessorPil", "size": {"height": 32, "width": 32},
                             "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]],
                             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
            video_processor={"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 32, "width": 32},
                             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
            processor_kwargs={"num_image_tokens": 16, "vision_feature_select_strategy": "full",
                              "vision_aspect_ratio": "anyres_max_9", "image_token": "<image>", "video_token": "<video>"},
            make_config=_onevision_config),
        TinyFamily(
            model_type="internvl", processor_class="InternVLProcessor", tokenizer_class="Qwen2Tokenizer",
            special_tokens=CHATML + ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"), eos_token="<|im_end|>",
            pad_token="<|endoftext|>", stop_tokens=("<|im_end|>", "<|endoftext|>"), chat_template=INTERNVL_TEMPLATE,
            named_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
            image_processor={"class": "GotOcr2ImageProcessorPil", "size": {"height": 32, "width": 32},
                             "crop_to_patches": True, "min_patches": 1, "max_patches": 4,
                             "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD},
            video_processor={"video_processor_type": "InternVLVideoProcessor", "size": {"height": 32, "width": 32},
                             "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD},
            processor_kwargs={"image_seq_length": 4},  # (32 / 8) ** 2 patches * 0.5 ** 2 pixel shuffle
            make_config=_internvl_config),
        TinyFamily(
            model_type="idefics3", processor_class="Idefics3Processor", tokenizer_class="PreTrainedTokenizerFast",
            special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                            "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
            + IDEFICS3_TILES,
            bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad_id|>",
            stop_tokens=("<end_of_utterance>", "<|end_of_text|>"), chat_template=IDEFICS3_TEMPLATE,
            image_processor={"class": "Idefics3ImageProcessorPil", "size": {"longest_edge": 64},
                             "max_image_size": {"longest_edge": 32}, "do_image_splitting": True},
            processor_kwargs={"image_seq_len": 4},  # (32 / 8) ** 2 patches / scale_factor ** 2
            make_config=_idefics3_config),
        TinyFamily(
            model_type="qwen3_vl", processor_class="Qwen3VLProcessor", tokenizer_class="Qwen2Tokenizer",
            special_tokens=CHATML + QWEN_VISION, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            stop_tokens=("<|im_end|>", "<|endoftext|>"), chat_template=QWEN3_VL_TEMPLATE,
            image_processor=QWEN3_IMAGES, video_processor=QWEN3_VIDEOS,
            # every vision block feeds a DeepStack merger whose tokens are added after decoder layers 0 and 1, as
            # blocks 8 / 16 / 24 of the real 27 feed decoder layers 0 / 1 / 2
            make_config=_qwen_config("Qwen3VLConfig", dict(
                QWEN3_VISION_TOWER, depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                out_hidden_size=TEXT["hidden_size"], num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
                {"head_dim": TEXT["hidden_size"] // TEXT["num_attention_heads"]}, section=interleaved_mrope_section,
                rope={"rope_theta": 5_000_000.0, "mrope_interleaved": True})),
        TinyFamily(
            model_type="llava_next", processor_class="LlavaNextProcessor", tokenizer_class="LlamaTokenizer",
            special_tokens=("<unk>", "<s>", "</s>", "<image>", "<pad>"), bos_token="<s>", eos_token="</s>",
            pad_token="<pad>", stop_tokens=("</s>",), chat_template=LLAVA_NEXT_TEMPLATE,
            # llava-v1.6's 336 px CLIP tiles and (h, w) grid pinpoints 336 x 672 ... 1008 x 336, scaled to 32 px tiles
            image_processor={"class": "LlavaNextImageProcessorPil", "size": {"shortest_edge": 32},
                             "crop_size": {"height": 32, "width": 32},
                             "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]},
            processor_kwargs={"patch_size": 8, "vision_feature_select_strategy": "default",
                              "num_additional_image_tokens": 1, "image_token": "<image>"},
            make_config=_llava_next_config),
        TinyFamily(
            model_type="smolvlm", processor_class="SmolVLMProcessor", tokenizer_class="GPT2Tokenizer",
            special_tokens=CHATML + ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
            + IDEFICS3_TILES,
            bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
            stop_tokens=("<end_of_utterance>",), chat_template=SMOLVLM_TEMPLATE,
            named_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                          "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
            image_processor={"class": "SmolVLMImageProcessorPil", "size": {"longest_edge": 64},
                             "max_image_size": {"longest_edge": 32}, "do_image_splitting": True,
                             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
            video_processor={"video_processor_type": "SmolVLMVideoProcessor", "size": {"longest_edge": 32},
                             "max_image_size": {"longest_edge": 32}, "fps": 1, "num_frames": 64,
                             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
            processor_kwargs={"image_seq_len": 4},  # (32 / 4) ** 2 patches / scale_factor ** 2
            make_config=_smolvlm_config),
    )
}


def train_byte_level_bpe(texts: list[str], special_tokens: tuple[str, ...], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE `tokenizers.Tokenizer` with Qwen2's pre-tokenizer (single digits, as SynthCIT counts).

    All 256 byte symbols are in the initial alphabet, so no text is ever unknown; the special tokens are added after
    the learned vocabulary as special added tokens (never split, skipped when decoding)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tokenizer


def build_tokenizer(family: TinyFamily, texts: list[str] | None = None):
    """The family's tokenizer class around a BPE trained on `texts` (default: SynthCIT's text)."""
    import transformers

    texts = corpus() if texts is None else texts
    if family.tokenizer_class == "LlamaTokenizer":
        return _sentencepiece_tokenizer(family, texts)
    trained = train_byte_level_bpe(texts, family.special_tokens)
    specials = {"eos_token": family.eos_token, "pad_token": family.pad_token, "bos_token": family.bos_token}
    named = {"extra_special_tokens": dict(family.named_tokens)} if family.named_tokens else {}
    if family.tokenizer_class in ("Qwen2Tokenizer", "GPT2Tokenizer"):
        # both rebuild their own byte-level pipeline from vocab + merges (Qwen2's is the pre-tokenizer trained above;
        # GPT-2's regex splits numbers differently, which only changes which merges apply); GPT-2 keeps its default
        # unknown token <|endoftext|>, Qwen2 has none
        model = json.loads(trained.to_str())["model"]
        unknown = {"unk_token": None} if family.tokenizer_class == "Qwen2Tokenizer" else {}
        tokenizer = getattr(transformers, family.tokenizer_class)(
            vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], **unknown, **specials, **named)
        tokenizer.add_special_tokens({"additional_special_tokens": list(family.special_tokens)},
                                     replace_extra_special_tokens=False)
    else:
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=trained, **specials, **named)
    tokenizer.chat_template = family.chat_template
    return tokenizer


def _sentencepiece_tokenizer(family: TinyFamily, texts: list[str]):
    """A LLaMA/Mistral tokenizer: sentencepiece BPE with byte fallback (trained as `builtin:tiny-llava`'s is) whose
    <unk> <s> </s> come first and <image> <pad> follow as user-defined symbols, converted by `LlamaTokenizer`, which
    puts <s> before every text as Mistral's does."""
    import tempfile

    from transformers import LlamaTokenizer

    from mcit.models.tiny import train_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        train_tokenizer(Path(folder), VOCAB_SIZE, texts)
        tokenizer = LlamaTokenizer.from_pretrained(folder, pad_token=family.pad_token, add_bos_token=True,
                                                   add_eos_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [  # <image>: never split, skipped when decoding
        t for t in family.special_tokens if t not in tokenizer.all_special_tokens]})
    unknown = [t for t in family.special_tokens if tokenizer.convert_tokens_to_ids(t) == tokenizer.unk_token_id
               and t != tokenizer.unk_token]
    if unknown or (tokenizer.bos_token, tokenizer.eos_token) != (family.bos_token, family.eos_token):
        raise ModelError(f"{family.model_type}: the sentencepiece tokenizer lacks {unknown} or names other BOS/EOS")
    tokenizer.chat_template = family.chat_template
    return tokenizer


def build_image_processor(family: TinyFamily):
    """The PIL-backend image processor: the torchvision backend is not a dependency of this project."""
    import transformers

    spec = dict(family.image_processor)
    return getattr(transformers, spec.pop("class"))(**spec)


def write_processor(out_dir: Path, family: TinyFamily, tokenizer, image_processor) -> None:
    """Save what `<family.processor_class>.save_pretrained` saves, without instantiating the processor.

    The families with a video processor cannot instantiate their processor class without torchvision, so the
    processor config is written as data in the layout transformers reads back: `processor_config.json` with the
    nested sub-processor configs and the processor's own arguments, `chat_template.jinja`, and the tokenizer files.
    """
    tokenizer.save_pretrained(out_dir)
    config: dict[str, Any] = {"processor_class": family.processor_class, "image_processor": image_processor.to_dict(),
                              **family.processor_kwargs}
    if family.video_processor is not None:
        config["video_processor"] = dict(family.video_processor)
    (out_dir / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "chat_template.jinja").write_text(family.chat_template)


def build_model(family: TinyFamily, tokenizer, seed: int = 0):
    """The family's `*ForConditionalGeneration`, randomly initialised with `seed`, for `tokenizer`'s vocabulary."""
    from transformers import AutoModelForImageTextToText

    config = family.make_config(tokenizer.convert_tokens_to_ids, len(tokenizer), family)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    generation = model.generation_config
    generation.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in family.stop_tokens]
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    return model


def write_init(family: TinyFamily, out_dir: Path, seed: int = 0, **provenance: Any) -> Path:
    """Write a randomly initialised checkpoint of `family` (weights + processor) to `out_dir`, atomically;
    `provenance` is recorded in its PROVENANCE.json beside the seed and the vocabulary size."""
    with atomic_folder(Path(out_dir)) as tmp:
        tokenizer = build_tokenizer(family)
        write_processor(tmp, family, tokenizer, build_image_processor(family))
        build_model(family, tokenizer, seed).save_pretrained(tmp)
        (tmp / "PROVENANCE.json").write_text(json.dumps(
            {"kind": "random-init", "model_type": family.model_type, "seed": seed, "vocab_size": len(tokenizer),
             **provenance}, indent=2))
    return Path(out_dir)


def create_family_init(model_type: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a randomly initialised tiny `model_type` checkpoint (weights + processor) to `out_dir`, atomically."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ModelError(f"no tiny builder for model_type {model_type!r}; expected one of {sorted(FAMILIES)}")
    return write_init(family, out_dir, seed)


FAMILY_BUILDERS: dict[str, Callable[[Path, int], Path]] = {
    model_type: partial(create_family_init, model_type) for model_type in FAMILIES}


# --- builtin:tiny-qwen2vl: a second SynthCIT base, at builtin:tiny-llava's capacity ------------------------------


@dataclass(frozen=True)
class TinyQwen2VLSpec:
    """Architecture of `builtin:tiny-qwen2vl(-init)`: tiny-llava's capacity (mcit.models.tiny.TinyLlavaSpec) in
    Qwen2-VL's shape, so SynthCIT tables can compare two architectures at one size. Defaults are the shipped base.

    Kept from Qwen2-VL: the ViT with 2-D rotary positions and no CLS, the 2 x 2 patch merger as projector, temporal
    patch 2 (a still image is two identical frames), multimodal RoPE in the decoder with the real (t, h, w) split,
    biased q/k/v, rope theta 1e6, ChatML with the default system prompt, `<|im_end|>` as EOS, no BOS, and dynamic
    resolution: an image keeps its own size, rounded to multiples of `patch_size * merge_size` pixels and bounded by
    `min_pixels` / `max_pixels`, and becomes one token per merged 2 x 2 patch block.

    Scaled to SynthCIT: patches of 4 px instead of 14, so a merged token covers 8 x 8 px, the area of one of
    tiny-llava's 8 px patches; a 48 x 48 SynthCIT image therefore becomes 6 x 6 = 36 tokens, as on tiny-llava (whose
    CLIP sees 36 patches + CLS). The bounds keep the real family's minimum of 2 x 2 merged tokens (16 x 16 px here)
    and cap an image at 96 x 96 px = 144 tokens, so a large image never fills a SynthCIT `train.max_length`. Query
    and key/value heads are equal (4 / 4): the real models' grouped KV heads would make the text model smaller than
    tiny-llava's; input and output embeddings are untied like Qwen2-VL-7B's (and tiny-llava's).
    """

    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 704
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp_ratio: int = 4  # 512 wide, tiny-llava's CLIP MLP
    patch_size: int = 4
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 16 * 16
    max_pixels: int = 96 * 96
    max_positions: int = 2048

    def image_tokens(self, width: int, height: int) -> int:
        """Tokens an image of this size becomes: the image processor's own resize rule (Qwen's `smart_resize`)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        h, w = smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return (h // factor) * (w // factor)

    def family(self) -> TinyFamily:
        """The Qwen2-VL `TinyFamily` (tokenizer, template, processor classes) at these sizes."""
        from dataclasses import replace

        patches = {"patch_size": self.patch_size, "merge_size": self.merge_size,
                   "temporal_patch_size": self.temporal_patch_size}
        vision = dict(depth=self.vision_layers, embed_dim=self.vision_hidden, hidden_size=self.text_hidden,
                      num_heads=self.vision_heads, mlp_ratio=self.vision_mlp_ratio, patch_size=self.patch_size,
                      spatial_merge_size=self.merge_size, temporal_patch_size=self.temporal_patch_size)
        text = dict(hidden_size=self.text_hidden, intermediate_size=self.text_intermediate,
                    num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
                    num_key_value_heads=self.text_kv_heads, max_position_embeddings=self.max_positions)
        return replace(
            FAMILIES["qwen2_vl"],
            image_processor={"class": "Qwen2VLImageProcessorPil", **patches, "min_pixels": self.min_pixels,
                             "max_pixels": self.max_pixels},
            video_processor={"video_processor_type": "Qwen2VLVideoProcessor", **patches,
                             "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}},
            make_config=_qwen_config("Qwen2VLConfig", vision, text, tie_word_embeddings=False))


def create_tiny_qwen2vl_init(out_dir: Path, spec: TinyQwen2VLSpec | None = None, seed: int = 0) -> Path:
    """Write the random-init `builtin:tiny-qwen2vl-init` (the start of recipes/synthcit/pretrain-tiny-qwen2vl.yaml):
    `spec`'s Qwen2-VL with a byte-level BPE trained on SynthCIT's text, atomically."""
    from dataclasses import asdict

    spec = spec or TinyQwen2VLSpec()
    return write_init(spec.family(), out_dir, seed, spec=asdict(spec))
