"""The method plug-in interface: the runner owns the loop, a method owns only its hooks.

A method is one file in `mcit/methods/` with a `Method` subclass registered by name and an `Options` dataclass for
its recipe keys (written directly under `method:`). The runner calls, for a run of T tasks:

    model = method.setup(model, ctx)                      # once: wrap the base model (PEFT etc.)
    for stage, task_ids in enumerate(method.schedule(T)):
        method.prepare(model, stage, task_ids)             # structure for this stage (add/select adapters)
        method.before_task(model, stage, data)             # data-dependent preparation
        samples = method.train_samples(stage, data)        # what to train on (replay / joint mix here)
        ... training: loss = CE + method.extra_loss(model, batch, outputs) ...
        method.after_task(model, stage, data)              # prototypes, merges, buffers
        checkpoint: method.state_tensors(model), method.state()   (safetensors + JSON)
        evaluation: for each (context, indices) in method.eval_groups(model, samples): generate under context

`prepare` must be deterministic given the method's saved state, because resuming a run replays `prepare` for every
finished stage to rebuild the model's structure before loading the saved tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mcit.config import Recipe
from mcit.data.records import Sample
from mcit.errors import RecipeError
from mcit.schema import from_mapping

_REGISTRY: dict[str, type[Method]] = {}


@dataclass
class TaskData:
    """The tasks of a run: names, training and test samples (after validation and ASD)."""

    names: list[str]
    train: dict[str, list[Sample]]
    test: dict[str, list[Sample]]


@dataclass
class RunContext:
    """What `setup` may need beyond the model: the processor, the recipe, the data, the run folder."""

    processor: Any
    recipe: Recipe
    data: TaskData
    output_dir: Any = None
    encode: Any = None
    """Callable (samples) -> iterator of model batches, for methods that collect features (prototypes, CKA)."""
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoOptions:
    """This method takes no options beyond `lora`."""


def register(name: str):
    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def _load_all() -> None:
    import importlib
    import pkgutil

    import mcit.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base":
            importlib.import_module(f"mcit.methods.{info.name}")


def method_class(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        from mcit.schema import suggest

        raise RecipeError(f"method.name: unknown method {name!r}{suggest(name, _REGISTRY)}; "
                          f"available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_method(recipe: Recipe) -> Method:
    """Instantiate the recipe's method, validating its options (unknown key / wrong type -> RecipeError)."""
    cls = method_class(recipe.method.name)
    options = from_mapping(cls.Options, recipe.method.options, path="method",
                           where=recipe.source or "recipe", error=RecipeError)
    return cls(recipe, options)


class Method:
    """Base class: one PEFT LoRA over the language model, trained on each task in turn (no protection)."""

    name: ClassVar[str] = "base"
    Options: ClassVar[type] = NoOptions
    uses_lora: ClassVar[bool] = True

    def __init__(self, recipe: Recipe, options: Any):
        self.recipe = recipe
        self.options = options

    # --- structure -------------------------------------------------------------------------------------------------
    def schedule(self, num_tasks: int) -> list[list[int]]:
        """Task indices trained at each stage: one task per stage by default."""
        return [[t] for t in range(num_tasks)]

    def setup(self, model, ctx: RunContext):
        """Wrap the base model once; default: a PEFT LoRA named 'default' on the language model's linears."""
        from mcit.models.loading import set_trainable_extras

        self.ctx = ctx
        if not self.uses_lora or self.recipe.model.full_finetune:
            set_trainable_extras(model, self.recipe.model)
            return model
        return add_lora(model, self.recipe, "default")

    def prepare(self, model, stage: int, task_ids: Sequence[int]) -> None:
        """Make the parameters of this stage trainable (deterministic; replayed on resume)."""
        set_lora_trainable(model, {"default"})

    # --- data and training -----------------------------------------------------------------------------------------
    def before_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        pass

    def train_samples(self, stage: int, task_ids: Sequence[int], data: TaskData) -> list[Sample]:
        return [s for t in task_ids for s in data.train[data.names[t]]]

    def param_groups(self, model) -> list[dict]:
        """Optimizer groups; the projector gets its own lr when trained (LLaVA's reference uses lr/10)."""
        train = self.recipe.train
        main, projector = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (projector if "multi_modal_projector" in name else main).append(param)
        groups = [{"params": main, "lr": train.lr, "weight_decay": train.weight_decay}]
        if projector:
            groups.append({"params": projector, "lr": train.lr * 0.1, "weight_decay": train.weight_decay})
        return [g for g in groups if g["params"]]

    def extra_loss(self, model, batch: dict, outputs) -> torch.Tensor | None:
        """A regularizer added to the cross-entropy (O-LoRA, RegLoRA, MoE balance...)."""
        return None

    def after_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        pass

    # --- state -----------------------------------------------------------------------------------------------------
    def state_tensors(self, model) -> dict[str, torch.Tensor]:
        """Model tensors the checkpoint must hold: adapters, trained extras (or everything for a full fine-tune)."""
        if self.recipe.model.full_finetune:
            return {k: v for k, v in model.state_dict().items()}
        keep = ("lora_", "multi_modal_projector" if self.recipe.model.train_projector else "\0",
                "vision_tower" if self.recipe.model.train_vision else "\0", "mcit_")
        return {k: v for k, v in model.state_dict().items() if any(part in k for part in keep)}

    def state(self) -> dict[str, Any]:
        """JSON-serialisable method state (router statistics, chosen layers...)."""
        return {}

    def method_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that belong to the method rather than the model (prototypes, replay ids...)."""
        return {}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        pass

    # --- inference -------------------------------------------------------------------------------------------------
    def eval_groups(self, model, samples: Sequence[Sample]) -> Iterator[tuple[contextlib.AbstractContextManager,
                                                                             list[int]]]:
        """Partition evaluation samples into groups run under a context (e.g. the routed expert active)."""
        yield contextlib.nullcontext(), list(range(len(samples)))

    def routing_report(self) -> dict[str, Any] | None:
        """Router accuracy/confusion of the last evaluation, for methods that route."""
        return None


# --- PEFT helpers shared by the LoRA methods ------------------------------------------------------------------------

def lora_config(model, recipe: Recipe, r: int | None = None, alpha: int | None = None):
    from peft import LoraConfig

    from mcit.models.loading import lora_target_regex

    lora = recipe.lora if hasattr(recipe, "lora") else recipe.method.lora
    return LoraConfig(r=r or lora.r, lora_alpha=alpha or lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora_target_regex(model, lora.target_modules), bias="none")


def add_lora(model, recipe: Recipe, adapter: str, r: int | None = None, alpha: int | None = None):
    """Add a LoRA adapter to (a PEFT-wrapped) `model`; the first call wraps the model with PEFT."""
    from peft import PeftModel, get_peft_model

    from mcit.models.loading import set_trainable_extras

    if isinstance(model, PeftModel):
        model.add_adapter(adapter, lora_config(model.get_base_model(), recipe, r, alpha))
        return model
    peft_model = get_peft_model(model, lora_config(model, recipe, r, alpha), adapter_name=adapter)
    set_trainable_extras(peft_model, recipe.model)
    return peft_model


def set_lora_trainable(model, trainable: set[str]) -> None:
    """requires_grad on exactly the LoRA weights of the named adapters (plus recipe extras left as they are)."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(any(f".{a}." in name or name.endswith(f".{a}") for a in trainable))


def options_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
