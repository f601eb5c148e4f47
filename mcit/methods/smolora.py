"""SMoLoRA (`smolora`): a separable mixture of LoRA experts, routed apart for visual understanding and instruction
following.

Wang et al., "SMoLoRA: Exploring and Defying Dual Catastrophic Forgetting in Continual Visual Instruction Tuning",
ICCV 2025. In every adapted linear the total rank r (`lora.r`) is split into E experts of rank r/E:

- E/2 visual-understanding (VU) experts, picked by a gate (linear d_in -> E/2, hard top-1) on the mean-pooled input
  of the layer;
- E/2 instruction-following (IF) experts, picked by a gate (linear D -> E/2, hard top-1) on an embedding of the
  instruction;
- the two picked outputs `vu = s B_v A_v x` and `if = s B_i A_i x` are fused per token by a softmax over two scalar
  scorers (linear d_out -> 1 each): `W x + w_vu * vu + w_if * if`, `(w_vu, w_if) = softmax(f_vu(vu), f_if(if))`.

All experts and both scorers train on every task; the gates train on the first task and are frozen afterwards, so a
sample's route never drifts between tasks (the paper's defence against the instruction-following half of the "dual
forgetting").

Built on one PEFT adapter of rank r, as `moelora` is: expert e is rank rows [e r/E, (e+1) r/E) of A and the matching
columns of B; the VU experts come first. Three hooks per layer do the routing (gates from the layer's input), the
gating (one-hot per sample on A's rank channels) and the fusion (B's two halves applied apart, then mixed), so PEFT's
weights, names and save/load stay as they are. The gates and scorers (`mcit_smolora_*`) live next to the adapter and
are saved with the run's checkpoints; a PEFT-only export (`adapter/`) lacks them and computes the plain unrouted sum.

The instruction embedding is task-agnostic by default: each sample routes on its own instruction, read from the model
call itself, so a test question needs no task id. It is the mean of the model's frozen input embeddings over the
text tokens of the sample's first prompt (chat template included, image placeholders and padding left out): in
training the tokens before the first answer token, in generation the prompt. `oracle_task_id: true` reproduces the
published setting instead: every sample of task t routes on task t's instruction embedding (here the mean feature of
up to `task_samples` of its training samples), chosen at test time by the sample's task label.

A sample's route is decided once per model call on its prompt and carried by the KV cache to the decoding steps and to
candidate-scoring continuations (`mcit.methods.experts.rows` tags the cache), so a sample routes the same in
training, prefill and every generated token.

Deviations from the reference implementation (github.com/Minato-Zackie/SMoLoRA) and from MCITlib:
- the reference's hard top-1 has no gradient path, so its gates never leave their random initialisation; here each
  gate is a straight-through top-1 (forward: one-hot; backward: the softmax's gradient), so the gates learn on the
  first task as the paper describes;
- the reference routes the IF experts by the task index at test time (an oracle task id); here that is
  `oracle_task_id: true`, and the default routes each sample on its own instruction;
- instruction embedding: the reference uses a 384-d sentence-BERT (all-MiniLM-L6-v2) embedding of each task's single
  instruction string; here the model's own input embeddings (D = its hidden size) of the sample's prompt;
- VU pooling: the reference averages the layer input over every position (padding and answers included in training,
  only the current token when decoding); here over the prompt's attended tokens, the same set in training and at
  test. A multi-turn sample is pooled over its first turn in training and over its whole prompt at test;
- the gates read the layer input before LoRA dropout (the reference: also before dropout); A keeps PEFT's Kaiming
  initialisation (the reference: normal, std 0.01); the fusion costs one extra rank-r matmul per layer (PEFT's B
  product is replaced by the two halves).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcit.data.collate import IGNORE_INDEX, Encoder, processor_profile
from mcit.data.records import Sample
from mcit.errors import ModelError, RecipeError
from mcit.methods.base import TaskData, register
from mcit.methods.experts.rows import _cache_arg, _tag
from mcit.methods.lora import add_lora, lora_layers, set_lora_trainable
from mcit.methods.lora_ft import ADAPTER, SequentialLoRA
from mcit.runtime.zero import visible_parameters

GATES = ("mcit_smolora_vu_gate", "mcit_smolora_if_gate")
SCORERS = ("mcit_smolora_vu_score", "mcit_smolora_if_score")


@dataclass
class SMoLoRAOptions:
    experts: int = 8
    """E: E/2 visual-understanding and E/2 instruction-following experts; `lora.r` is the total rank and must be a
    multiple of E (the paper: 8 experts, r = 128; MCITlib on UCIT: 6, r = 96)."""
    oracle_task_id: bool = False
    """The published setting: the IF experts route on the instruction embedding of the sample's task, chosen at test
    time by its task label, instead of on the sample's own instruction."""
    task_samples: int = 256
    """With oracle_task_id: training samples per task (the first ones) averaged into the task's instruction
    embedding."""


