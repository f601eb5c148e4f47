"""CL-MoE (`cl_moe`): a MoE-LoRA with an instance-level and a task-level router and a momentum merge of the experts.

Huai et al., "CL-MoE: Enhancing Multimodal Large Language Model with Dual Momentum Mixture-of-Experts for Continual
Visual Question Answering", CVPR 2025 (arXiv 2503.00413). One LoRA of total rank r per adapted linear is split into
E experts of rank r/E (expert e = rank rows [e*r/E, (e+1)*r/E) of A and the matching columns of B, the layout of
`moelora`: the same function and parameters as E separate adapters, PEFT's forward path, one matmul per factor). A is
drawn from N(0, 0.01²) and B is zero, as in the reference.

- **Instance-level router** G^I: per adapted linear a linear map d_in -> E (`mcit_clmoe_router`) and a softmax per
  token; the expert channels of A x are scaled by it, so the layer computes `W x + s * sum_e g_e B_e A_e x`.
- **Usage statistics**: on every training forward pass each (non-padding) token's two highest gates count one use
  each for their experts (tokens whose top-2 gates tie count nothing), summed over all adapted layers of the model as
  the reference pools them. After the task its `task_top_k` (2) most used experts are that task's "global" experts S_t.
- **Task-level router** G^T: the task-agnostic weight vector g = mean over the tasks seen so far of (1/k on S_t). At
  inference (no task id) every layer mixes `beta * G^I(x) + (1 - beta) * g` (beta = `instance_weight`, 0.5 as in the
  reference's inference line); training uses G^I alone, because S_t exists only once task t's statistics are in.
- **Momentum merge** after task t > 1, from the expert parameters theta_{t-1} held before the task (a snapshot taken
  in `before_task`) and phi_t trained on it, with alpha = `momentum` (0.7):
      expert in S_{t-1} but not in S_t:  theta_t = (1 - alpha) * theta_{t-1} + alpha * phi_t   (0.3 old + 0.7 new)
      every other expert:                theta_t = alpha * theta_{t-1} + (1 - alpha) * phi_t   (0.7 old + 0.3 new)
  applied to both factors (A rows and B columns of the expert). Routers and the projector keep their trained values
  (the reference merges only the expert factors).

`variant: mcitlib` is MCITlib's CL-MoE: the same layers trained sequentially with dense token routing only (no
task-level router at inference, no momentum merge); usage is still counted and recorded, but never used.

State: the finished tasks' S_t and pooled counts (`state()`), the open stage's per-layer counts (`usage`) and, while a
stage after the first is open, the snapshot theta_{t-1} (`snapshot.<layer>.lora_A/B`) in `method_tensors()`, so a
resumed stage merges exactly as an uninterrupted one. Under several ranks the counts are summed over ranks when the
stage ends, and also in `state()` while a stage is open (a collective there: the step loop calls it on every rank
before a step checkpoint); the sum then stays on rank 0 and the other ranks restart from zero.

Deviations from the reference code (MCITlib's `CL-MoE/`, the authors' `params.py`/`statistic.py`):
- counts come from every training forward pass (the reference appends them to a text file only in forward passes
  that happen at second 30 of the wall clock), leave padding positions out (the reference counts them) and are summed
  over ranks; under gradient checkpointing the re-run of each layer counts again, which doubles every count alike;
- the task-level vector at inference is our reading: the reference's line is commented out and names only "the
  contribution of the top-2 experts inferred from the statistics"; MCITlib never runs the momentum step;
- the router reads the adapter input after LoRA dropout (identical at inference); the scaling is PEFT's alpha / r
  with r the total rank (as in the reference). A PEFT-only export (`adapter/`) lacks the routers and computes the
  ungated sum, not this model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mcit.errors import CheckpointError, RecipeError
from mcit.methods.base import TaskData, register
from mcit.methods.lora import add_lora, lora_layers
from mcit.methods.lora_ft import ADAPTER, SequentialLoRA
from mcit.runtime import dist, zero

ROUTER = "mcit_clmoe_router"
"""Attribute of every adapted LoRA layer holding its instance-level router (saved with the model tensors)."""
USAGE = "usage"
SNAPSHOT = "snapshot."
TOKEN_TOP_K = 2
"""Experts counted per token: the reference counts each token's top-2 gates."""
A_INIT_STD = 0.01


