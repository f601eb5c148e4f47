"""SEFE (`sefe`): RegLoRA trained on ASD-diversified data — the full Superficial and Essential Forgetting Eliminator.

Chen et al., 2025. The two halves live where they belong: Answer Style Diversification is a data transform
(`mcit.data.asd`, switched on by the recipe's `benchmark.asd.enabled`/`fraction`, applied by the runner to every
task's training set), and RegLoRA is a method (`mcit.methods.reglora`). `sefe` is RegLoRA that refuses to run without
ASD, so a run labelled "sefe" in results.json always is the combination; the two ablations are `reglora` (no ASD) and
`lora_ft` with ASD on (recipes/synthcit/asd_only.yaml).
"""

from __future__ import annotations

from mcit.errors import RecipeError
from mcit.methods.base import register
from mcit.methods.reglora import RegLoRA, RegLoRAOptions


@register("sefe")
class SEFE(RegLoRA):
    Options = RegLoRAOptions

    def __init__(self, recipe, options: RegLoRAOptions):
        super().__init__(recipe, options)
        if not recipe.benchmark.asd.enabled:
            where = recipe.source or "the recipe"
            raise RecipeError(f"{where}: method sefe is RegLoRA + ASD, but benchmark.asd.enabled is false; set "
                              "benchmark.asd.enabled: true (and benchmark.asd.fraction, the paper's X %), or use "
                              "method reglora for RegLoRA alone")