class _Routing:
    """What the model-level hooks tell the adapted layers about the current model call."""

    def __init__(self) -> None:
        self.pool: torch.Tensor | None = None
        """(B, T) bool: the prompt tokens the VU gates average the layer input over."""
        self.instruction: torch.Tensor | None = None
        """(B, D) float: the instruction embedding the IF gates read."""
        self.fixed: torch.Tensor | None = None
        """(B, 2L) long: the routes of a call that continues a routed KV cache (decoding, candidate scoring)."""
        self.oracle: torch.Tensor | None = None
        """(D,): the task instruction embedding every row uses (oracle_task_id only)."""
        self.gates: dict[int, torch.Tensor] = {}
        """Layer slot -> (B, E) gate values of this call (one-hot forward, straight-through backward)."""
        self.chosen: dict[int, torch.Tensor] = {}
        """Layer slot -> (B, 2) the (VU, IF) experts picked in this call."""
        self.fusion: dict[int, torch.Tensor] = {}
        """Layer slot -> (B, T, 2) fusion weights of this call (kept only while tracing)."""


def _top1(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, index): a one-hot gate on the largest logit whose gradient is the softmax's (straight-through)."""
    soft = torch.softmax(logits.float(), dim=-1)
    index = soft.argmax(dim=-1)
    hard = F.one_hot(index, soft.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach()), index


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, T, d) `x` over the positions where the (B, T) `mask` is true (all positions without a mask)."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.device, x.dtype)
    return torch.einsum("btd,bt->bd", x, weights) / weights.sum(dim=1, keepdim=True).clamp(min=1)