@dataclass
class CLMoEOptions:
    experts: int = 6
    """Number of experts E per adapted layer; `lora.r` is the total rank and must be a multiple of E."""
    variant: Literal["paper", "mcitlib"] = "paper"
    """paper: both routers and the momentum merge; mcitlib: dense token routing only (MCITlib's reduced CL-MoE)."""
    task_top_k: int = 2
    """Global experts per task: the k most used experts of the task (the paper's top-2)."""
    momentum: float = 0.7
    """alpha of the momentum merge (the reference's 0.7)."""
    instance_weight: float = 0.5
    """beta: weight of the instance-level router at inference; 1 - beta goes to the task-level router."""


def select_experts(usage: torch.Tensor, k: int) -> list[int]:
    """The k most used experts (ascending index) of a task from its counts, per layer ([layers, E], summed over
    layers) or already pooled ([E]); equal counts go to the lower index."""
    pooled = usage.sum(dim=0) if usage.dim() == 2 else usage
    order = sorted(range(pooled.numel()), key=lambda e: (-int(pooled[e]), e))
    return sorted(order[:k])


def momentum_coefficients(previous: Sequence[int], current: Sequence[int], experts: int,
                          alpha: float) -> list[float]:
    """lambda_e, the weight of expert e's value before the task: 1 - alpha for the previous task's global experts
    that the new task did not pick, alpha for every other expert."""
    return [1.0 - alpha if e in previous and e not in current else alpha for e in range(experts)]


def task_level_gate(selections: Sequence[Sequence[int]], experts: int) -> torch.Tensor | None:
    """g: the mean over finished tasks of a vector that puts 1/k on each of the task's k global experts (None before
    the first task). It needs no task id, which the test questions do not carry."""
    if not selections:
        return None
    gate = torch.zeros(experts, dtype=torch.float32)
    for chosen in selections:
        gate[list(chosen)] += 1.0 / len(chosen)
    return gate / len(selections)


