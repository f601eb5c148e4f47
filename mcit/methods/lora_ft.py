"""Sequential LoRA fine-tuning (`lora_ft`): one LoRA carried from task to task, the field's lower bound.

Every task updates the same adapter with no protection, so later tasks overwrite earlier ones. Reference settings on
UCIT (HiDe-LLaVA, MCITlib): rank 16, alpha 32, lr 2e-4, one epoch, cosine schedule with 3 % warmup. With
`model.full_finetune` the whole language model trains instead of an adapter (used to pretrain the tiny base).
"""

from __future__ import annotations

from collections.abc import Sequence

from mcit.methods.base import Method, register
from mcit.methods.lora import add_lora, set_lora_trainable
from mcit.models.loading import set_trainable_extras

ADAPTER = "default"


@register("lora_ft")
class SequentialLoRA(Method):
    """One adapter named 'default', trained on each task in turn."""

    def setup(self, model):
        if self.recipe.model.full_finetune:
            set_trainable_extras(model, self.recipe.model)
            return model
        return add_lora(model, self.recipe, ADAPTER)

    def prepare(self, model, stage: int, task_ids: Sequence[int]) -> None:
        set_lora_trainable(model, {ADAPTER})
