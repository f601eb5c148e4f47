"""Sequential LoRA fine-tuning (`lora_ft`): one LoRA carried from task to task, the field's lower bound.

Every task updates the same adapter with no protection, so later tasks overwrite earlier ones. Reference settings on
UCIT (see docs/METHODS.md): rank 16, alpha 32, lr 2e-4, one epoch, cosine schedule with 3 % warmup.
"""

from __future__ import annotations

from mcit.methods.base import Method, register


@register("lora_ft")
class SequentialLoRA(Method):
    """All behaviour is the base class's: one adapter named 'default', trained on each task in turn."""
