"""A method from outside mcit, as a user's package would define one: tests/methods/test_external_method.py names it in
a recipe as `method.name: tests.methods.plugin_method:OwnStageSettings` and registers it as an entry point. A fixture
module; it holds no tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mcit.methods.base import Method
from mcit.methods.lora import add_lora, set_lora_trainable

ADAPTER = "plugin"
STAGE2_LR = 5e-3
STAGE2_STEPS = 3


class OwnStageSettings(Method):
    """One LoRA adapter named 'plugin' trained on every task; the second stage trains with its own lr and step
    count (`stage_training`), whatever the recipe's `train:` says."""

    def setup(self, model):
        return add_lora(model, self.recipe, ADAPTER)

    def prepare(self, model, stage: int, task_ids: Sequence[int]) -> None:
        set_lora_trainable(model, {ADAPTER})

    def stage_training(self, stage: int, task_ids: Sequence[int]) -> dict[str, Any]:
        return {"lr": STAGE2_LR, "max_steps": STAGE2_STEPS} if stage == 1 else {}


class NotAMethod:
    """Named like a method, but no subclass of Method: a recipe naming it must be refused."""

    def setup(self, model):
        return model