@register("cl_moe")
class CLMoE(SequentialLoRA):
    Options = CLMoEOptions

    def __init__(self, recipe, options: CLMoEOptions):
        super().__init__(recipe, options)
        r, e = recipe.method.lora.r, options.experts
        if e < 1 or r % e:
            raise RecipeError(f"method.experts ({e}) must divide method.lora.r ({r}): each expert gets rank "
                              "r / experts (MCITlib UCIT: r = 96 over 6 experts)")
        if options.variant == "paper" and not (e >= TOKEN_TOP_K and 1 <= options.task_top_k <= e):
            raise RecipeError(f"method.task_top_k ({options.task_top_k}) must be between 1 and method.experts ({e}), "
                              f"and the paper variant needs at least {TOKEN_TOP_K} experts")
        for key in ("momentum", "instance_weight"):
            if not 0.0 <= getattr(options, key) <= 1.0:
                raise RecipeError(f"method.{key} must be in [0, 1], got {getattr(options, key)}")
        self.handles: list = []
        self.usage = torch.zeros(0, e, dtype=torch.long)
        """This stage's token counts per adapted layer and expert ([layers, E]; rank-local until summed)."""
        self.records: list[dict[str, Any]] = []
        """Per finished stage: its tasks, global experts S_t and counts pooled over layers."""
        self.snapshot: dict[str, torch.Tensor] = {}
        """Expert factors before the open stage (CPU), for the momentum merge."""
        self.open_stage: int | None = None
        self._gate: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    # --- structure -------------------------------------------------------------------------------------------------
    def setup(self, model):
        model = add_lora(model, self.recipe, ADAPTER)
        refs = lora_layers(model)
        with zero.gathered_parameters([ref.module.lora_A[ADAPTER].weight for ref in refs], modifier_rank=0):
            for ref in refs:
                nn.init.normal_(ref.module.lora_A[ADAPTER].weight, mean=0.0, std=A_INIT_STD)
        for index, ref in enumerate(refs):
            linear = ref.module.lora_A[ADAPTER]
            if not hasattr(ref.module, ROUTER):
                # nn.Linear's default init, as the reference's router: routing is not uniform from the first step, so
                # the first batches already produce usage counts
                setattr(ref.module, ROUTER, nn.Linear(linear.in_features, self.options.experts, bias=False,
                                                      dtype=linear.weight.dtype, device=linear.weight.device))
            self.handles.append(linear.register_forward_hook(self._route_hook(ref.module, index)))
        self.handles.append(model.register_forward_pre_hook(self._remember_mask, with_kwargs=True))
        self.usage = torch.zeros(len(refs), self.options.experts, dtype=torch.long)
        return model

    def _remember_mask(self, _module, _args, kwargs):
        """Keep the batch's attention mask so that padding positions are not counted as uses. It is kept until the
        next forward pass of the model (not cleared at its end): gradient checkpointing re-runs the layers during the
        backward pass, and those re-runs must see the same mask."""
        self._mask = kwargs.get("attention_mask")

    def prepare(self, model, stage: int, task_ids: Sequence[int]) -> None:
        super().prepare(model, stage, task_ids)
        for ref in lora_layers(model):
            getattr(ref.module, ROUTER).requires_grad_(True)

    def _route_hook(self, layer, index: int):
        """Forward hook on lora_A: scale each expert's rank channels by its gate; count usage while training."""
        experts = self.options.experts

        def hook(_module, args, output):
            gates = torch.softmax(getattr(layer, ROUTER)(args[0]).float(), dim=-1)
            if layer.training:
                if torch.is_grad_enabled():
                    self._count(index, gates.detach())
            elif self._gate is not None:
                if self._gate.device != gates.device:
                    self._gate = self._gate.to(gates.device)
                beta = self.options.instance_weight
                gates = beta * gates + (1.0 - beta) * self._gate
            return output * torch.repeat_interleave(gates.to(output.dtype), output.shape[-1] // experts, dim=-1)

        return hook

    def _count(self, index: int, gates: torch.Tensor) -> None:
        if gates.shape[-1] < TOKEN_TOP_K:
            return
        mask = self._mask
        if mask is not None and tuple(mask.shape) == tuple(gates.shape[:-1]):
            gates = gates[mask.to(gates.device).bool()]
        values, chosen = gates.reshape(-1, gates.shape[-1]).topk(TOKEN_TOP_K, dim=-1)
        chosen = chosen[values[:, 0] != values[:, 1]].flatten()
        counts = torch.bincount(chosen, minlength=gates.shape[-1])
        if self.usage.device != counts.device:
            self.usage = self.usage.to(counts.device)
        self.usage[index] += counts

    # --- the task loop ---------------------------------------------------------------------------------------------
    def before_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        self.usage = torch.zeros_like(self.usage)
        self.open_stage = stage
        self.snapshot = self._expert_factors(model) if self.options.variant == "paper" and self.records else {}

    def after_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        usage = self._reduce_usage()
        chosen = select_experts(usage, self.options.task_top_k)
        if self.options.variant == "paper" and self.records:
            self._merge(model, self.records[-1]["experts"], chosen)
        self.records.append({"stage": stage + 1, "tasks": [data.names[t] for t in task_ids], "experts": chosen,
                             "usage": [int(c) for c in usage.sum(dim=0)]})
        self.usage = torch.zeros_like(self.usage)
        self.snapshot = {}
        self.open_stage = None
        self._refresh_gate()

    def _expert_factors(self, model) -> dict[str, torch.Tensor]:
        """CPU copies of every layer's A and B (all experts), keyed `<layer>.lora_A` / `<layer>.lora_B`."""
        refs = lora_layers(model)
        params = [p for ref in refs for p in (ref.module.lora_A[ADAPTER].weight, ref.module.lora_B[ADAPTER].weight)]
        with zero.gathered_parameters(params):
            return {f"{ref.name}.{part}": getattr(ref.module, part)[ADAPTER].weight.detach().to("cpu", copy=True)
                    for ref in refs for part in ("lora_A", "lora_B")}

    def _merge(self, model, previous: Sequence[int], current: Sequence[int]) -> None:
        """theta = lambda * theta_{t-1} + (1 - lambda) * phi_t per expert, on its A rows and B columns (in float32)."""
        rank = self.recipe.method.lora.r // self.options.experts
        lam = torch.tensor(momentum_coefficients(previous, current, self.options.experts, self.options.momentum),
                           dtype=torch.float32).repeat_interleave(rank)
        with torch.no_grad():
            for ref in lora_layers(model):
                for part, shape in (("lora_A", (-1, 1)), ("lora_B", (1, -1))):
                    key = f"{ref.name}.{part}"
                    if key not in self.snapshot:
                        raise CheckpointError(
                            f"cl_moe: no snapshot of {key}: the momentum merge needs the expert values the stage "
                            "started from, which a step checkpoint of this stage keeps in method.safetensors; retrain "
                            "the stage from its start (remove checkpoints/last-step)")
                    param = getattr(ref.module, part)[ADAPTER].weight
                    weight = lam.to(param.device).view(shape)
                    old = self.snapshot[key].to(param.device, torch.float32)
                    param.copy_((weight * old + (1.0 - weight) * param.float()).to(param.dtype))

    def _reduce_usage(self) -> torch.Tensor:
        """The open stage's counts ([layers, E], CPU) summed over ranks (collective when distributed). Afterwards rank 0
        holds the sum and the other ranks zero, so that a later reduction still sums to the total."""
        local = self.usage.cpu()
        if not dist.is_distributed():
            return local
        total = torch.tensor(dist.all_gather_objects(local.tolist()), dtype=torch.long).sum(dim=0)
        self.usage = (total if dist.is_main() else torch.zeros_like(total)).to(self.usage.device)
        return total

    def _refresh_gate(self) -> None:
        self._gate = (task_level_gate([r["experts"] for r in self.records], self.options.experts)
                      if self.options.variant == "paper" else None)

    # --- state -----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        if self.open_stage is not None:
            self._reduce_usage()  # a step checkpoint: every rank is here (see the module docstring)
        return {"variant": self.options.variant, "open_stage": self.open_stage, "tasks": self.records}

    def method_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {USAGE: self.usage.detach().to("cpu", copy=True)}
        tensors.update({SNAPSHOT + key: value.clone() for key, value in self.snapshot.items()})
        return tensors

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if state.get("variant", self.options.variant) != self.options.variant:
            raise CheckpointError(f"cl_moe: the checkpoint was trained with variant {state['variant']!r}, the recipe "
                                  f"says method.variant={self.options.variant!r}; use the run's recipe")
        self.records = [dict(record) for record in state.get("tasks", [])]
        self.open_stage = state.get("open_stage")
        usage = tensors.get(USAGE)
        if usage is not None and usage.shape == self.usage.shape:
            # the saved counts are the sum over ranks: rank 0 takes them, the others continue from zero
            self.usage = (usage.to(torch.long) if dist.is_main() else torch.zeros_like(usage, dtype=torch.long)).to(
                self.usage.device)
        else:
            self.usage = torch.zeros_like(self.usage)
        self.snapshot = {key[len(SNAPSHOT):]: value.clone() for key, value in tensors.items()
                         if key.startswith(SNAPSHOT)}
        self._refresh_gate()
