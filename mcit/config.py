"""Recipes: one YAML file names the base model, the benchmark (a data card), the method and the training settings.

```yaml
extends: ../base.yaml            # optional; deep-merged, this file wins
name: quickstart
output_dir: runs/quickstart
model: {name_or_path: builtin:tiny-llava}
benchmark: {card: synthcit-mini}
method: {name: lora_ft, lora: {r: 8}}
train: {lr: 2.0e-4, epochs: 1}
```

Every key is checked at load: an unknown key names itself and the closest valid key, a wrong type names its dotted
path and the expected type. `mcit train r.yaml train.lr=1e-4 output_dir=/tmp/x` overrides any key. Method-specific
keys in `method:` are checked by the method's own options dataclass when the method is built.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from mcit.errors import RecipeError
from mcit.runtime.files import write_text_atomic
from mcit.schema import from_mapping, suggest, to_mapping

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny-llava"
    """An HF model id, a local directory, or a shipped tiny base: `builtin:tiny-llava`, `builtin:tiny-qwen2vl` (and
    their random inits `builtin:tiny-llava-init`, `builtin:tiny-qwen2vl-init`)."""
    revision: str | None = None
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Storage dtype of the base weights (bf16 halves memory on GPU; on CPU keep fp32 and use autocast)."""
    autocast: Literal["bf16", "fp16"] | None = "bf16"
    """Compute dtype of matmuls; bf16 autocast is ~4x faster than fp32 on recent CPUs."""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 when importable on CUDA, else sdpa) | sdpa | eager | flash_attention_2."""
    load_in_4bit: bool = False
    """QLoRA: 4-bit NF4 base weights through bitsandbytes (CUDA only)."""
    trust_remote_code: bool = False
    train_projector: bool = False
    train_vision: bool = False
    full_finetune: bool = False
    """Train every language-model weight instead of adapters (used to pretrain the tiny base)."""
    gradient_checkpointing: bool = False
    processor: dict[str, Any] = field(default_factory=dict)
    """Settings of the model's image processor, applied on top of the checkpoint's own (e.g. Qwen2-VL's
    `{max_pixels: 262144}`, which bounds how many image tokens one image becomes)."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Linear layer names inside the language model only (the vision tower and projector are never wrapped)."""
    dropout_masks: str = "bernoulli"
    """How LoRA dropout draws its masks: `bernoulli` (PEFT's `nn.Dropout`, one generator draw per element) or `packed`
    (the same inverted dropout, 16 random bits per element taken from 64-bit draws: a quarter of the draws, p rounded
    to a multiple of 1/65536; 2.2x cheaper fwd+bwd on a CPU, docs/BENCHMARKS.md). Both are Bernoulli masks; the
    random streams differ, so a seeded run's numbers change with the setting."""


@dataclass
class ASDConfig:
    enabled: bool = False
    fraction: float = 0.2
    """Share of each task's training samples converted to another answer style (SEFE: 20 %)."""
    styles: list[str] = field(default_factory=lambda: ["yesno", "mc", "brief", "detailed"])
    KEYWORDS: ClassVar[tuple[str, ...]] = ("meta", "template")
    rewriter: str = "meta"
    """Where brief/detailed answers come from when a sample has no meta["brief"/"detailed"]: `meta` (nowhere: those
    picks keep their original style, so on real data only about half the fraction is converted), `template` (built
    from the sample's own question and answer; every asked conversion happens), or the path of a local causal-LM
    folder (generated once per run, cached in <run>/asd/rewrites.jsonl). See mcit/data/asd.py."""


