"""DISCO (`disco`): dynamic knowledge organization into LoRA slots + subspace selective activation at inference.

From the federated continual instruction tuning paper (FCIT) and its centralized form in MCITlib. Each slot is a
PEFT adapter `slot<k>`. Before a task is trained, its prototype (mean instruction-text feature) is compared with
every existing slot's prototype: if the best cosine is >= `reuse_threshold` (0.9) the task reuses that slot (its
LoRA keeps training on the new task and its prototype becomes the count-weighted mean of its tasks); otherwise a new
slot is opened. `reuse_threshold: null` gives one slot per task. Only the current slot is trained (flat cost per task;
other slots get no gradient and no optimizer state).

At inference *every* LoRA layer outputs `W x + sum_i w_i * B_i A_i x` with per-sample
w = softmax(cos(text feature, slot prototype_i) / tau), tau = 0.05, computed with stacked A/B tensors built once per
stage (the reference rebuilds concatenated weights on every forward pass).

Deviations: the federated parts (client grouping, singleton clusters of < 0.1 % of samples joining their nearest
cluster, server-side averaging of LoRA and projector) have no counterpart in a single centralized run and are left
out; `max_slots` (the reference's 8) reuses the nearest slot once all slots are taken. Router features default to the
model's own input embeddings (`router.source: clip` for the reference's CLIP text encoder); with those features the
0.9 threshold means something different from CLIP's, so check the logged cosines (`assignments` in the state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mcit.errors import RecipeError
from mcit.methods.base import TaskData, register
from mcit.methods.experts import ExpertMethod
from mcit.routing.prototypes import RouterOptions, TaskPrototypes


@dataclass
class DiscoOptions:
    reuse_threshold: float | None = 0.9
    """A new task reuses the most similar slot when their prototypes' cosine is >= this; null: a slot per task."""
    max_slots: int | None = None
    """Upper bound on slots (the reference uses 8); once reached, new tasks join their most similar slot."""
    router: RouterOptions = field(default_factory=lambda: RouterOptions(tau=0.05, features="text"))


@register("disco")
class Disco(ExpertMethod):
    Options = DiscoOptions
    expert_prefix = "slot"

    def __init__(self, recipe, options: DiscoOptions):
        super().__init__(recipe, options)
        if options.reuse_threshold is not None and not -1.0 <= options.reuse_threshold <= 1.0:
            raise RecipeError(f"method.reuse_threshold is a cosine in [-1, 1] (or null), got {options.reuse_threshold}")
        if options.max_slots is not None and options.max_slots < 1:
            raise RecipeError(f"method.max_slots must be >= 1 or null, got {options.max_slots}")
        self.stage_slot: dict[str, str] = {}
        self.assignments: list[dict[str, Any]] = []

    def prepare(self, model, stage: int, task_ids: Sequence[int]) -> None:
        # The slot of a new stage depends on its data, so it is chosen in before_task; a finished stage's slot is
        # known from the saved state (load_state rebuilds the adapters), so only activate what is known here.
        slot = self.stage_slot.get(str(stage))
        if slot is not None:
            self._ensure_expert(model, slot)
            self._activate(model, slot)

    def before_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        names = [data.names[t] for t in task_ids]
        for name in names:
            self.observe_task(model, name, data)
        slot, cosine = self._choose_slot(names)
        self._ensure_expert(model, slot)
        for name in names:
            if name not in self.expert_tasks[slot]:
                self.expert_tasks[slot].append(name)
        self.stage_slot[str(stage)] = slot
        self.assignments.append({"stage": stage + 1, "tasks": names, "slot": slot,
                                 "best_cosine": None if cosine is None else round(cosine, 6)})
        self._activate(model, slot)

    def _choose_slot(self, names: list[str]) -> tuple[str, float | None]:
        trained = self.trained_experts()
        fresh = self.expert_name(len(trained))
        if not trained:
            return fresh, None
        stage_proto = TaskPrototypes()
        for name in names:
            stage_proto.update_from("stage", self.task_prototypes, name)
        slots = self.expert_prototypes(trained)
        use = self.options.router.features
        cosines = [stage_proto.cosine_to("stage", slots, slot, use=use) for slot in trained]
        best = max(range(len(trained)), key=cosines.__getitem__)
        full = self.options.max_slots is not None and len(trained) >= self.options.max_slots
        threshold = self.options.reuse_threshold
        if full or (threshold is not None and cosines[best] >= threshold):
            return trained[best], cosines[best]
        return fresh, cosines[best]

    def state(self) -> dict[str, Any]:
        out = super().state()
        out.update({"stage_slot": dict(self.stage_slot), "assignments": list(self.assignments)})
        return out

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(state, tensors)
        if state:
            self.stage_slot = {str(k): str(v) for k, v in state.get("stage_slot", {}).items()}
            self.assignments = list(state.get("assignments", []))
