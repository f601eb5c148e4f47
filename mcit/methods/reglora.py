"""RegLoRA (`reglora`): merge each task's LoRA into the base and keep the next LoRA away from the weights that mattered.

The regularisation half of SEFE (Chen et al., 2025, "SEFE: Superficial and Essential Forgetting Eliminator for
Multimodal Continual Instruction Tuning"). After task t the LoRA is folded into the frozen base (W <- W + ΔW_t,
ΔW_t = (α/r)·B·A) and the positions of the top `key_fraction` (2 %) of |ΔW_t| in every adapted matrix become "key
positions", united with those of earlier tasks. Task t+1 trains a fresh LoRA with

    loss = CE + λ · (1/N) · Σ_matrices mean_{(i,j) ∈ keys} |(B·A)_ij|        (λ = 2.5e3, N = adapted matrices)

so the new update stays near zero where earlier tasks wrote their knowledge (essential forgetting), while the rest of
the matrix is free. As in the reference, the LoRA scaling α/r is not applied inside the penalty.

How it is computed: (B·A)_ij = B_i,: · A_:,j, so the penalty needs only the rows of B and the columns of A at the key
positions (O(keys·r)), never the dense d_out × d_in product; `keyed_product` is a small autograd function whose
backward scatters the gradient back with `index_add_`, so memory stays O(keys) + one chunk. The factors are read in
forward hooks on the adapter's `lora_A`/`lora_B` modules: under ZeRO-3 a parameter is only materialised while its
module runs, so reading it later in `extra_loss` would see an empty shard. The hooks are registered in `setup`, before
any DeepSpeed engine adds its own, so they run while the weights are still gathered.

Checkpoints: key positions are flat int32 indices per matrix in `method.safetensors` (`keys.<module>`; 4 bytes per key
instead of a dense mask). Because the merges change the base weights, `state_tensors` also holds the merged weights of
the adapted matrices once a task has been merged: a resumed run loads them instead of replaying merges, so it is exact
in any precision. For LLaVA-7B that makes a stage checkpoint about the size of the language model (13 GB in bf16), the
same as saving the merged model, which the reference does.

Deviations from the reference implementation:
- The fresh LoRA of the next task is re-initialised in `after_task` (PEFT's initialisation, seeded by the run seed and
  stage), right after the merge, so the saved and evaluated model is "merged base + zero update"; the reference
  creates a new adapter object instead. The numbers are the same.
- Top-p selection uses `torch.topk`; ties at the threshold are broken by the implementation, not by index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mcit.errors import CheckpointError, RecipeError
from mcit.methods.base import TaskData, register
from mcit.methods.lora import base_weights
from mcit.methods.lora_ft import ADAPTER, SequentialLoRA
from mcit.runtime.zero import is_sharded

KEY_PREFIX = "keys."


@dataclass
class RegLoRAOptions:
    reg_lambda: float = 2.5e3
    """λ: weight of the key-position penalty (the paper's 2.5e3 for LLaVA-7B)."""
    key_fraction: float = 0.02
    """Share of each adapted matrix's entries, by |ΔW|, that become key positions after a task (2 %)."""
    chunk: int = 1 << 16
    """Key positions processed at once by the penalty (bounds its temporary memory to chunk·r floats)."""


# --- the math ---------------------------------------------------------------------------------------------------------

def top_key_positions(delta: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat (row-major) indices of the ceil(fraction·numel) entries of largest |delta|, sorted, as int32."""
    numel = delta.numel()
    if numel >= 2**31:
        raise RecipeError(f"a {tuple(delta.shape)} matrix has more entries than int32 key positions can address")
    k = max(1, math.ceil(fraction * numel))
    idx = torch.topk(delta.detach().abs().float().flatten(), k, sorted=False).indices
    return idx.sort().values.to(torch.int32)


def union_keys(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Sorted union of two int32 key sets (the keys of every task so far)."""
    if old is None or old.numel() == 0:
        return new
    return torch.unique(torch.cat([old.to(torch.int64), new.to(torch.int64)])).to(torch.int32)


class _KeyedProduct(torch.autograd.Function):
    """out_k = Σ_r B[rows_k, r] · A[r, cols_k]: the entries of B·A at the key positions only."""

    @staticmethod
    def forward(ctx, b, a, rows, cols, chunk):  # noqa: D401 - autograd signature
        # A sharded weight loses its storage when its module releases it, so keep a private fp32 copy for backward.
        bv = b.detach().to(torch.float32, copy=is_sharded(b))
        av = a.detach().to(torch.float32, copy=is_sharded(a))
        out = torch.empty(rows.numel(), dtype=torch.float32, device=bv.device)
        for s in range(0, rows.numel(), chunk):
            r, c = rows[s:s + chunk], cols[s:s + chunk]
            out[s:s + chunk] = (bv[r] * av[:, c].t()).sum(-1)
        ctx.save_for_backward(bv, av, rows, cols)
        ctx.chunk, ctx.dtypes = chunk, (b.dtype, a.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        bv, av, rows, cols = ctx.saved_tensors
        gb, ga = torch.zeros_like(bv), torch.zeros_like(av)
        grad = grad.to(torch.float32)
        for s in range(0, rows.numel(), ctx.chunk):
            r, c, g = rows[s:s + ctx.chunk], cols[s:s + ctx.chunk], grad[s:s + ctx.chunk, None]
            gb.index_add_(0, r, g * av[:, c].t())
            ga.index_add_(1, c, (g * bv[r]).t())
        return gb.to(ctx.dtypes[0]), ga.to(ctx.dtypes[1]), None, None, None


def keyed_product(b: torch.Tensor, a: torch.Tensor, keys: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """(b @ a) at the flat positions `keys` (row-major over b.shape[0] × a.shape[1]), differentiable in b and a."""
    keys = keys.to(torch.int64)
    d_in = a.shape[1]
    return _KeyedProduct.apply(b, a, keys // d_in, keys % d_in, chunk)


def key_penalty(factors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], reg_lambda: float,
                num_matrices: int | None = None, chunk: int = 1 << 16) -> torch.Tensor:
    """λ·(1/N)·Σ mean|(B·A)[keys]| over (B, A, keys) triples; N defaults to the number of triples."""
    terms = [keyed_product(b, a, k, chunk).abs().mean() for b, a, k in factors if k.numel()]
    return scaled_penalty(terms, reg_lambda, num_matrices or len(terms))


def scaled_penalty(terms: Sequence[torch.Tensor], reg_lambda: float, num_matrices: int) -> torch.Tensor:
    """λ·(1/N)·Σ terms: the per-matrix mean |ΔW| at key positions, averaged over the N keyed matrices."""
    return reg_lambda / max(1, num_matrices) * torch.stack(list(terms)).sum()


# --- the method -------------------------------------------------------------------------------------------------------

def adapted_layers(model, adapter: str = ADAPTER) -> dict[str, Any]:
    """PEFT LoRA layers (by module name) that carry `adapter`, in model order."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


@register("reglora")
class RegLoRA(SequentialLoRA):
    """One LoRA per task, merged into the base after the task; key positions of earlier tasks are penalised."""

    Options = RegLoRAOptions

    def __init__(self, recipe, options: RegLoRAOptions):
        super().__init__(recipe, options)
        if not 0 < options.key_fraction <= 1:
            raise RecipeError(f"method.key_fraction: expected a share in (0, 1], got {options.key_fraction}")
        if options.reg_lambda < 0 or options.chunk < 1:
            raise RecipeError("method.reg_lambda must be >= 0 and method.chunk >= 1")
        if recipe.model.load_in_4bit:
            raise RecipeError("method.name: reglora merges every task's LoRA into the base weights, which 4-bit "
                              "weights cannot hold exactly; set model.load_in_4bit: false")
        self.keys: dict[str, torch.Tensor] = {}
        self.merged_tasks = 0
        self._layers: dict[str, Any] = {}
        self._index: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stash: dict[str, torch.Tensor] = {}
        self._terms: dict[str, torch.Tensor] = {}

    # --- structure -------------------------------------------------------------------------------------------------
    def setup(self, model):
        model = super().setup(model)
        self._layers = adapted_layers(model)
        for name, layer in self._layers.items():
            layer.lora_A[ADAPTER].register_forward_hook(self._hook_a(name))
            layer.lora_B[ADAPTER].register_forward_hook(self._hook_b(name))
        return model

    # --- penalty ---------------------------------------------------------------------------------------------------
    def _hook_a(self, name: str):
        def hook(module, inputs, output):
            if name in self.keys and module.training and torch.is_grad_enabled():
                w = module.weight
                # a clone is still differentiable w.r.t. the parameter, and survives ZeRO-3 releasing the shard
                self._stash[name] = w.clone() if is_sharded(w) else w
        return hook

    def _hook_b(self, name: str):
        def hook(module, inputs, output):
            a = self._stash.pop(name, None)
            if a is None:
                return
            rows, cols = self._rows_cols(name, a.shape[1])
            value = _KeyedProduct.apply(module.weight, a, rows, cols, self.options.chunk)
            # keyed by module: a recomputed forward (gradient checkpointing) overwrites instead of double counting
            self._terms[name] = value.abs().mean()
        return hook

    def _rows_cols(self, name: str, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._index:
            keys = self.keys[name].to(torch.int64)
            self._index[name] = (keys // d_in, keys % d_in)
        return self._index[name]

    def extra_loss(self, model, batch: dict, outputs) -> torch.Tensor | None:
        terms, self._terms = self._terms, {}
        self._stash.clear()
        if not terms or self.options.reg_lambda == 0:
            return None
        return scaled_penalty(list(terms.values()), self.options.reg_lambda, len(self.keys))

    # --- merge -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def after_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        """W <- W + ΔW, new key positions united with the old, then a fresh LoRA for the next task.

        The runner calls this inside a gather of all parameters with rank 0 as the writer, so under ZeRO-3 the full
        weights are visible here and rank 0's merged values are re-sharded when the call returns.
        """
        for name, layer in self._layers.items():
            delta = layer.get_delta_weight(ADAPTER)
            self.keys[name] = union_keys(self.keys.get(name), top_key_positions(delta, self.options.key_fraction))
            base = layer.get_base_layer().weight
            base.add_(delta.to(base.dtype))
        self._index.clear()
        self.merged_tasks = stage + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.recipe.seed * 1_000_003 + 7919 * (stage + 1))
            for layer in self._layers.values():
                layer.reset_lora_parameters(ADAPTER, True)

    # --- state -----------------------------------------------------------------------------------------------------
    def state_tensors(self, model) -> dict[str, torch.Tensor]:
        tensors = super().state_tensors(model)
        if self.merged_tasks:
            tensors.update(base_weights(self._layers))
        return tensors

    def method_tensors(self) -> dict[str, torch.Tensor]:
        return {KEY_PREFIX + name: keys for name, keys in self.keys.items()}

    def state(self) -> dict[str, Any]:
        return {"merged_tasks": self.merged_tasks, "key_fraction": self.options.key_fraction,
                "key_positions": {n: int(k.numel()) for n, k in self.keys.items()}}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.merged_tasks = int(state.get("merged_tasks", 0))
        self.keys = {k[len(KEY_PREFIX):]: v.to(torch.int32) for k, v in tensors.items() if k.startswith(KEY_PREFIX)}
        unknown = sorted(set(self.keys) - set(self._layers)) if self._layers else []
        if unknown:
            raise CheckpointError(f"method.safetensors holds key positions for {unknown[0]!r}, which is not an "
                                  "adapted matrix of this model (was the checkpoint written with other "
                                  "lora.target_modules?)")
        self._index.clear()
