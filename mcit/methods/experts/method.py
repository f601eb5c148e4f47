"""The shared skeleton of expert methods (HiDe-LLaVA, DISCO): one PEFT adapter per expert, the current stage trains
its expert only, a router strategy mixes the experts per sample at inference."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from mcit.data.records import Sample
from mcit.methods.base import Method, TaskData
from mcit.methods.experts.bank import ExpertBank
from mcit.methods.experts.rows import RoutedContext, SampleRouting
from mcit.methods.lora import add_lora, set_lora_trainable
from mcit.routing.prototypes import check_router_options
from mcit.routing.router import PrototypeRouter
from mcit.runtime import dist
from mcit.runtime.zero import full_shape


class ExpertMethod(Method):
    """One PEFT adapter per expert; the current stage trains its expert only; a prototype router mixes at inference.

    Subclasses decide which expert a stage trains (`_expert_for_stage`) and which layers are fused
    (`_fused_layers`). Structure is rebuilt from saved state in `load_state` (missing adapters are added), so a
    checkpoint loads even when `prepare` ran without data (standalone evaluation).
    """

    expert_prefix = "expert"

    def __init__(self, recipe, options):
        super().__init__(recipe, options)
        self.experts: list[str] = []
        """Adapter names of the experts, in creation order."""
        self.expert_tasks: dict[str, list[str]] = {}
        """Tasks each expert was trained on."""
        self.router = self.make_router()
        self.model = None
        self._bank: ExpertBank | None = None
        self._routes: dict[tuple[str, str], tuple[str, str | None]] = {}
        self._thumbnails: dict[str, torch.Tensor] = {}

    # --- structure -------------------------------------------------------------------------------------------------
    def expert_name(self, index: int) -> str:
        return f"{self.expert_prefix}{index}"

    def setup(self, model):
        model = add_lora(model, self.recipe, self.expert_name(0))
        self.model = model
        self._bank = ExpertBank(model)
        return model

    def _ensure_expert(self, model, name: str) -> None:
        if name not in model.peft_config:
            add_lora(model, self.recipe, name)
        if name not in self.experts:
            self.experts.append(name)
            self.experts.sort(key=lambda e: int(e[len(self.expert_prefix):]))
        self.expert_tasks.setdefault(name, [])

    def _activate(self, model, name: str) -> None:
        """Train `name` only: PEFT runs just this adapter (flat cost per task), others get no grad or optimizer."""
        model.set_adapter(name)
        set_lora_trainable(model, {name})
        if self._bank is not None:
            self._bank.invalidate()

    def trained_experts(self) -> list[str]:
        return [e for e in self.experts if self.expert_tasks.get(e)]

    def expert_of_task(self, task: str) -> str | None:
        for expert, tasks in self.expert_tasks.items():
            if task in tasks:
                return expert
        return None

    def _fused_layers(self, model) -> set[int]:
        return set()

    fusion: str = "sum_ba"

    # --- router ----------------------------------------------------------------------------------------------------
    def make_router(self) -> PrototypeRouter:
        """The routing strategy (see mcit.routing.router); a subclass may return another with the same duties (and
        checks its own options: this one checks `method.router` as prototype-router options)."""
        check_router_options(self.options.router, self.recipe)
        return PrototypeRouter(self.options.router, self.recipe.seed)

    @property
    def task_prototypes(self):
        return self.router.prototypes

    def observe_task(self, model, task: str, data: TaskData) -> None:
        """Let the router see the task's training samples before the task is trained."""
        self.router.observe(model, self.ctx.processor, task, data.train[task])

    def expert_prototypes(self, experts: Sequence[str]):
        return self.router.expert_prototypes(experts, self.expert_tasks)

    def route(self, model, samples: Sequence[Sample], experts: Sequence[str]) -> torch.Tensor:
        """(n, len(experts)) per-sample weights from the router."""
        return self.router.weights(model, self.ctx.processor, samples, experts, self.expert_tasks)

    # --- inference -------------------------------------------------------------------------------------------------
    def eval_groups(self, model, samples: Sequence[Sample]):
        experts = self.trained_experts()
        if not experts or not samples:
            yield contextlib.nullcontext(), list(range(len(samples)))
            return
        weights = self.route(model, samples, experts)
        top = weights.argmax(dim=1).tolist()
        for sample, e in zip(samples, top):
            self._routes[(sample.task, sample.id)] = (experts[e], self.expert_of_task(sample.task))
        routing = SampleRouting(self.ctx.processor, self.recipe.train.max_length, self._thumbnails)
        routing.register(samples, weights)
        labels = [f"{experts[e]}:{'+'.join(self.expert_tasks[experts[e]])}" for e in top]
        # One group: the per-sample weights reach every batch row, so samples routed to different experts share
        # batches (splitting by top expert would shrink the batches and multiply the generate calls).
        yield RoutedContext(self._bank, routing, model, experts, self._fused_layers(model), self.fusion,
                            labels), list(range(len(samples)))

    def routing_report(self) -> dict[str, Any] | None:
        """Router accuracy (%) over samples of trained tasks, and a true-task x routed-task confusion (counts); reset.

        A sample routed to an expert that holds its task (a reused DISCO slot holds several) counts as correct and
        lands on the diagonal; otherwise in the column of the routed expert's first task. `expert_confusion` keeps the
        raw true-task x expert counts.
        """
        self.router.reset()
        if dist.is_distributed():  # sharded evaluation: each rank routed its share of the samples
            for routes in dist.all_gather_objects(self._routes):
                self._routes.update(routes)
        if not self._routes:
            return None
        experts = self.trained_experts()
        tasks = list(self.ctx.data.names) if self.ctx.data.names else sorted({t for t, _ in self._routes})
        confusion = [[0] * len(tasks) for _ in tasks]
        by_expert = [[0] * len(experts) for _ in tasks]
        hits = total = 0
        for (task, _), (routed, true) in self._routes.items():
            if task not in tasks or routed not in experts:
                continue
            held = self.expert_tasks[routed]
            column = task if task in held else held[0]
            if column in tasks:
                confusion[tasks.index(task)][tasks.index(column)] += 1
            by_expert[tasks.index(task)][experts.index(routed)] += 1
            if true is not None:
                total += 1
                hits += routed == true
        self._routes = {}
        return {"accuracy": 100.0 * hits / total if total else None, "confusion": confusion, "tasks": tasks,
                "expert_confusion": by_expert,
                "experts": [f"{e}:{'+'.join(self.expert_tasks[e])}" for e in experts],
                "mode": self.options.router.mode}

    # --- state -----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        sizes: dict[str, int] = {}
        nbytes: dict[str, int] = {}
        if self.model is not None:
            for name, param in self.model.named_parameters():
                for e in self.experts:
                    if f".{e}." in name:
                        n = full_shape(param).numel()
                        sizes[e] = sizes.get(e, 0) + n
                        nbytes[e] = nbytes.get(e, 0) + n * param.element_size()
        return {"experts": list(self.experts), "expert_tasks": {k: list(v) for k, v in self.expert_tasks.items()},
                "router": self.router.state(), "expert_parameters": sizes, "expert_bytes": nbytes}

    def method_tensors(self) -> dict[str, torch.Tensor]:
        return self.router.tensors()

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        self.router.load(state.get("router", {}), tensors)
        self.expert_tasks = {k: list(v) for k, v in state.get("expert_tasks", {}).items()}
        for name in state.get("experts", []):
            if self.model is not None:
                self._ensure_expert(self.model, name)
        if self._bank is not None:
            self._bank.invalidate()
