"""KeepLoRA (`keeplora`): a LoRA whose input side lies outside the subspace earlier knowledge uses, merged after
every task.

Luo et al., "KeepLoRA: Continual Learning with Residual Gradient Adaptation", ICLR 2026 (official code:
MaolinLuo/KeepLoRA, whose MCITlib/ folder runs it on UCIT and MLLM-DCL). Every adapted weight W (d_out × d_in) of the
language model keeps a *protected basis* P (k × d_in, orthonormal rows) of input directions:

- before the first task, P = the top right singular vectors of the pre-trained W up to `weight_energy` (60 %) of
  its spectral energy (strictly below it, as in the reference: the largest k with Σ_{i≤k} σ_i² / Σσ² < 0.6, k ≥ 1);
- before task t, G = dL/dW averaged over `grad_fraction` (20 %) of the task's training samples, evenly spaced;
  G is projected onto the complement of P (G ← G − G Pᵀ P) and the LoRA's A (r × d_in) is set to the top-r right
  singular vectors of the projected G. A stays frozen; only B (zero at the start) and the projector train, with the
  plain cross-entropy. Because A Pᵀ = 0, the update ΔW = (α/r)·B·A satisfies ΔW Pᵀ = 0: inputs inside the protected
  subspace see exactly the old weight;
- after task t the LoRA is merged (W ← W + ΔW, B ← 0), G is recomputed on the merged model with the data of the task
  just trained, and P grows GPM-style: directions of the residual G − G Pᵀ P (its top right singular vectors) are
  appended until P holds `grad_energy` (99 %) of ‖G‖², i.e. ‖G Pᵀ‖² ≥ 0.99·‖G‖². The next task starts from the
  merged model and inference is that one model, with nothing routed.

How dL/dW is obtained: forward hooks on the adapted layers keep each layer's input x and hook the gradient of its
output; Σ_tokens outer(dL/dy, x) is summed into one fp32 matrix per layer. No weight gets requires_grad, so autograd
never materialises a weight gradient; the products run in the compute dtype (bf16 under autocast) and are summed in
fp32. Outputs of adapted layers that nothing upstream makes differentiable are turned into leaves that require grad,
which leaves every gradient downstream of them exact. The pass runs in evaluation mode (no dropout, no gradient
checkpointing) with every parameter frozen for its duration, so it leaves no `.grad` behind for the optimizer.

Memory and time, estimated (not measured) at LLaVA-1.5-7B's shape: 32 layers × (q, k, v, o: 4096 × 4096; gate, up:
11008 × 4096; down: 4096 × 11008) = 224 matrices, 6.48 G entries.
- Gradient sums: 4 bytes per entry = 25.9 GB on the GPU next to the 13.5 GB bf16 model when all 224 layers are
  captured in one pass (`layers_per_pass: 0`); `layers_per_pass: 56` holds 6.5 GB and runs the data pass 4 times.
- SVDs run one matrix at a time on the model's device in fp32 (never all layers at once): inputs 64 MB (4096²) or
  180 MB (11008 × 4096), U/S/Vh and the residual about 3× that, so under 1 GB of workspace. A dense fp32 SVD costs
  roughly 2-4 s for 4096² and 4-8 s for 11008 × 4096 on an A100-class GPU, so one sweep over 224 matrices is about
  10-20 min on one GPU; the initial weight sweep runs once, then one top-r sweep before (seconds with `init_svd:
  lowrank`) and one full sweep after each task. Under several ranks each rank solves every world_size-th matrix.
- The gradient pass: batch 1 (the reference's), one forward + backward plus the outer products (2 · tokens · 6.48 G
  FLOP, ~9 TFLOP for 700 tokens, ~0.03 s in bf16) ≈ 0.2-0.3 s per sample on one A100; 20 % of a 20k-sample task is
  ~4k samples ≈ 15-20 min on one GPU, divided by the number of ranks.
- Protected bases live on the CPU in fp32: Σ k·d_in·4 bytes, at most Σ d_in² · 4 = 28 GB for all 224 matrices (a
  full basis); typically a fraction of that. They are also what `method.safetensors` holds.

Checkpoints: `method.safetensors` holds every basis (`basis.<module>`, fp32), and once a task has been merged
`model.safetensors` holds the merged weights of the adapted layers (`<module>.base_layer.weight`, 13 GB in bf16 at
7B, as with RegLoRA) besides the LoRA factors and the projector; a resumed run loads them instead of replaying merges,
which is exact in any precision.

Deviations from the reference implementation (each on purpose):
- dL/dW comes from hooks (the same value) in evaluation mode; the reference backpropagates into the weights in train
  mode with gradient checkpointing (LLaMA has no dropout, and B = 0 while the gradient is taken, so the value is the
  same) and sums the gradients in the weights' half-precision dtype; here products are summed in fp32.
- A is the exact top-r SVD by default; the reference uses the randomized `torch.svd_lowrank(q=r)`, available as
  `init_svd: lowrank`. A is projected onto the complement of P once more after the SVD: that changes nothing for
  directions of non-zero singular value, and keeps A outside P where the projected gradient has rank < r (its null
  directions could otherwise point into P).
- New basis directions are re-orthogonalised against P (one projection + QR) to stop float error accumulating over
  tasks; the total energy is ‖G‖²_F instead of the sum of a second full SVD's σ² (the same number).
- Bases are fp32; the reference stores the weight-derived basis in the weight dtype (bf16).
- With several ranks the sampled batches are split across ranks and the sums reduced, so the mean is over all
  batches; the reference averages per-GPU means, which differs when the GPUs' chunks have unequal sizes.
- The basis is not extended after the final task of a run: nothing trains after it (the reference extends it anyway).
- ZeRO-3 is refused: the method needs every adapted weight whole on every rank (gradient pass, SVD, merge) outside
  the training engine; ZeRO-2 keeps weights whole and shards only optimizer state and gradients.

MCITlib's KeepLoRA scripts differ from the paper and the official code in ways treated as bugs and not reproduced:
α = 2r instead of r/4; LoRA rank 16 on UCIT while the gradient SVD used rank 32; every merge onto the original base
(dropping earlier tasks); task 2's subspace computed on task 3's data.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mcit.data.collate import Encoder, PixelCache, collate
from mcit.errors import CheckpointError, RecipeError
from mcit.methods.base import TaskData, register
from mcit.methods.lora import base_weights, lora_layers
from mcit.methods.lora_ft import ADAPTER, SequentialLoRA
from mcit.runtime import dist
from mcit.runtime.placement import module_device, to_device
from mcit.runtime.precision import autocast, eval_mode
from mcit.runtime.zero import is_sharded, zero_stage

logger = logging.getLogger(__name__)

BASIS_PREFIX = "basis."


@dataclass
class KeepLoRAOptions:
    weight_energy: float = 0.6
    """Share of each pre-trained W's spectral energy whose input directions are protected before the first task."""
    grad_energy: float = 0.99
    """After each task the protected basis grows until it holds this share of the task gradient's energy."""
    grad_fraction: float = 0.2
    """Share of a task's training samples (evenly spaced) the gradient is averaged over (UCIT 0.2; CL-VISTA 0.1)."""
    grad_batch_size: int = 1
    """Samples per forward pass of the gradient pass; 1 (the reference) makes G the mean of per-sample gradients."""
    layers_per_pass: int = 0
    """Adapted layers whose gradient one data pass collects (0: all); bounds the fp32 gradient sums held at once."""
    init_svd: Literal["exact", "lowrank"] = "exact"
    """How A's top-r singular vectors are found: exact SVD, or torch.svd_lowrank(q=r) as in the reference."""