@dataclass
class BenchmarkConfig:
    card: str = "synthcit-mini"
    """A data card name (a shipped card, `mcit/assets/data_cards/<name>.yaml`) or a path."""
    tasks: list[str] | None = None
    """A subset / order of the card's tasks (default: all, in card order)."""
    root: str | None = None
    """Override the card's data root."""
    layout: str | None = None
    """The card's release layout to use (e.g. `hide-llava` for UCIT); unset: detected from the files under the root."""
    max_train: int | None = None
    max_test: int | None = None
    skip_invalid: bool = False
    """Train on the valid samples of a card with problems (reporting how many were skipped) instead of refusing."""
    pad_to_square: bool = False
    """Pad every image to a square with the processor's mean colour before preprocessing, as LLaVA-1.5 was trained
    (`image_aspect_ratio: pad`), instead of the processor's centre crop. Box answers follow (mcit/data/boxes.py)."""
    image_cache_mb: int = 2048
    """Host memory (MiB) per process for preprocessed images kept between batches, least recently used dropped first
    (0: none kept). A 336-px image takes 1.3 MiB, so the default keeps ~1,500 of them."""
    vision_feature_cache_mb: int = 2048
    """Host memory (MiB) per process for the frozen vision tower's features of evaluated images, kept across the
    checkpoints of a run so each test image goes through the tower once (0: off). LLaVA-1.5-7B: 1.1 MiB an image in
    bf16. Used only where it cannot change an answer (mcit/models/vision_cache.py)."""
    asd: ASDConfig = field(default_factory=ASDConfig)


@dataclass
class MethodConfig:
    name: str = "lora_ft"
    lora: LoraConfig = field(default_factory=LoraConfig)
    options: dict[str, Any] = field(default_factory=dict)
    """Method-specific keys (written directly under `method:` in YAML)."""


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None
    """Optimizer steps per task (overrides epochs)."""
    batch_size: int = 16
    """Per-process micro-batch."""
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    max_length: int | None = None
    """Tokens per sample, image placeholders included; longer samples are cut. Default: the model's image tokens +
    512 (LLaVA-1.5 at 336 px: 576 + 512)."""
    group_by_length: bool = True
    save_steps: int = 50
    """Write a resumable step checkpoint every this many optimizer steps (0: only at task ends)."""
    log_steps: int = 10
    deepspeed: str | None = None
    """zero2 | zero3 | zero3_offload or a DeepSpeed JSON path; used when launched with `deepspeed`."""


@dataclass
class EvalConfig:
    batch_size: int = 64
    max_new_tokens: int = 48
    constrained: bool = True
    """Also rank each closed task's valid answers by likelihood (knowledge independent of format)."""
    zero_shot: bool = True
    max_test: int | None = None


@dataclass
class Recipe:
    output_dir: str
    name: str = "recipe"
    description: str = ""
    seed: int = 0
    license: str | None = None
    """License id for exported model cards (e.g. llama2, apache-2.0); `mcit export` writes `other` when unset."""
    model: ModelConfig = field(default_factory=ModelConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str | None = None
    """The recipe file (set by the loader)."""

    def to_dict(self) -> dict:
        data = to_mapping(self)
        method = data["method"]
        data["method"] = {"name": method["name"], "lora": method["lora"], **method["options"]}
        return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_extended_yaml(path: Path, what: str = "recipe") -> dict:
    """A YAML mapping with its `extends:` chain deep-merged (the file wins over what it extends); `what` names the
    kind of file in error messages (recipes and evaluation suites share the mechanism)."""
    return _read_yaml(path, what=what)


def _read_yaml(path: Path, chain: tuple[Path, ...] = (), what: str = "recipe") -> dict:
    if not path.is_file():
        where = f" (extended from {chain[-1]})" if chain else ""
        raise RecipeError(f"{what} file not found: {path}{where}")
    if path in chain:
        raise RecipeError(f"{path}: `extends` loops back: {' -> '.join(map(str, chain + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{line} invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} is a mapping of keys, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected a path (string), got {parent!r}")
    base = _read_yaml((path.parent / parent).resolve(), chain + (path,), what)
    return _deep_merge(base, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected dotted.key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key, {}), dict):
                raise RecipeError(f"override {text!r}: {key} is not a section")
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return data


def _fix_floats(node: Any) -> Any:
    # PyYAML (YAML 1.1) parses `1e-4` as a string; every recipe author means a number.
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str):
        try:
            if node.strip() and node.strip()[0] in "+-.0123456789" and "e" in node.lower():
                return float(node)
        except ValueError:
            return node
    return node


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of keys, got {type(data).__name__}")
    data = _fix_floats(copy.deepcopy(data))
    if "output_dir" not in data:
        raise RecipeError(f"{where}: output_dir: required key is missing (the run folder, e.g. runs/my-run; "
                          "set it in the recipe or as output_dir=PATH on the command line)")
    method = data.get("method")
    if isinstance(method, dict):
        fixed = {k: method[k] for k in ("name", "lora") if k in method}
        fixed["options"] = {k: v for k, v in method.items() if k not in ("name", "lora")}
        data["method"] = fixed
    recipe = from_mapping(Recipe, data, where=where, error=RecipeError)
    _check_values(recipe, where)
    return recipe


