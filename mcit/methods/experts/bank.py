"""The expert layers' math: every expert's LoRA factors stacked (mixed per sample) or fused into one delta, and
routed inference switched on for a block (PEFT's own adapter path off, a forward hook adding the delta)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mcit.errors import CheckpointError, EvalError, RecipeError
from mcit.methods.lora import LoraLayerRef, lora_layers

ROUTED = "__mcit_routed__"
"""An adapter name no layer holds: PEFT skips it, which switches PEFT's adapter path off without touching weights."""
FUSIONS = ("sum_b_sum_a", "sum_ba")


@dataclass
class Factors:
    """A low-rank delta `b @ a` (a: R x d_in, b: d_out x R, scaling folded into b) or a dense one (d_out x d_in)."""

    a: torch.Tensor | None
    b: torch.Tensor | None
    ranks: list[int]
    dense: torch.Tensor | None = None
    _casts: dict = field(default_factory=dict, repr=False, compare=False)
    """Factors in the compute dtype (autocast runs in bf16), made once instead of on every call."""

    def _as(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        tensor = getattr(self, name)
        if tensor.dtype == dtype:
            return tensor
        key = (name, dtype)
        if key not in self._casts:
            self._casts[key] = tensor.to(dtype)
        return self._casts[key]

    def _rank_index(self, device: torch.device) -> torch.Tensor:
        """Expert index of every rank channel, so per-expert weights expand to channels with one gather."""
        key = ("rank_index", device)
        if key not in self._casts:
            self._casts[key] = torch.repeat_interleave(torch.arange(len(self.ranks), device=device),
                                                       torch.tensor(self.ranks, device=device))
        return self._casts[key]

    def delta(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's extra output for input x (N, ..., d_in); `weights` (N, E) scales each expert per sample."""
        if self.dense is not None:
            return x @ self._as("dense", x.dtype).T
        h = x @ self._as("a", x.dtype).T
        if weights is not None:
            scale = weights.to(h.dtype)[:, self._rank_index(h.device)]
            h = h * scale.view(scale.shape[0], *([1] * (h.dim() - 2)), scale.shape[-1])
        return h @ self._as("b", h.dtype).T


def _expert_factors(module, experts: Sequence[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    missing = [e for e in experts if e not in module.lora_A]
    if missing:
        raise CheckpointError(f"LoRA layer has no expert adapter {missing[0]!r} (has {list(module.lora_A)})")
    a = [module.lora_A[e].weight.detach() for e in experts]
    b = [module.lora_B[e].weight.detach() * module.scaling[e] for e in experts]
    return a, b


def stacked_factors(module, experts: Sequence[str]) -> Factors:
    a, b = _expert_factors(module, experts)
    return Factors(torch.cat(a, dim=0).clone(), torch.cat(b, dim=1).clone(), [t.shape[0] for t in a])


def fused_factors(module, experts: Sequence[str], mode: str) -> Factors:
    """One delta for all experts: `sum_ba` (exact sum of deltas) or `sum_b_sum_a` (the HiDe reference)."""
    if mode not in FUSIONS:
        raise RecipeError(f"method.fusion: unknown mode {mode!r}; choose one of {', '.join(FUSIONS)}")
    a, b = _expert_factors(module, experts)
    if mode == "sum_b_sum_a":
        ranks = {t.shape[0] for t in a}
        if len(ranks) != 1:
            raise RecipeError(f"method.fusion sum_b_sum_a needs experts of one rank, got ranks {sorted(ranks)}")
        fa, fb = torch.stack(a).sum(0), torch.stack(b).sum(0)
    else:
        fa, fb = torch.cat(a, dim=0), torch.cat(b, dim=1)
    d_out, d_in, r = fb.shape[0], fa.shape[1], fa.shape[0]
    if r * (d_in + d_out) > d_in * d_out:  # a dense delta is cheaper than the factors
        return Factors(None, None, [r], dense=(fb @ fa).contiguous())
    return Factors(fa.clone(), fb.clone(), [r])


class ExpertBank:
    """The expert layers of one model and their per-stage caches of stacked / fused factors."""

    def __init__(self, model):
        self.model = model
        self._cache: dict[tuple, Factors] = {}

    def layers(self) -> list[LoraLayerRef]:
        return lora_layers(self.model)

    def invalidate(self) -> None:
        """Drop cached factors: call whenever expert weights may have changed (new stage, loaded state)."""
        self._cache.clear()

    def factors(self, ref: LoraLayerRef, experts: Sequence[str], fusion: str | None) -> Factors:
        key = (ref.name, tuple(experts), fusion)
        if key not in self._cache:
            self._cache[key] = (stacked_factors(ref.module, experts) if fusion is None
                                else fused_factors(ref.module, experts, fusion))
        return self._cache[key]

    @contextlib.contextmanager
    def routed(self, experts: Sequence[str], weights: Callable[[int], torch.Tensor] | None,
               fused_layers: set[int] | None = None, fusion: str = "sum_ba") -> Iterator[None]:
        """Inside: layers in `fused_layers` add the fused delta, all others the per-sample mixture.

        `weights(n)` returns the (n, len(experts)) weights of the current batch (n rows).
        """
        fused_layers = fused_layers or set()
        handles, saved = [], []
        refs = self.layers()
        try:
            for ref in refs:
                if getattr(ref.module, "merged", False):
                    raise EvalError(f"{ref.name}: an adapter is merged into the base weights; unmerge before routed "
                                    "inference")
                factors = self.factors(ref, experts, fusion if ref.index in fused_layers else None)
                mixed = ref.index not in fused_layers
                # PEFT's set_adapter also sets requires_grad; the flags are put back exactly on exit
                saved.append((ref.module, ref.module.active_adapters,
                              [(p, p.requires_grad) for p in ref.module.parameters()]))
                ref.module.set_adapter([ROUTED])
                handles.append(ref.module.register_forward_hook(delta_hook(factors, weights if mixed else None)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, active, grads in saved:
                module.set_adapter(active)
                for param, flag in grads:
                    param.requires_grad_(flag)


def delta_hook(factors: Factors, weights: Callable[[int], torch.Tensor] | None):
    def hook(_module, args, output):
        x = args[0]
        w = weights(x.shape[0]) if weights is not None else None
        return output + factors.delta(x, w).to(output.dtype)

    return hook