# --- the math, one matrix at a time ---------------------------------------------------------------------------------

def project_out(matrix: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """`matrix` with its rows' components inside span(basis rows) removed: M − (M Pᵀ) P (P orthonormal rows)."""
    if basis is None or basis.numel() == 0:
        return matrix
    basis = basis.to(matrix.device, matrix.dtype)
    return matrix - (matrix @ basis.T) @ basis


def captured_energy(grad: torch.Tensor, basis: torch.Tensor | None) -> float:
    """‖G Pᵀ‖² / ‖G‖²: the share of G's energy inside the protected subspace (1.0 for a zero G)."""
    g = grad.float()
    total = float(g.pow(2).sum())
    if total == 0:
        return 1.0
    return 1.0 - float(project_out(g, basis).pow(2).sum()) / total


def weight_basis(weight: torch.Tensor, energy: float) -> torch.Tensor:
    """The top right singular vectors of W (rows, k × d_in) while their cumulative energy stays below `energy`
    (k ≥ 1), as the reference's weight step counts them."""
    _, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    power = s.pow(2)
    ratio = torch.cumsum(power, 0) / power.sum()
    k = max(1, int((ratio < energy).sum()))
    return vh[:k].contiguous()


def gradient_init(grad: torch.Tensor, basis: torch.Tensor | None, r: int,
                  solver: Literal["exact", "lowrank"] = "exact") -> torch.Tensor:
    """A (r × d_in): the top-r right singular vectors of G with the protected directions projected out."""
    g = project_out(grad.float(), basis)
    if solver == "lowrank":
        _, _, v = torch.svd_lowrank(g, q=r)
        a = v.T
    else:
        _, _, vh = torch.linalg.svd(g, full_matrices=False)
        a = vh[:r]
    return project_out(a, basis).contiguous()


def extend_basis(grad: torch.Tensor, basis: torch.Tensor | None, energy: float) -> torch.Tensor:
    """P with directions of G's residual appended until it holds `energy` of ‖G‖² (GPM's criterion), capped at
    d_in directions. The old rows are kept as they are, so what was protected stays protected."""
    g = grad.float()
    d_in = g.shape[1]
    old = basis.to(g.device, torch.float32) if basis is not None else g.new_zeros(0, d_in)
    total = g.pow(2).sum()
    if total == 0 or old.shape[0] >= d_in:
        return old
    residual = project_out(g, old)
    captured = 1.0 - residual.pow(2).sum() / total
    if captured >= energy:
        return old
    _, s, vh = torch.linalg.svd(residual, full_matrices=False)
    reached = captured + torch.cumsum(s.pow(2) / total, 0)
    need = min(int((reached < energy).sum()) + 1, s.numel(), d_in - old.shape[0])
    new = project_out(vh[:need], old)
    new = torch.linalg.qr(new.T).Q.T  # orthonormal again after the projection (float error only)
    return torch.cat([old, new]).contiguous()


def evenly_spaced(count: int, fraction: float) -> list[int]:
    """Indices of int(count · fraction) samples spread evenly from the first to the last (at least one), as the
    reference picks them."""
    if count == 0:
        return []
    chosen = max(1, int(count * fraction))
    return torch.linspace(0, count - 1, chosen).long().tolist()


# --- dL/dW of the adapted layers --------------------------------------------------------------------------------------

class GradientCapture:
    """Σ over tokens of outer(dL/dy, x) for each watched layer (= dL/dW of its weight), summed over backward passes
    into fp32 matrices, without any weight requiring grad. Use as a context manager around forward + backward."""

    def __init__(self, layers: dict[str, torch.nn.Module]):
        self.layers = layers
        self.sums: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> GradientCapture:
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or not torch.is_tensor(output):
                return
            x = inputs[0].detach()
            if not output.requires_grad:
                # nothing upstream is differentiable: this output becomes a leaf, and everything after it records a
                # graph from here, so the gradients reaching it (and every later layer) are the full ones
                output.requires_grad_(True)
            # the input rides in the closure: a recomputed forward registers on a tensor backward never reaches
            output.register_hook(lambda grad: self._add(name, grad, x))
        return hook

    def _add(self, name: str, grad: torch.Tensor, x: torch.Tensor) -> None:
        g = grad.reshape(-1, grad.shape[-1])
        inputs = x.reshape(-1, x.shape[-1])
        dtype = grad.dtype if grad.dtype in (torch.bfloat16, torch.float16) else torch.float32
        product = g.T.to(dtype) @ inputs.to(dtype)
        total = self.sums.get(name)
        if total is None:
            self.sums[name] = product.float()
        else:
            total.add_(product)



@contextlib.contextmanager
def _all_frozen(model) -> Iterator[None]:
    """No parameter requires grad in the body (so backward leaves no `.grad` for the optimizer to find)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def task_gradients(model, layers: dict[str, torch.nn.Module], batches: Iterable[dict],
                   compute_dtype: str | None = None) -> dict[str, torch.Tensor]:
    """Σ over `batches` of dL/dW (L: each batch's mean token loss) for every layer in `layers`, fp32, on the
    model's device; a layer no batch reached gets zeros (every rank must hold a matrix to reduce)."""
    device = module_device(model)
    with _all_frozen(model), eval_mode(model), torch.enable_grad(), GradientCapture(layers) as capture:
        for batch in batches:
            batch = to_device(batch, device)
            with autocast(compute_dtype, device):
                loss = model(**batch).loss
            if loss.requires_grad:
                loss.backward()
    sums = capture.sums
    for name, module in layers.items():
        if name not in sums:
            sums[name] = torch.zeros(module.get_base_layer().weight.shape, dtype=torch.float32, device=device)
    return sums


# --- ranks: each matrix is reduced to one owner, solved there, and its result sent to all -----------------------------

def _reduce_to(tensor: torch.Tensor, owner: int) -> None:
    """Sum `tensor` over ranks into the owner's copy (collective; a no-op in one process)."""
    if not dist.is_distributed():
        return
    device = dist.collective_device()
    buffer = tensor if tensor.device == device else tensor.to(device)
    torch.distributed.reduce(buffer, dst=owner)
    if buffer is not tensor and dist.rank() == owner:
        tensor.copy_(buffer)


def _broadcast_rows(value: torch.Tensor | None, owner: int, width: int) -> torch.Tensor:
    """The owner's (rows × width) fp32 matrix on every rank, on the CPU (collective; `value` in one process)."""
    if not dist.is_distributed():
        assert value is not None
        return value
    device = dist.collective_device()
    mine = dist.rank() == owner
    rows = torch.tensor([value.shape[0] if mine and value is not None else 0], device=device)
    torch.distributed.broadcast(rows, src=owner)
    buffer = (value.to(device, torch.float32).contiguous() if mine and value is not None
              else torch.empty(int(rows.item()), width, dtype=torch.float32, device=device))
    torch.distributed.broadcast(buffer, src=owner)
    return buffer.cpu()


ZERO3_CONFLICT = ("train.deepspeed: keeplora needs every adapted weight whole on each rank for its gradient SVDs and "
                  "merges between tasks, which ZeRO-3 shards; use train.deepspeed=zero2")


# --- the method -------------------------------------------------------------------------------------------------------

@register("keeplora")
class KeepLoRA(SequentialLoRA):
    """One LoRA with a frozen, gradient-chosen A outside the protected subspace; merged after every task."""

    Options = KeepLoRAOptions

    def __init__(self, recipe, options: KeepLoRAOptions):
        super().__init__(recipe, options)
        for key in ("weight_energy", "grad_energy", "grad_fraction"):
            if not 0 < getattr(options, key) <= 1:
                raise RecipeError(f"method.{key}: expected a share in (0, 1], got {getattr(options, key)}")
        if options.grad_batch_size < 1 or options.layers_per_pass < 0:
            raise RecipeError("method.grad_batch_size must be >= 1 and method.layers_per_pass >= 0 (0: all layers)")
        if zero_stage(recipe.train.deepspeed) >= 3:
            raise RecipeError(ZERO3_CONFLICT)
        if recipe.model.full_finetune:
            raise RecipeError("model.full_finetune: keeplora trains a LoRA (B only); set model.full_finetune: false")
        if recipe.model.load_in_4bit:
            raise RecipeError("model.load_in_4bit: keeplora takes SVDs of the base weights and merges every task into "
                              "them, which 4-bit weights cannot hold; set model.load_in_4bit: false")
        self.bases: dict[str, torch.Tensor] = {}
        """Protected input directions per adapted layer (k × d_in, orthonormal rows, fp32, on the CPU)."""
        self.merged_tasks = 0
        self.history: list[dict[str, Any]] = []
        self._layers: dict[str, Any] = {}

    # --- structure -------------------------------------------------------------------------------------------------
    def setup(self, model):
        if any(is_sharded(p) for p in model.parameters()):
            raise RecipeError(ZERO3_CONFLICT)
        model = super().setup(model)
        self._layers = {ref.name: ref.module for ref in lora_layers(model)}
        r = self.recipe.method.lora.r
        for name, layer in self._layers.items():
            if r > min(layer.get_base_layer().weight.shape):
                raise RecipeError(f"method.lora.r: {r} is larger than {name}'s smaller side "
                                  f"{tuple(layer.get_base_layer().weight.shape)}; A's rows are singular vectors")
        return model

    def prepare(self, model, stage: int, task_ids: Sequence[int]) -> None:
        """Train B (and the recipe's extras); A is fixed by `before_task` and never trains."""
        super().prepare(model, stage, task_ids)
        for layer in self._layers.values():
            layer.lora_A[ADAPTER].weight.requires_grad_(False)

    # --- the two sweeps around a task ------------------------------------------------------------------------------
    @torch.no_grad()
    def before_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        """A ← top-r right singular vectors of the task's projected gradient; B ← 0."""
        if not self.bases:
            self._init_bases()
        r, solver = self.recipe.method.lora.r, self.options.init_svd

        def solve(name: str, grad: torch.Tensor) -> torch.Tensor:
            return gradient_init(grad, self.bases.get(name), r, solver)

        for name, a in self._sweep(model, self._task_samples(task_ids, data), solve):
            layer = self._layers[name]
            weight = layer.lora_A[ADAPTER].weight
            weight.copy_(a.to(weight.device, weight.dtype))
            layer.lora_B[ADAPTER].weight.zero_()

    @torch.no_grad()
    def after_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        """W ← W + ΔW and B ← 0; then, unless this was the run's last task, the protected basis grows to hold
        `grad_energy` of the merged model's gradient on this task."""
        for layer in self._layers.values():
            base = layer.get_base_layer().weight
            base.add_(layer.get_delta_weight(ADAPTER).to(base.dtype))
            layer.lora_B[ADAPTER].weight.zero_()
        self.merged_tasks = stage + 1
        if data is not None and stage >= len(self.schedule(len(data.names))) - 1:
            return
        energy = self.options.grad_energy

        def solve(name: str, grad: torch.Tensor) -> torch.Tensor:
            return extend_basis(grad, self.bases.get(name), energy)

        for name, basis in self._sweep(model, self._task_samples(task_ids, data), solve):
            self.bases[name] = basis
        self._record(f"after stage {stage + 1}")

    def _init_bases(self) -> None:
        energy = self.options.weight_energy

        def solve(name: str) -> torch.Tensor:
            return weight_basis(self._layers[name].get_base_layer().weight, energy)

        for name, basis in self._spread(list(self._layers), solve):
            self.bases[name] = basis
        self._record("pre-trained weights")

    def _task_samples(self, task_ids: Sequence[int], data: TaskData) -> list:
        samples = [s for t in task_ids for s in data.train[data.names[t]]]
        return [samples[i] for i in evenly_spaced(len(samples), self.options.grad_fraction)]

    def _batches(self, samples: list) -> Iterator[dict]:
        if self.ctx is None:
            raise RecipeError("keeplora needs the run context (processor) for its gradient pass: attach() the method")
        encoder = Encoder.from_recipe(self.ctx.processor, self.recipe)
        pixels = PixelCache.from_recipe(self.ctx.processor, self.recipe)
        size = self.options.grad_batch_size
        for k in range(0, len(samples), size):
            yield collate([encoder.encode(s, k + i) for i, s in enumerate(samples[k:k + size])],
                          encoder.tokenizer.pad_token_id, pixels)

    def _sweep(self, model, samples: list, solve: Callable[[str, torch.Tensor], torch.Tensor]
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """For each group of `layers_per_pass` layers: one data pass collecting their gradients (this rank's share
        of the batches), then `solve(name, mean gradient)` per layer, one matrix at a time."""
        names = list(self._layers)
        per_pass = self.options.layers_per_pass or len(names)
        size = self.options.grad_batch_size
        groups = [samples[k:k + size] for k in range(0, len(samples), size)]
        mine = [s for group in groups[dist.rank()::dist.world_size()] for s in group]
        for start in range(0, len(names), per_pass):
            group = names[start:start + per_pass]
            sums = task_gradients(model, {n: self._layers[n] for n in group}, self._batches(mine),
                                  self.recipe.model.autocast)
            for i, name in enumerate(group):
                owner = i % dist.world_size()
                _reduce_to(sums[name], owner)
                if owner != dist.rank():
                    del sums[name]

            def mean_gradient(name: str, sums: dict[str, torch.Tensor] = sums) -> torch.Tensor:
                return solve(name, sums.pop(name).div_(max(1, len(groups))))

            yield from self._spread(group, mean_gradient)

    def _spread(self, names: list[str], solve: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """`solve(name)` for every name, computed by rank i % world_size for the i-th name (all of them in one
        process), each result returned on every rank as an fp32 CPU matrix."""
        results = {}
        for i, name in enumerate(names):
            if i % dist.world_size() == dist.rank():
                results[name] = solve(name).float().cpu()
        for i, name in enumerate(names):
            width = self._layers[name].get_base_layer().weight.shape[1]
            yield name, _broadcast_rows(results.pop(name, None), i % dist.world_size(), width)

    def _record(self, moment: str) -> None:
        shares = [self.bases[n].shape[0] / self._layers[n].get_base_layer().weight.shape[1] for n in self.bases]
        entry = {"after": moment, "directions": sum(b.shape[0] for b in self.bases.values()),
                 "mean_share": round(sum(shares) / max(1, len(shares)), 6),
                 "min_share": round(min(shares, default=0.0), 6), "max_share": round(max(shares, default=0.0), 6)}
        self.history.append(entry)
        logger.info("keeplora: protected basis %s", entry)

    # --- state -----------------------------------------------------------------------------------------------------
    def state_tensors(self, model) -> dict[str, torch.Tensor]:
        tensors = super().state_tensors(model)
        if self.merged_tasks:
            tensors.update(base_weights(self._layers))
        return tensors

    def method_tensors(self) -> dict[str, torch.Tensor]:
        return {BASIS_PREFIX + name: basis.contiguous() for name, basis in self.bases.items()}

    def state(self) -> dict[str, Any]:
        return {"merged_tasks": self.merged_tasks, "weight_energy": self.options.weight_energy,
                "grad_energy": self.options.grad_energy, "history": self.history,
                "protected_directions": {n: int(b.shape[0]) for n, b in self.bases.items()}}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.merged_tasks = int(state.get("merged_tasks", 0))
        self.history = list(state.get("history", []))
        self.bases = {k[len(BASIS_PREFIX):]: v.float().cpu() for k, v in tensors.items() if k.startswith(BASIS_PREFIX)}
        unknown = sorted(set(self.bases) - set(self._layers)) if self._layers else []
        if unknown:
            raise CheckpointError(f"method.safetensors holds a protected basis for {unknown[0]!r}, which is not an "
                                  "adapted layer of this model (was the checkpoint written with other "
                                  "lora.target_modules?)")
