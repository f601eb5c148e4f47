"""Load a base multimodal model and its processor from a recipe's `model:` section.

The model's `config.model_type` picks its family (mcit.models.families: LLaVA-1.5, LLaVA-NeXT/OneVision, Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, InternVL, Idefics3/SmolVLM); the family's transformers class loads it. Everything downstream
talks to the HF model through the standard API (`model(**batch)`, `generate`, `save_pretrained`), and LoRA goes
through PEFT on the language model only.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mcit.config import ModelConfig
from mcit.errors import ModelError
from mcit.models.families import LM_LAYER, family_for_type, family_of
from mcit.models.tiny import resolve_builtin
from mcit.runtime.placement import compute_device, place_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}



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
    """The model's processor, as `AutoProcessor` loads it. Where that fails only because torchvision is missing (the
    processors of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL and SmolVLM carry a video processor, which
    transformers implements with torchvision alone), the same processor class is built without its video processor
    (`image_only_processor`): mcit feeds images and text only, so nothing it does changes."""
    from transformers import AutoProcessor

    path = path or resolve_path(cfg.name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                                  **cfg.processor)
    except OSError as exc:
        raise _offline_error(path, exc) from exc
    except (AttributeError, ImportError, ValueError, TypeError) as exc:
        if importlib.util.find_spec("torchvision") is not None:
            raise
        processor = image_only_processor(cfg, path, exc)
    _check_processor_settings(cfg, processor.image_processor)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    return processor


def _check_processor_settings(cfg: ModelConfig, image_processor) -> None:
    """`model.processor` keys must be settings of the image processor: from_pretrained drops unknown ones silently,
    and a misspelt `max_pixels` would leave every image at the checkpoint's resolution."""
    known = set(image_processor.to_dict())
    kwargs = getattr(image_processor, "valid_kwargs", None)  # a TypedDict of the settings it takes
    for attribute in ("__required_keys__", "__optional_keys__", "__annotations__"):
        known |= set(getattr(kwargs, attribute, ()))
    for key in cfg.processor:
        if key not in known:
            raise ModelError(f"model.processor.{key}: not a setting of {type(image_processor).__name__}; its settings "
                             f"include {', '.join(sorted(k for k in known if not k.startswith('_'))[:24])}")


