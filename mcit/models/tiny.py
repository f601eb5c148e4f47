"""`builtin:tiny-llava`: a LLaVA-1.5-shaped model small enough to train on a 2-core CPU.

It is a real `LlavaForConditionalGeneration` (Llama text model + CLIP vision tower + MLP projector) built from config,
with a sentencepiece BPE tokenizer trained locally on SynthCIT's text and a CLIP image processor for 48 px images.
It is saved and loaded with `save_pretrained` / `from_pretrained` like any Hugging Face checkpoint, so every code path
that serves `llava-hf/llava-1.5-7b-hf` serves this model too.

Two variants:

- `builtin:tiny-llava-init`: randomly initialised (built on first use into the cache); the pretraining recipe
  `recipes/synthcit/pretrain-tiny.yaml` starts from it.
- `builtin:tiny-llava`: the pretrained base shipped in `mcit/assets/tiny-llava/` (fp32 weights, with the recipe and
  seed that made them in `PROVENANCE.json`).

Size choices: the calibration notes (docs/SYNTHCIT.md) found a d=128 text model too small to count or answer yes/no;
d=256 with 4 layers is the smallest width that learned every SynthCIT task here.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mcit.data.synthcit import VERSION, corpus
from mcit.errors import ModelError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-llava"

# LLaVA-1.5's conversation format ("vicuna_v1"), written as a Jinja chat template so the processor owns it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Architecture of the tiny LLaVA. Defaults are the shipped base."""

    vocab_size: int = 512
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 704
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    image_size: int = 48
    patch_size: int = 8
    max_positions: int = 512

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def cache_dir() -> Path:
    return Path(os.environ.get("MCIT_CACHE", Path.home() / ".cache" / "mcit"))


def train_tokenizer(out_dir: Path, vocab_size: int, corpus: list[str]) -> Path:
    """Train a sentencepiece BPE model (byte fallback, so nothing is ever <unk>) and return its path."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(corpus))
        text_path = f.name
    prefix = out_dir / "tokenizer"
    try:
        spm.SentencePieceTrainer.train(
            input=text_path, model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, character_coverage=1.0, split_digits=True, hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<image>", "<pad>"],
            num_threads=1, minloglevel=2,
        )
    finally:
        os.unlink(text_path)
    return prefix.with_suffix(".model")


def build_processor(out_dir: Path, spec: TinyLlavaSpec):
    """Tokenizer + image processor + chat template as a `LlavaProcessor`, saved to `out_dir`."""
    from transformers import CLIPImageProcessorPil, LlamaTokenizer, LlavaProcessor


    train_tokenizer(out_dir, spec.vocab_size, corpus())
    # from_pretrained converts the sentencepiece model (tokenizer.model in out_dir) into a fast tokenizer. No BOS:
    # the shipped base was pretrained on text without one (the Encoder adds what `tokenizer(text)` adds), so its
    # tokenizer must not add one at inference either; the asset's tokenizer.json says the same.
    tokenizer = LlamaTokenizer.from_pretrained(out_dir, pad_token="<pad>", add_bos_token=False, add_eos_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    # the PIL backend: the torchvision one would pull a second torch build for no gain at 48 px
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True, do_resize=True, resample=3,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return processor


def build_model(spec: TinyLlavaSpec, tokenizer, seed: int = 0):
    """A randomly initialised `LlavaForConditionalGeneration` with the tokenizer's vocabulary."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_heads,
        intermediate_size=spec.text_intermediate, max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        intermediate_size=spec.vision_intermediate, image_size=spec.image_size, patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    config = LlavaConfig(
        text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
        image_seq_length=spec.image_tokens,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def create_init(out_dir: Path, spec: TinyLlavaSpec | None = None, seed: int = 0, processor=None) -> Path:
    """Write a randomly initialised tiny LLaVA (weights + processor) to `out_dir`, atomically.

    `processor`: reuse an existing processor (its tokenizer sets the vocabulary) instead of training a new one."""
    spec = spec or TinyLlavaSpec()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    if processor is None:
        processor = build_processor(tmp, spec)
    else:
        processor.save_pretrained(tmp)
    model = build_model(spec, processor.tokenizer, seed)
    model.save_pretrained(tmp)
    (tmp / "PROVENANCE.json").write_text(json.dumps({"kind": "random-init", "seed": seed, "spec": asdict(spec)},
                                                    indent=2))
    if out_dir.exists():  # another process won the race; keep theirs
        import shutil

        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def resolve_builtin(name: str) -> Path:
    """Map a `builtin:` model name to a local directory, building a random-init variant on first use.

    Two shipped bases of two architectures, each with the random init its pretraining recipe starts from:
    `tiny-llava` (LLaVA-1.5: CLIP + MLP projector + Llama, fixed 36 image tokens) and `tiny-qwen2vl` (Qwen2-VL:
    dynamic-resolution ViT + patch merger + Qwen2 with multimodal RoPE; mcit.models.tiny_families.TinyQwen2VLSpec)."""
    from mcit.models.tiny_families import QWEN2VL_ASSET_DIR, create_tiny_qwen2vl_init

    key = name.removeprefix("builtin:")
    shipped = {"tiny-llava": (ASSET_DIR, "pretrain-tiny.yaml"),
               "tiny-qwen2vl": (QWEN2VL_ASSET_DIR, "pretrain-tiny-qwen2vl.yaml")}
    if key in shipped:
        folder, recipe = shipped[key]
        if not (folder / "config.json").exists():
            raise ModelError(
                f"the shipped base builtin:{key} is missing from {folder}; rebuild it with "
                f"`mcit train recipes/synthcit/{recipe}` and `mcit export RUN --full` into that folder")
        return folder
    if key == "tiny-llava-init":
        # the tokenizer is trained on SynthCIT's text, so a new generator version gets a new init; "-nobos": inits
        # cached before the tokenizer stopped adding BOS would train a base in another format than the shipped one
        path = cache_dir() / "models" / f"tiny-llava-init-v{VERSION}-nobos"
        if not (path / "config.json").exists():
            create_init(path)
        return path
    if key == "tiny-qwen2vl-init":
        path = cache_dir() / "models" / f"tiny-qwen2vl-init-v{VERSION}"  # the BPE is trained on SynthCIT's text too
        if not (path / "config.json").exists():
            create_tiny_qwen2vl_init(path)
        return path
    raise ModelError(f"unknown builtin model {name!r}; expected builtin:tiny-llava, builtin:tiny-llava-init, "
                     "builtin:tiny-qwen2vl or builtin:tiny-qwen2vl-init")