def _check_values(recipe: Recipe, where: str) -> None:
    # A model folder is written as a path ('./my-llm', '/models/x'), so a mistyped keyword is refused here, before a
    # run folder is claimed with it; whether the folder exists is checked where it is used (mcit.data.asd).
    rewriter = recipe.benchmark.asd.rewriter.strip()
    rewriter_ok = rewriter in ASDConfig.KEYWORDS or "/" in rewriter or os.sep in rewriter or (
        bool(rewriter) and Path(rewriter).is_dir())
    checks = [
        ("train.batch_size", recipe.train.batch_size >= 1, "a positive integer"),
        ("train.grad_accum", recipe.train.grad_accum >= 1, "a positive integer"),
        ("train.lr", recipe.train.lr > 0, "a positive number"),
        ("train.epochs", recipe.train.epochs > 0, "a positive number"),
        ("train.warmup_ratio", 0 <= recipe.train.warmup_ratio < 1, "a number in [0, 1)"),
        ("train.max_length", recipe.train.max_length is None or recipe.train.max_length >= 16,
         "an integer >= 16, or null for the model's image tokens + 512"),
        ("method.lora.r", recipe.method.lora.r >= 1, "a positive integer"),
        ("method.lora.dropout", 0 <= recipe.method.lora.dropout < 1, "a number in [0, 1)"),
        ("method.lora.dropout_masks", recipe.method.lora.dropout_masks in ("bernoulli", "packed"),
         f"bernoulli or packed, got {recipe.method.lora.dropout_masks!r}"),
        ("benchmark.asd.fraction", 0 <= recipe.benchmark.asd.fraction <= 1, "a number in [0, 1]"),
        ("benchmark.asd.rewriter", rewriter_ok, "meta, template or the path of a local causal-LM folder (e.g. "
         f"./my-llm), got {rewriter!r}{suggest(rewriter, ASDConfig.KEYWORDS)}"),
        ("benchmark.image_cache_mb", recipe.benchmark.image_cache_mb >= 0, "an integer >= 0 (MiB; 0 keeps no images)"),
        ("benchmark.vision_feature_cache_mb", recipe.benchmark.vision_feature_cache_mb >= 0,
         "an integer >= 0 (MiB; 0 turns the vision feature cache off)"),
        ("eval.batch_size", recipe.eval.batch_size >= 1, "a positive integer"),
    ]
    if recipe.train.max_steps is not None:
        checks.append(("train.max_steps", recipe.train.max_steps >= 1, "a positive integer"))
    for key, ok, expected in checks:
        if not ok:
            raise RecipeError(f"{where}: {key}: expected {expected}")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, *, settings_only: bool = False) -> Recipe:
    """Read a recipe file (following `extends`), apply `dotted.key=value` overrides, validate.

    ``settings_only``: the recipe only supplies model/eval settings (``mcit eval``, ``mcit analyze``), so a missing
    ``output_dir`` is fine (a base recipe such as ``recipes/synthcit/base.yaml`` works).
    """
    path = Path(path).expanduser().resolve()
    data = apply_overrides(_read_yaml(path), overrides or [])
    if settings_only and isinstance(data, dict):
        data.setdefault("output_dir", ".")
    recipe = recipe_from_dict(data, where=str(path))
    recipe.source = str(path)
    card = recipe.benchmark.card
    if card.endswith((".yaml", ".yml")) and not Path(card).is_absolute() and not Path(card).exists():
        beside = path.parent / card
        if beside.exists():
            recipe.benchmark.card = str(beside)
    return recipe


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe atomically (a temporary file renamed into place): a reader never sees half of it."""
    data = recipe.to_dict()
    data.pop("source", None)
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
