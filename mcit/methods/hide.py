"""HiDe-LLaVA (`hide`): hierarchical decoupling into task-general (fused) and task-specific (routed) layers.

Guo et al., "HiDe-LLaVA: Hierarchical Decoupling for Continual Instruction Tuning of Multimodal Large Language
Model", ACL 2025. Every LoRA'd linear holds one expert per task (a PEFT adapter `expert<t>`); task t trains only its
own expert (PEFT runs that adapter alone, the others have no gradient and no optimizer state, so the cost per task is
flat). At inference:

- *task-general* layers fuse the experts trained so far into one delta, computed once per stage: `sum_b_sum_a`
  (the reference: sum of B's times sum of A's, weight 1) or `sum_ba` (the exact sum of the experts' deltas);
- *task-specific* layers (`expand_layers`) mix the experts per sample with w = softmax(s / tau), tau = 0.1, where s is
  the mean of the image and instruction-text cosine similarities to each task's prototype (`mcit.routing`).

Deviations from the reference, each on purpose:
- per-sample routing weights (the reference takes one choice per batch, the max over the batch);
- fused and stacked weights are precomputed once per stage instead of rebuilt every forward pass;
- `expand_layers` may be `auto`: the layers with the lowest mean cross-task CKA, read from a `mcit analyze cka`
  result (`cka_path`) or, without one, measured in-run after every stage between the run's own experts (they are
  exactly HiDe's "models fine-tuned independently per task": each expert is trained alone on top of the base). The
  in-run probe set is `cka_samples` *training* samples per seen task (the reference uses 50 test samples; training
  samples keep test data out of a model-selection decision). The reference hard-codes the last layer, which is the
  default here (`expand_layers: [-1]`);
- prototypes are computed in one pass over each task's training samples before training it (frozen encoders, so
  equal to the reference's running mean collected during training) and saved with every checkpoint;
- default router features come from the model's own vision tower and input embeddings; CLIP encoders as in the
  reference are available with `router.source: clip`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mcit.analysis.cka import CKAResult, choose_expand_layers, collect_layer_features, layerwise_cka
from mcit.data.collate import Encoder, PixelCache, collate
from mcit.errors import RecipeError
from mcit.methods.base import TaskData, register
from mcit.methods.experts import FUSIONS, ExpertMethod, fused_factors
from mcit.methods.experts.bank import delta_hook
from mcit.methods.lora import lora_layers
from mcit.models.loading import num_lm_layers
from mcit.routing.prototypes import RouterOptions
from mcit.runs.folder import RunFolder
from mcit.runtime import dist
from mcit.runtime.files import write_json_atomic, write_text_atomic
from mcit.runtime.placement import module_device
from mcit.runtime.precision import autocast
from mcit.runtime.zero import visible_parameters

logger = logging.getLogger(__name__)


@dataclass
class HiDeOptions:
    expand_layers: list[int] | str = field(default_factory=lambda: [-1])
    """Task-specific LM layers (negative = from the top), or `auto` (lowest cross-task CKA)."""
    expand_count: int | None = None
    """With `auto`: how many layers to expand (default 1 when no threshold is given)."""
    expand_threshold: float | None = None
    """With `auto`: expand every layer whose mean cross-task CKA is below this value instead."""
    cka_path: str | None = None
    """With `auto`: a `cka.json` from `mcit analyze cka`; without it the CKA is measured in-run after each stage."""
    cka_kind: Literal["rbf", "linear"] = "rbf"
    cka_samples: int = 50
    """In-run CKA: training samples per seen task in the probe set."""
    fusion: Literal["sum_b_sum_a", "sum_ba"] = "sum_b_sum_a"
    """Task-general fusion: the reference's (sum B)(sum A), or sum of B_i A_i."""
    train_on_fused: bool = False
    """While task t trains, task-general layers also add the (frozen, precomputed) fusion of experts 1..t-1, so the
    new expert learns on top of what inference will add; off: each expert trains alone on the base."""
    router: RouterOptions = field(default_factory=lambda: RouterOptions(tau=0.1, features="both"))


