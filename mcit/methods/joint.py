"""Joint multitask training (`joint`): one LoRA on the union of all tasks in a single stage, the upper bound.

The accuracy matrix then has two rows (zero-shot and after the joint stage); the stage-generalised metrics in
`mcit.evaluation.metrics` treat every task as first trained at stage 1, so BWT is 0 by construction.
"""

from __future__ import annotations

from mcit.methods.base import register
from mcit.methods.lora_ft import SequentialLoRA


@register("joint")
class JointTraining(SequentialLoRA):
    """Sequential LoRA's adapter, trained once on every task together."""

    def schedule(self, num_tasks: int) -> list[list[int]]:
        return [list(range(num_tasks))]
