"""Experience replay (`replay`): keep a few training samples of every finished task and mix them into later tasks.

The buffer stores sample ids only (the data is on disk), chosen uniformly at random with the run's seed, so the
buffer is saved as a short JSON list and a resumed run mixes exactly the same samples.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mcit.data.records import Sample
from mcit.errors import RecipeError
from mcit.methods.base import TaskData, register
from mcit.methods.lora_ft import SequentialLoRA


@dataclass
class ReplayOptions:
    per_task: int = 100
    """Samples kept per finished task (ignored when `fraction` is set)."""
    fraction: float | None = None
    """Keep this share of each task's training set instead of a fixed count."""


@register("replay")
class Replay(SequentialLoRA):
    Options = ReplayOptions

    def __init__(self, recipe, options: ReplayOptions):
        super().__init__(recipe, options)
        if options.per_task < 0 or (options.fraction is not None and not 0 < options.fraction <= 1):
            raise RecipeError("method.per_task must be >= 0 and method.fraction in (0, 1]")
        self.buffer: dict[str, list[str]] = {}

    def train_samples(self, stage: int, task_ids: Sequence[int], data: TaskData) -> list[Sample]:
        current = super().train_samples(stage, task_ids, data)
        replayed = []
        for task, ids in self.buffer.items():
            wanted = set(ids)
            replayed += [s for s in data.train[task] if s.id in wanted]
        return current + replayed

    def after_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        for t in task_ids:
            name = data.names[t]
            samples = data.train[name]
            count = round(len(samples) * self.options.fraction) if self.options.fraction else self.options.per_task
            rng = random.Random(f"{self.recipe.seed}:replay:{name}")
            self.buffer[name] = sorted(s.id for s in rng.sample(samples, min(count, len(samples))))

    def state(self) -> dict[str, Any]:
        return {"buffer": self.buffer}

    def load_state(self, state: dict[str, Any], tensors) -> None:
        self.buffer = {k: list(v) for k, v in state.get("buffer", {}).items()}