@register("hide")
class HiDeLLaVA(ExpertMethod):
    Options = HiDeOptions
    expert_prefix = "expert"

    def __init__(self, recipe, options: HiDeOptions):
        super().__init__(recipe, options)
        auto = options.expand_layers == "auto"
        if isinstance(options.expand_layers, str) and not auto:
            raise RecipeError(f"method.expand_layers: expected a list of layer indices or 'auto', got "
                              f"{options.expand_layers!r}")
        if not auto and (options.expand_count is not None or options.expand_threshold is not None
                         or options.cka_path):
            # A recipe written for `auto` switched to fixed layers by an override (`method.expand_layers=[-1]`, the
            # paper's choice): its CKA keys no longer apply, and refusing would make the override unusable.
            unused = [k for k in ("expand_count", "expand_threshold", "cka_path") if getattr(options, k)]
            logger.warning("method.expand_layers=%s is a fixed choice, so method.%s (used only with 'auto') is "
                           "ignored", options.expand_layers, ", method.".join(unused))
            options.expand_count = options.expand_threshold = options.cka_path = None
        if options.expand_count is not None and options.expand_threshold is not None:
            raise RecipeError("method.expand_count and method.expand_threshold exclude each other; set one")
        if options.expand_count is not None and options.expand_count < 1:
            raise RecipeError(f"method.expand_count must be >= 1, got {options.expand_count}")
        if options.cka_path and not Path(options.cka_path).expanduser().is_file():
            raise RecipeError(f"method.cka_path: {options.cka_path} not found (write it with `mcit analyze cka`)")
        if options.fusion not in FUSIONS:
            raise RecipeError(f"method.fusion must be one of {', '.join(FUSIONS)}")
        self.fusion = options.fusion
        self.expand_history: dict[str, list[int]] = {}
        self.cka_curve: dict[str, float] = {}
        self._training_hooks: list = []

    # --- structure and training ------------------------------------------------------------------------------------
    def prepare(self, model, stage: int, task_ids: Sequence[int]) -> None:
        name = self.expert_name(stage)
        self._ensure_expert(model, name)
        self._activate(model, name)

    def before_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        name = self.expert_name(stage)
        previous = [e for e in self.trained_experts() if e != name]
        for t in task_ids:
            self.observe_task(model, data.names[t], data)
            if data.names[t] not in self.expert_tasks[name]:
                self.expert_tasks[name].append(data.names[t])
        self._remove_training_hooks()
        if self.options.train_on_fused and previous:
            self._training_hooks = self._fused_training_hooks(model, previous)

    def _fused_training_hooks(self, model, previous: list[str]) -> list:
        """Forward hooks adding the frozen fusion of `previous` in the task-general layers (computed once)."""
        fused = self._fused_layers(model)
        handles = []
        for ref in lora_layers(model):
            if ref.index not in fused:
                continue
            params = [p for e in previous for p in (ref.module.lora_A[e].weight, ref.module.lora_B[e].weight)]
            with visible_parameters(params), torch.no_grad():
                factors = fused_factors(ref.module, previous, self.fusion)
            handles.append(ref.module.register_forward_hook(delta_hook(factors, None)))
        return handles

    def _remove_training_hooks(self) -> None:
        for handle in self._training_hooks:
            handle.remove()
        self._training_hooks = []

    def after_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        self._remove_training_hooks()
        if self.options.expand_layers == "auto" and not self.options.cka_path and len(self.trained_experts()) > 1:
            self.expand_history[str(stage + 1)] = self._in_run_cka(model, data, stage)
        if self._bank is not None:
            self._bank.invalidate()

    # --- task-specific layers --------------------------------------------------------------------------------------
    def expand_layers(self, model) -> list[int]:
        """The resolved task-specific layer indices (0-based) in use now."""
        n = num_lm_layers(model)
        opts = self.options
        if opts.expand_layers != "auto":
            layers = []
            for i in opts.expand_layers:
                if not -n <= i < n:
                    raise RecipeError(f"method.expand_layers: layer {i} does not exist (the language model has {n} "
                                      "layers, 0..n-1 or -n..-1)")
                layers.append(i % n)
            return sorted(set(layers))
        if opts.cka_path:
            return self._choose(self._read_cka())
        if not self.expand_history:
            return []  # one expert: fused and mixed layers compute the same thing
        return self.expand_history[max(self.expand_history, key=int)]

    def _fused_layers(self, model) -> set[int]:
        return set(range(num_lm_layers(model))) - set(self.expand_layers(model))

    def _read_cka(self):
        return CKAResult.from_json(Path(self.options.cka_path).expanduser().read_text(encoding="utf-8"))

    def _choose(self, result) -> list[int]:
        if self.options.expand_threshold is not None:
            return choose_expand_layers(result, threshold=self.options.expand_threshold)
        return choose_expand_layers(result, count=self.options.expand_count or 1)

    def _in_run_cka(self, model, data: TaskData, stage: int) -> list[int]:
        """Layer-wise CKA between the run's experts (each alone on the base) on a shared training-sample probe."""
        experts = self.trained_experts()
        probe = []
        for expert in experts:
            for task in self.expert_tasks[expert]:
                pool = data.train[task]
                rng = random.Random(f"{self.recipe.seed}:cka:{task}")
                probe += rng.sample(pool, min(self.options.cka_samples, len(pool)))
        encoder = Encoder.from_recipe(self.ctx.processor, self.recipe)
        pixels = PixelCache.from_recipe(self.ctx.processor, self.recipe)
        pad = encoder.tokenizer.pad_token_id

        def batches():
            for k in range(0, len(probe), 32):
                batch = collate([encoder.encode(s, i) for i, s in enumerate(probe[k:k + 32])], pad, pixels)
                batch.pop("labels")
                yield batch

        features = {}
        try:
            for expert in experts:
                model.set_adapter(expert)
                with torch.no_grad(), autocast(self.recipe.model.autocast, module_device(model)):
                    features["+".join(self.expert_tasks[expert])] = collect_layer_features(model, batches())
        finally:
            self._activate(model, self.expert_name(stage))
        result = layerwise_cka(features, kind=self.options.cka_kind)
        layers = self._choose(result)
        self.cka_curve = {str(k): round(v, 6) for k, v in result.mean_cross_task.items()}
        if self.ctx.output_dir is not None and dist.is_main():
            folder = RunFolder(self.ctx.output_dir).analysis
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / f"hide-cka-stage-{stage + 1:02d}.json", result.to_json())
            write_json_atomic(folder / f"hide-cka-stage-{stage + 1:02d}.expand.json",
                              {"expand_layers": layers, "probe_per_task": self.options.cka_samples})
        return layers

    # --- state -----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        out = super().state()
        opts = self.options
        source = ("list" if opts.expand_layers != "auto" else f"cka:{opts.cka_path}" if opts.cka_path
                  else "cka:in-run")
        layers = self.expand_layers(self.model) if self.model is not None else None
        out.update({"expand_layers": layers, "expand_source": source, "expand_history": self.expand_history,
                    "cka_mean_cross_task": self.cka_curve, "fusion": self.fusion})
        return out

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(state, tensors)
        if state:
            self.expand_history = {str(k): list(v) for k, v in state.get("expand_history", {}).items()}
            self.cka_curve = dict(state.get("cka_mean_cross_task", {}))
