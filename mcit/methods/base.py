"""The method plug-in interface: the runner owns the loop, a method owns only its hooks.

A method is one module with a `Method` subclass and an `Options` dataclass for its recipe keys (written directly
under `method:`). Built-in methods register by name with `@register("name")`; a method from another package is named
in a recipe as `method.name: mypackage.module:MyMethod` or registered under the entry-point group `mcit.methods`.
For a run of T tasks the runner calls:

    model = method.attach(model, ctx)                      # once: stores ctx, then setup(model) wraps the model
    for stage, task_ids in enumerate(method.schedule(T)):
        method.prepare(model, stage, task_ids)             # structure for this stage (add/select adapters)
        method.before_task(model, stage, task_ids, data)   # data-dependent preparation
        samples = method.train_samples(stage, task_ids, data)   # what to train on (replay / joint mix here)
        settings = method.stage_training(stage, task_ids)  # this stage's `train:` overrides (default: none)
        ... training: param_groups(model, train); loss = CE + method.extra_loss(model, batch, outputs) ...
        method.after_task(model, stage, task_ids, data)    # prototypes, merges, buffers
        checkpoint: method.state_tensors(model), method.method_tensors(), method.state()   (safetensors + JSON)
        evaluation: for each (context, indices) in method.eval_groups(model, samples): generate under context

`prepare` must be deterministic given the method's saved state, because resuming a run replays `prepare` for every
finished stage to rebuild the model's structure before loading the saved tensors.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch

from mcit.config import Recipe, TrainConfig
from mcit.data.records import Sample
from mcit.errors import RecipeError
from mcit.models.families import family_of
from mcit.schema import from_mapping, suggest

ENTRY_POINT_GROUP = "mcit.methods"
_REGISTRY: dict[str, type[Method]] = {}


@dataclass
class TaskData:
    """The tasks of a run: names, training and test samples (after validation and ASD)."""

    names: list[str]
    train: dict[str, list[Sample]]
    test: dict[str, list[Sample]]


@dataclass
class RunContext:
    """What a method may need beyond the model: the processor, the recipe, the data, the run folder (None when a
    checkpoint is rebuilt outside its run)."""

    processor: Any
    recipe: Recipe
    data: TaskData
    output_dir: Any = None


@dataclass
class NoOptions:
    """This method takes no options beyond `lora`."""


def register(name: str):
    """Class decorator: make a Method subclass available to recipes as `method.name: <name>`."""
    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    """Import every module of this package once: each built-in method registers itself on import."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name != "base":
            importlib.import_module(f"{__package__}.{info.name}")


def _load_external(spec: str) -> type[Method]:
    """`package.module:ClassName` -> the class, which must subclass Method."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(f"method.name: cannot import {module_name!r} for {spec!r} ({exc})") from exc
    cls = getattr(module, attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise RecipeError(f"method.name: {spec!r} is not a subclass of mcit.methods.base.Method")
    if cls.name == Method.name:
        cls.name = spec
    return cls


def _entry_point(name: str) -> type[Method] | None:
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name == name:
            return _load_external(point.value)
    return None


def method_class(name: str) -> type[Method]:
    """The Method class a recipe's `method.name` names: a built-in, an `mcit.methods` entry point, or
    `package.module:ClassName`."""
    if ":" in name:
        return _load_external(name)
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    found = _entry_point(name)
    if found is not None:
        return found
    raise RecipeError(f"method.name: unknown method {name!r}{suggest(name, _REGISTRY)}; "
                      f"available: {', '.join(sorted(_REGISTRY))} (or package.module:ClassName)")


def build_method(recipe: Recipe) -> Method:
    """Instantiate the recipe's method, validating its options (unknown key / wrong type -> RecipeError)."""
    cls = method_class(recipe.method.name)
    options = from_mapping(cls.Options, recipe.method.options, path="method",
                           where=recipe.source or "recipe", error=RecipeError)
    return cls(recipe, options)


class Method:
    """The interface every method implements; the defaults are the neutral choice of each hook."""

    name: ClassVar[str] = "base"
    Options: ClassVar[type] = NoOptions

    def __init__(self, recipe: Recipe, options: Any):
        self.recipe = recipe
        self.options = options
        self.ctx: RunContext | None = None

    # --- structure -------------------------------------------------------------------------------------------------
    def attach(self, model, ctx: RunContext):
        """Called once by whoever builds the run: keep `ctx` for the hooks, then `setup` the model."""
        self.ctx = ctx
        return self.setup(model)

    def setup(self, model):
        """Wrap the base model once (add adapters, gates...) and return it."""
        raise NotImplementedError(f"{type(self).__name__} must implement setup(model)")

    def schedule(self, num_tasks: int) -> list[list[int]]:
        """Task indices trained at each stage: one task per stage by default."""
        return [[t] for t in range(num_tasks)]

    def prepare(self, model, stage: int, task_ids: Sequence[int]) -> None:
        """Make the parameters of this stage trainable (deterministic; replayed on resume)."""

    # --- data and training -----------------------------------------------------------------------------------------
    def before_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        pass

    def train_samples(self, stage: int, task_ids: Sequence[int], data: TaskData) -> list[Sample]:
        return [s for t in task_ids for s in data.train[data.names[t]]]

    def stage_training(self, stage: int, task_ids: Sequence[int]) -> dict[str, Any]:
        """Overrides of the recipe's `train:` keys for this stage (e.g. a router stage's own lr and epochs)."""
        return {}

    def param_groups(self, model, train: TrainConfig) -> list[dict]:
        """Optimizer groups for a stage trained with `train`; the projector gets lr/10 when trained (LLaVA's
        reference)."""
        family = family_of(model)
        main, projector = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (projector if family.contains(name, "projector") else main).append(param)
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
        family = family_of(model)
        parts = [part for part, on in (("projector", self.recipe.model.train_projector),
                                       ("vision_tower", self.recipe.model.train_vision)) if on]
        return {k: v for k, v in model.state_dict().items()
                if "lora_" in k or "mcit_" in k or any(family.contains(k, part) for part in parts)}

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


class Checkpoint(Method):
    """A model loaded as it is (a PEFT adapter folder or a full model): nothing to set up, nothing routed."""

    name = "checkpoint"

    def setup(self, model):
        return model