def image_only_processor(cfg: ModelConfig, path: str, cause: Exception):
    """The model's processor class built from its tokenizer and image processor, its video processor left out (the
    class check that would demand one is skipped for it alone; its saved settings stand in for it, `SavedVideoSettings`).
    Settings of the processor itself (`processor_config.json`: image_seq_length, vision_feature_select_strategy ...) are
    passed on as saved."""
    import inspect

    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    options = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    saved: dict[str, Any] = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        file = Path(path) / name
        if file.is_file():
            saved = {**json.loads(file.read_text(encoding="utf-8")), **saved}
    model_type = AutoConfig.from_pretrained(path, **options).model_type
    class_name = saved.get("processor_class") or PROCESSOR_MAPPING_NAMES.get(model_type)
    base = getattr(transformers, str(class_name), None)
    if base is None or "video_processor" not in inspect.signature(base.__init__).parameters:
        raise ModelError(f"model.name_or_path: the processor of {path} cannot be loaded ({type(cause).__name__}: "
                         f"{cause})") from cause

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return base.check_argument_for_proper_class(self, argument_name, argument)

    def get_attributes(cls) -> list[str]:  # what save_pretrained writes: all but the absent video processor
        return [name for name in base.get_attributes() if name != "video_processor"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The processor as loaded, the video processor's saved settings carried over from the checkpoint it came
        from, so the folder loads again (with torchvision: the whole processor; without: this class again)."""
        out = base.save_pretrained(self, save_directory, *args, **kwargs)
        target = Path(save_directory) / "processor_config.json"
        source = Path(path) / "processor_config.json"
        if target.is_file() and source.is_file():
            video = json.loads(source.read_text(encoding="utf-8")).get("video_processor")
            if video is not None:
                saved = json.loads(target.read_text(encoding="utf-8"))
                saved["video_processor"] = video
                target.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in ("video_preprocessor_config.json",):
            if (Path(path) / name).is_file() and not (Path(save_directory) / name).exists():
                shutil.copy2(Path(path) / name, Path(save_directory) / name)
        return out

    video_file = Path(path) / "video_preprocessor_config.json"
    video = saved.get("video_processor") or (json.loads(video_file.read_text(encoding="utf-8"))
                                             if video_file.is_file() else {})
    image_only = type(base.__name__, (base,), {"check_argument_for_proper_class": check_argument_for_proper_class,
                                                "get_attributes": classmethod(get_attributes),
                                                "save_pretrained": save_pretrained,
                                                # a class attribute: never serialised as a setting of the processor
                                                "video_processor": SavedVideoSettings(**video),
                                                "__module__": base.__module__, "__doc__": base.__doc__})
    tokenizer = AutoTokenizer.from_pretrained(path, **options)
    template = Path(path) / "chat_template.jinja"
    chat_template = template.read_text(encoding="utf-8") if template.is_file() else tokenizer.chat_template
    accepted = inspect.signature(base.__init__).parameters
    extra = {k: v for k, v in saved.items() if k in accepted and k not in
             ("image_processor", "tokenizer", "video_processor", "chat_template")}
    return image_only(image_processor=AutoImageProcessor.from_pretrained(path, **options, **cfg.processor),
                      tokenizer=tokenizer, video_processor=None, chat_template=chat_template, **extra)


class SavedVideoSettings(SimpleNamespace):
    """The saved settings of a video processor that was not built, readable as attributes (a setting not saved reads
    as None, as an unset one does on a built processor). Some processors read them outside any video call: SmolVLM's
    `apply_chat_template` passes its video processor's `num_frames` and `fps` on even when rendering text alone."""

    def __getattr__(self, name: str) -> None:
        if name.startswith("_"):
            raise AttributeError(name)
        return None


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
    family = family_for_type(hf_config.model_type, f"model.name_or_path: {path}")
    model_cls = getattr(transformers, family.model_class, None)
    if model_cls is None:
        raise ModelError(f"model.name_or_path: {path} is a {family.name} model, but the installed transformers "
                         f"{transformers.__version__} has no {family.model_class}; upgrade transformers")
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
    return family_of(model).language_model


def lora_target_regex(model, target_modules: list[str]) -> str:
    """A PEFT `target_modules` regex matching the named linear layers of the language model only.

    PEFT's `all-linear` would also wrap the vision tower and the projector; LLaVA-style MCIT methods adapt only the
    LLM. The regex is matched against full module names (e.g. `model.language_model.layers.3.self_attn.q_proj`).
    A list that matches no linear layer of the language model is refused, naming the layers there are.
    """
    prefix = language_model_prefix(model).replace(".", r"\.")
    names = "|".join(sorted(set(target_modules)))
    regex = rf"^(?:base_model\.model\.)?{prefix}\.layers\.\d+\..*\b(?:{names})$"
    pattern = re.compile(regex)
    in_layers = [(name, module) for name, module in model.named_modules() if LM_LAYER.search(name + ".")]
    if in_layers and not any(pattern.match(name) for name, _ in in_layers):
        # the linear layers a user can name (PEFT's own sub-modules of an already adapted layer left out)
        leaves = sorted({name.rsplit(".", 1)[-1] for name, module in in_layers
                         if isinstance(module, torch.nn.Linear) and ".lora_" not in name
                         and not name.endswith(".base_layer")})
        raise ModelError(f"method.lora.target_modules {sorted(set(target_modules))} match no linear layer of the "
                         f"{family_of(model).name} language model ({language_model_prefix(model)}.layers.N.*); "
                         f"its linear layers are: {', '.join(leaves)}")
    return regex


def trainable_summary(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable}


def set_trainable_extras(model, cfg: ModelConfig) -> None:
    """Unfreeze the projector / vision tower / whole language model as the recipe asks."""
    family = family_of(model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if cfg.train_projector:
        family.part(inner, "projector").requires_grad_(True)
    if cfg.train_vision:
        family.part(inner, "vision_tower").requires_grad_(True)
    if cfg.full_finetune:
        family.part(inner, "language_model").requires_grad_(True)
        inner.get_output_embeddings().requires_grad_(True)
