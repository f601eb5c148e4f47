"""Load a base multimodal model and its processor from a recipe's `model:` section.

One function per model family keeps a new family (Qwen2-VL, ...) to one small addition: `FAMILIES` maps a config
`model_type` to the class that builds it. Everything downstream talks to the HF model through the standard API
(`model(**batch)`, `generate`, `save_pretrained`), and LoRA goes through PEFT on the language model only.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import torch

from mcit.config import ModelConfig
from mcit.errors import ModelError
from mcit.models.tiny import resolve_builtin
from mcit.runtime.placement import compute_device, place_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# model_type -> (transformers class name, module path prefix of the language model inside it)
FAMILIES: dict[str, tuple[str, str]] = {
    "llava": ("LlavaForConditionalGeneration", "model.language_model"),
}


def resolve_path(name_or_path: str) -> str:
    """A local directory for builtin models, a checked local path, or the hub id unchanged."""
    if name_or_path.startswith("builtin:"):
        return str(resolve_builtin(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name_or_path: {path} exists but holds no config.json (expected a directory "
                             "written by save_pretrained)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise ModelError(f"model.name_or_path: local model directory {path} not found")
    return name_or_path


def attn_implementation(requested: str, device: torch.device | None = None) -> str:
    """The attention kernel for a model computing on `device` (default: this process's compute device)."""
    on_gpu = (device or compute_device()).type == "cuda"
    if requested != "auto":
        if requested == "flash_attention_2":
            if not on_gpu:
                raise ModelError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; none is visible "
                                 "(use auto or sdpa)")
            if importlib.util.find_spec("flash_attn") is None:
                raise ModelError("model.attn_implementation: flash_attention_2 requested but flash-attn is not "
                                 "installed (pip install 'mcit[gpu]', or use auto / sdpa)")
        return requested
    if on_gpu and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def quantization_config(cfg: ModelConfig, device: torch.device | None = None):
    if not cfg.load_in_4bit:
        return None
    if (device or compute_device()).type != "cuda":
        raise ModelError("model.load_in_4bit: 4-bit QLoRA runs on CUDA GPUs only (bitsandbytes); this machine has "
                         "none. Set model.load_in_4bit=false.")
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ModelError("model.load_in_4bit: 4-bit base weights cannot be sharded by ZeRO-3; use train.deepspeed: "
                         "zero2 (each GPU holds the 4-bit base) or load_in_4bit: false")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("model.load_in_4bit: bitsandbytes is not installed (pip install 'mcit[gpu]')")
    from transformers import BitsAndBytesConfig

    compute = DTYPES["bf16" if cfg.dtype == "fp32" else cfg.dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def _offline_error(name: str, exc: Exception) -> ModelError:
    return ModelError(
        f"model.name_or_path: could not find {name!r} locally or in the Hugging Face cache, and the hub is not "
        f"reachable ({type(exc).__name__}). Download it where you have internet (huggingface-cli download {name}) "
        "and set model.name_or_path to that local directory, or use builtin:tiny-llava.")


def load_processor(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoProcessor

    path = path or resolve_path(cfg.name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise _offline_error(path, exc) from exc
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    return processor


def load_base(cfg: ModelConfig, path: str | None = None) -> tuple[Any, Any]:
    """(model, processor) with the base weights frozen, on this process's compute device (`cuda:LOCAL_RANK`, the
    current GPU, or the CPU; under ZeRO-3 DeepSpeed places the shards). `path` overrides `cfg.name_or_path` (a
    merged checkpoint)."""
    import transformers
    from transformers import AutoConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    path = path or resolve_path(cfg.name_or_path)
    try:
        hf_config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise _offline_error(path, exc) from exc
    family = FAMILIES.get(hf_config.model_type)
    if family is None:
        raise ModelError(f"model.name_or_path: {path} is a {hf_config.model_type!r} model; supported families: "
                         f"{', '.join(FAMILIES)} (add one in mcit/models/loading.py FAMILIES)")
    model_cls = getattr(transformers, family[0])
    device = compute_device()
    kwargs: dict[str, Any] = {
        "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
        "dtype": DTYPES[cfg.dtype], "attn_implementation": attn_implementation(cfg.attn_implementation, device),
    }
    quant = quantization_config(cfg, device)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device.type == "cuda" and torch.cuda.is_available() and not is_deepspeed_zero3_enabled():
        kwargs["device_map"] = {"": device.index}  # weights load straight onto the GPU, not through host memory
    model = model_cls.from_pretrained(path, **kwargs)
    model = place_model(model, device)
    processor = load_processor(cfg, path)
    model.requires_grad_(False)
    if quant is not None:  # QLoRA: PEFT's k-bit preparation (fp32 norms, input grads for checkpointing)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, processor


LM_LAYER = re.compile(
    rf"(?:{'|'.join(sorted({re.escape(prefix.rsplit('.', 1)[-1]) for _, prefix in FAMILIES.values()}))})"
    r"\.(?:model\.)?layers\.(\d+)\.")
"""A module or parameter name inside decoder layer N of a family's language model (group 1: N)."""


def lm_layer_index(name: str) -> int | None:
    """The language-model decoder layer a module or parameter name lies in (0-based), else None."""
    match = LM_LAYER.search(name)
    return int(match.group(1)) if match else None


def num_lm_layers(model) -> int:
    """Decoder layers of the language model (from the text config of a multimodal config)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", config)
    return int(text.num_hidden_layers)


def language_model_prefix(model) -> str:
    family = FAMILIES.get(getattr(model.config, "model_type", ""), FAMILIES["llava"])
    return family[1]


def lora_target_regex(model, target_modules: list[str]) -> str:
    """A PEFT `target_modules` regex matching the named linear layers of the language model only.

    PEFT's `all-linear` would also wrap the vision tower and the projector; LLaVA-style MCIT methods adapt only the
    LLM. The regex is matched against full module names (e.g. `model.language_model.layers.3.self_attn.q_proj`).
    """
    prefix = language_model_prefix(model).replace(".", r"\.")
    names = "|".join(sorted(set(target_modules)))
    return rf"^(?:base_model\.model\.)?{prefix}\.layers\.\d+\..*\b(?:{names})$"


def trainable_summary(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable}


def set_trainable_extras(model, cfg: ModelConfig) -> None:
    """Unfreeze the projector / vision tower / whole language model as the recipe asks."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if cfg.train_projector:
        inner.model.multi_modal_projector.requires_grad_(True)
    if cfg.train_vision:
        inner.model.vision_tower.requires_grad_(True)
    if cfg.full_finetune:
        inner.model.language_model.requires_grad_(True)
        inner.lm_head.requires_grad_(True)
