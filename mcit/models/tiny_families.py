"""Tiny random-init checkpoints of the other model families, one per `model_type`, for the family adapters' tests.

Each is a real transformers architecture of its family (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, InternVL, Idefics3)
built from config at toy sizes (text d=64 with 2 layers, vision d=64 with 2 layers, images of at most 64 px), with a
byte-level BPE tokenizer trained locally on SynthCIT's text, the family's special tokens under their real names, its
real chat-template format and its real processor class. A folder loads with `AutoProcessor` and
`AutoModelForImageTextToText` like the hub checkpoint it stands for, so an adapter tested here meets the same module
paths, processor outputs and placeholder expansion as on the full-size model. Like `builtin:tiny-llava-init`, these
are untrained: they check plumbing (shapes, token counts, losses, generation), never quality.

What is kept from each real checkpoint: the processor class and its placeholder expansion, patch size 14, merge size 2
and temporal patch size 2 of the Qwen vision towers, Qwen2.5-VL's windowed vision attention with its last block
global, SigLIP with the anyres grid and `vision_feature_select_strategy="full"` for LLaVA-OneVision, the CLS-carrying
InternViT with pixel shuffle 0.5 and the "default" strategy for InternVL, the image splitting with row/column tags for
Idefics3, and EOS = the end-of-turn token that each instruct model's generation config stops on. What is scaled down:
widths, depths, the image sizes (so one image is a handful of tokens) and the anyres/tiling grids.

The processors of Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision and InternVL carry a video processor, which transformers only
implements with torchvision; `AutoProcessor.from_pretrained` of those folders therefore needs torchvision installed.
The folder is written without it (the processor config is data), and the model, tokenizer and image processor load
without it. SmolVLM is not built: its processor also requires the `num2words` package.
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

QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

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

CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
IDEFICS3_TILES = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))


@dataclass(frozen=True)
class TinyFamily:
    """Everything that differs between the families, as data; `build_family` does the rest."""

    model_type: str
    processor_class: str
    tokenizer_class: str  # the class the real checkpoint's tokenizer_config names
    special_tokens: tuple[str, ...]  # added after the BPE vocabulary, in this order
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


def _qwen_config(config_class: str, vision: dict[str, Any], text: dict[str, Any] | None = None, **top: Any):
    """`text`: sizes of the language model (default: the shared toy `TEXT`); `top`: further top-level config keys."""
    sizes = dict(TEXT, **(text or {}))

    def make(tokens: Callable[[str], int], vocab: int, family: TinyFamily):
        import transformers

        head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
        rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section(head_dim)}
        return getattr(transformers, config_class)(
            text_config=_text(family.model_type + "_text", vocab, tokens, family, sizes, rope_parameters=rope),
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


QWEN_IMAGES = {"class": "Qwen2VLImageProcessorPil", "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
               "min_pixels": 28 * 28, "max_pixels": 56 * 56}  # 1 to 4 merged tokens per image
QWEN_VIDEOS = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14, "merge_size": 2,
               "temporal_patch_size": 2, "size": {"shortest_edge": 28 * 28 * 2, "longest_edge": 56 * 56 * 4}}
QWEN_VISION_TOWER = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)

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

    trained = train_byte_level_bpe(corpus() if texts is None else texts, family.special_tokens)
    specials = {"eos_token": family.eos_token, "pad_token": family.pad_token, "bos_token": family.bos_token}
    named = {"extra_special_tokens": dict(family.named_tokens)} if family.named_tokens else {}
    if family.tokenizer_class == "Qwen2Tokenizer":
        # Qwen2Tokenizer rebuilds its own pipeline from vocab + merges (the same pre-tokenizer as trained above)
        model = json.loads(trained.to_str())["model"]
        tokenizer = transformers.Qwen2Tokenizer(
            vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], unk_token=None, **specials, **named)
        tokenizer.add_special_tokens({"additional_special_tokens": list(family.special_tokens)},
                                     replace_extra_special_tokens=False)
    else:
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=trained, **specials, **named)
    tokenizer.chat_template = family.chat_template
    return tokenizer


def build_image_processor(family: TinyFamily):
    """The PIL-backend image processor: the torchvision backend is not a dependency of this project."""
    import transformers

    spec = dict(family.image_processor)
    return getattr(transformers, spec.pop("class"))(**spec)


def write_processor(out_dir: Path, family: TinyFamily, tokenizer, image_processor) -> None:
    """Save what `<family.processor_class>.save_pretrained` saves, without instantiating the processor.

    The four families with a video processor cannot instantiate their processor class without torchvision, so the
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