def _before_first_answer(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions before each row's first labelled token (its first prompt, in a training batch)."""
    answered = labels != IGNORE_INDEX
    width = labels.shape[1]
    first = torch.where(answered.any(dim=1), answered.int().argmax(dim=1), torch.full_like(answered[:, 0], width,
                                                                                           dtype=torch.long))
    return torch.arange(width, device=labels.device)[None, :] < first[:, None]


@register("smolora")
class SMoLoRA(SequentialLoRA):
    Options = SMoLoRAOptions

    def __init__(self, recipe, options: SMoLoRAOptions):
        super().__init__(recipe, options)
        r, experts = recipe.method.lora.r, options.experts
        if experts < 2 or experts % 2 or r % experts:
            raise RecipeError(f"method.experts ({experts}) must be even (half VU, half IF experts) and divide "
                              f"method.lora.r ({r}): each expert gets rank r / experts (the paper: 8 experts, r 128)")
        if options.task_samples < 1:
            raise RecipeError(f"method.task_samples must be >= 1, got {options.task_samples}")
        if recipe.model.full_finetune:
            raise RecipeError("method smolora routes LoRA experts; model.full_finetune trains no adapter to route")
        self.routing = _Routing()
        self.handles: list = []
        self.task_names: list[str] = []
        """The run's tasks in order: the task index an oracle route reads."""
        self.task_instruction: dict[str, torch.Tensor] = {}
        """Oracle only: each task's instruction embedding (D,)."""
        self.trace: list[dict[str, Any]] | None = None
        """While a list (see `tracing`), every model call appends its routes, instruction embeddings and fusion
        weights."""
        self._embed = None
        self._image_token = -1
        self._slots = 0
        self._encoder: Encoder | None = None

    # --- structure -------------------------------------------------------------------------------------------------
    def setup(self, model):
        model = add_lora(model, self.recipe, ADAPTER)
        base = model.get_base_model()
        self._embed = base.get_input_embeddings()
        if self.ctx is not None:
            self._image_token = processor_profile(self.ctx.processor).image_token_id
        half = self.options.experts // 2
        layers = lora_layers(model)
        for slot, ref in enumerate(layers):
            layer, a, b = ref.module, ref.module.lora_A[ADAPTER], ref.module.lora_B[ADAPTER]
            if not hasattr(layer, GATES[0]):
                like = {"bias": False, "dtype": a.weight.dtype, "device": a.weight.device}
                # nn.Linear's default (random) init: the routes start spread over the experts, as in the reference
                setattr(layer, GATES[0], nn.Linear(a.in_features, half, **like))
                setattr(layer, GATES[1], nn.Linear(self._embed.embedding_dim, half, **like))
                for name in SCORERS:
                    setattr(layer, name, nn.Linear(b.out_features, 1, **like))
            self.handles += [layer.register_forward_pre_hook(self._gate_hook(slot)),
                             a.register_forward_hook(self._expert_hook(slot)),
                             b.register_forward_hook(self._fusion_hook(layer, slot))]
        self._slots = len(layers)
        self.handles += [base.register_forward_pre_hook(self._before_call, with_kwargs=True),
                         base.register_forward_hook(self._after_call, with_kwargs=True)]
        if self.options.oracle_task_id and self.ctx is not None and self.ctx.data.names:
            self._embed_tasks(self.ctx.data)  # the zero-shot row is evaluated before any task is prepared
        return model

    def prepare(self, model, stage: int, task_ids: Sequence[int]) -> None:
        set_lora_trainable(model, {ADAPTER})
        for ref in lora_layers(model):
            for name in GATES:  # the paper: routers train on the first task only, then stay fixed
                getattr(ref.module, name).requires_grad_(stage == 0)
            for name in SCORERS:
                getattr(ref.module, name).requires_grad_(True)
        self._impose_stage_task(task_ids)

    def before_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        if self.options.oracle_task_id:
            self._embed_tasks(data)
            self._impose_stage_task(task_ids)

    def _impose_stage_task(self, task_ids: Sequence[int]) -> None:
        """Oracle only: training rows route on the stage's task (one task per stage, the default schedule)."""
        if self.options.oracle_task_id and task_ids and task_ids[0] < len(self.task_names):
            self.routing.oracle = self.task_instruction.get(self.task_names[task_ids[0]])

    # --- instruction embeddings ------------------------------------------------------------------------------------
    def _mean_embedding(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, D) fp32: per row, the mean frozen input embedding of the tokens where `mask` is true (zero for none).
        Only the selected tokens are looked up, so a long image prompt costs its few text tokens."""
        weight = self._embed.weight
        rows = mask.nonzero()[:, 0].to(weight.device)
        with torch.no_grad(), visible_parameters([weight]):
            vectors = F.embedding(ids[mask].to(weight.device), weight).float()
        total = torch.zeros(ids.shape[0], vectors.shape[-1], device=weight.device).index_add_(0, rows, vectors)
        return total / mask.sum(dim=1, keepdim=True).to(total).clamp(min=1)

    def instruction_features(self, samples: Sequence[Sample]) -> torch.Tensor:
        """(N, D) the instruction embedding each sample routes on in task-agnostic mode, computed from its first
        prompt outside a model call (the oracle's task embeddings average these)."""
        if self.ctx is None:
            raise ModelError("smolora.instruction_features needs the run's processor: attach the method first")
        if self._encoder is None:
            self._encoder = Encoder.from_recipe(self.ctx.processor, self.recipe)
        ids = [[t for t in self._encoder.prompt_ids(dataclasses.replace(s, turns=s.turns[:1]))
                if t != self._image_token] for s in samples]
        width = max((len(row) for row in ids), default=0)
        padded = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.bool)
        for i, row in enumerate(ids):
            padded[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = True
        return self._mean_embedding(padded, mask).cpu()

    def _embed_tasks(self, data: TaskData) -> None:
        self.task_names = list(data.names)
        for name in data.names:
            if name not in self.task_instruction:
                samples = data.train.get(name, [])[:self.options.task_samples]
                if not samples:
                    raise RecipeError(f"method.oracle_task_id: task {name!r} has no training samples to embed its "
                                      "instruction from")
                self.task_instruction[name] = self.instruction_features(samples).mean(dim=0)

    # --- hooks -----------------------------------------------------------------------------------------------------
    def _before_call(self, _module, args, kwargs):
        """Start of a model call: the prompt mask and instruction embedding of a fresh call, or the routes a
        continued KV cache carries."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        route = self.routing
        route.gates, route.chosen, route.fusion = {}, {}, {}
        if ids is None:
            raise ModelError("smolora routes from the token ids: call the model with input_ids, not inputs_embeds")
        carried = getattr(_cache_arg(kwargs), "_mcit_route", None)
        if carried is not None:
            if carried.shape[0] != ids.shape[0]:
                raise ModelError(f"smolora: the KV cache carries routes for {carried.shape[0]} rows but the call has "
                                 f"{ids.shape[0]}")
            route.fixed, route.pool, route.instruction = carried, None, None
            return None
        route.fixed = None
        mask = kwargs.get("attention_mask")
        mask = mask.bool() if mask is not None and mask.shape == ids.shape else torch.ones_like(ids, dtype=torch.bool)
        labels = kwargs.get("labels")
        if labels is not None and labels.shape == ids.shape:
            mask = mask & _before_first_answer(labels)
        route.pool = mask
        if route.oracle is not None:
            route.instruction = route.oracle[None, :].expand(ids.shape[0], -1)
        else:
            route.instruction = self._mean_embedding(ids, mask & (ids != self._image_token))
        return None

    def _gate_hook(self, slot: int):
        """Pre-hook of an adapted layer: this call's (B, E) gates from the layer input and the instruction."""
        half = self.options.experts // 2

        def hook(layer, args):
            x, route = args[0], self.routing
            if route.fixed is not None:
                pick = route.fixed[:, 2 * slot:2 * slot + 2].to(x.device)
                gates = torch.cat([F.one_hot(pick[:, 0], half), F.one_hot(pick[:, 1], half)], dim=-1).float()
            else:
                if route.instruction is None or route.instruction.shape[0] != x.shape[0]:
                    raise ModelError(f"smolora: an adapted layer ran on {x.shape[0]} rows outside a routed model call "
                                     "(no instruction embedding for them)")
                pool = route.pool if route.pool is not None and route.pool.shape == x.shape[:2] else None
                vu_gate, if_gate = (getattr(layer, name) for name in GATES)
                pooled = _masked_mean(x, pool).to(vu_gate.weight.dtype)
                vu, vu_pick = _top1(vu_gate(pooled))
                inst, if_pick = _top1(if_gate(route.instruction.to(if_gate.weight.device, if_gate.weight.dtype)))
                route.chosen[slot] = torch.stack([vu_pick, if_pick], dim=1)
                gates = torch.cat([vu, inst], dim=-1)
            route.gates[slot] = gates
            return None

        return hook

    def _expert_hook(self, slot: int):
        """Forward hook on lora_A: keep only each row's picked VU and IF experts (their rank channels of A x)."""
        experts = self.options.experts

        def hook(_module, _args, output):
            gates = self.routing.gates[slot]
            scale = torch.repeat_interleave(gates, output.shape[-1] // experts, dim=-1).to(output.dtype)
            return output * scale.view(scale.shape[0], *([1] * (output.dim() - 2)), scale.shape[-1])

        return hook

    def _fusion_hook(self, layer, slot: int):
        """Forward hook on lora_B: the VU and IF halves apart, mixed per token by softmax over their scorers."""

        def hook(module, args, output):
            h, weight = args[0], module.weight
            half = h.shape[-1] // 2
            vu = F.linear(h[..., :half], weight[:, :half])
            inst = F.linear(h[..., half:], weight[:, half:])
            # the scorers read the scaled expert outputs (PEFT applies the scaling after this hook)
            scaling = layer.scaling[ADAPTER]
            scores = torch.cat([getattr(layer, SCORERS[0])(vu), getattr(layer, SCORERS[1])(inst)], dim=-1)
            weights = torch.softmax(scores.float() * scaling, dim=-1)
            if self.trace is not None:
                self.routing.fusion[slot] = weights.detach()
            return (weights[..., :1] * vu + weights[..., 1:] * inst).to(output.dtype)

        return hook

    def _after_call(self, _module, _args, _kwargs, output):
        """End of a model call: the routes ride on its KV cache for the calls that continue it."""
        route = self.routing
        routes = route.fixed
        if routes is None and route.chosen and len(route.chosen) == self._slots:
            routes = torch.cat([route.chosen[k] for k in range(self._slots)], dim=1)  # (vu0, if0, vu1, if1, ...)
        cache = _cache_arg(output) if isinstance(output, dict) else getattr(output, "past_key_values", None)
        if routes is not None and cache is not None and getattr(cache, "_mcit_route", None) is None:
            _tag(cache, routes)
        if self.trace is not None and routes is not None:
            self.trace.append({"routes": routes.cpu(), "continued": route.fixed is not None,
                               "instruction": None if route.instruction is None else route.instruction.cpu(),
                               "fusion": {k: v.cpu() for k, v in route.fusion.items()}})
        route.gates = {}  # (a checkpointed layer recomputes its gates from pool and instruction in backward)
        return None

    @contextlib.contextmanager
    def tracing(self) -> Iterator[list[dict[str, Any]]]:
        """Record every model call's routes ((B, 2L): VU and IF expert per layer), instruction embeddings and
        fusion weights (for tests and inspection)."""
        self.trace = []
        try:
            yield self.trace
        finally:
            self.trace = None

    @contextlib.contextmanager
    def _imposed(self, vector: torch.Tensor | None) -> Iterator[None]:
        previous, self.routing.oracle = self.routing.oracle, vector
        try:
            yield
        finally:
            self.routing.oracle = previous

    # --- inference -------------------------------------------------------------------------------------------------
    def eval_groups(self, model, samples: Sequence[Sample]):
        """Task-agnostic: one group, each sample routes on its own prompt. Oracle: one group per task, its rows on
        the task's instruction embedding."""
        if not self.options.oracle_task_id:
            yield from super().eval_groups(model, samples)
            return
        by_task: dict[str, list[int]] = {}
        for i, sample in enumerate(samples):
            by_task.setdefault(sample.task, []).append(i)
        unknown = sorted(t for t in by_task if t not in self.task_instruction)
        if unknown:
            raise RecipeError(f"method.oracle_task_id: test samples of {unknown} carry no task id of this run "
                              f"({self.task_names}); route them on their own instructions with "
                              "method.oracle_task_id: false (in the run's recipe.yaml for a stage checkpoint)")
        for task, indices in by_task.items():
            yield self._imposed(self.task_instruction[task]), indices

    # --- state -----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"task_names": list(self.task_names), "oracle_task_id": self.options.oracle_task_id,
                "embedded_tasks": list(self.task_instruction)}

    def method_tensors(self) -> dict[str, torch.Tensor]:
        if not self.task_instruction:
            return {}
        return {"task_instruction": torch.stack(list(self.task_instruction.values())).contiguous()}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        self.task_names = [str(n) for n in state.get("task_names", [])]
        embedded = [str(n) for n in state.get("embedded_tasks", [])]
        table = tensors.get("task_instruction")
        if table is not None and table.shape[0] == len(embedded):
            self.task_instruction = {n: table[i].float() for i, n in enumerate(embedded)}
