"""Merge several task LoRAs into one adapter, for exporting a single artifact from a continual run.

Inputs are PEFT-style state dicts, one per task: keys ending in `lora_A.weight` (r x d_in) and `lora_B.weight`
(d_out x r), optionally with an adapter name before `.weight` (`lora_A.default.weight`, as in a model state dict).
A LoRA contributes dW = s * B @ A with s = lora_alpha / r (alpha / sqrt(r) with rsLoRA).

Output convention (every method): the source scaling s is folded into the merged tensors, so the merged adapter is
meant to be served with scaling 1, i.e. `lora_alpha == r_out` and `use_rslora=False` (`merged_lora_config` builds
that config). This is also what PEFT's `add_weighted_adapter` produces for non-rsLoRA sources.

What each method gives (A_t, B_t per task, w_t the task weight):
- `linear` (PEFT): A = sum_t sqrt(w_t s) A_t, B = sum_t sqrt(w_t s) B_t. A and B are combined *separately*, so
  B @ A = sum_t w_t s B_t A_t + sum_{t != u} sqrt(w_t w_u) s B_t A_u: cross terms appear, and it is NOT the average
  of the dW's (it only is when the task LoRAs share a subspace). Cheap, same rank, a rough approximation.
- `cat` (PEFT semantics, computed here): A = concat_t(w_t s A_t) along ranks, B = concat_t(B_t). Exact:
  B @ A = sum_t w_t s B_t A_t, at rank sum_t r_t. With weights 1 it equals the summed forward of O-LoRA and of
  HiDe-style per-task experts.
- `ties`, `dare_linear`, `dare_ties` (PEFT `merge_utils`): the linear rule above with TIES trimming / sign election
  (keep the top `density` magnitudes, disjoint mean of the agreeing signs) or DARE random dropping with 1/density
  rescaling, applied to the A's and to the B's independently — again not a merge of the dW's.
- `copa` (CoPA-Merging / RobustMerge, as the CoPA paper describes it): prune each task matrix to its
  top `density` magnitudes; A = sum_t coef * masked A_t; per rank row of A_t the ratio
  s_t = sum|A_t| / sum|masked A_t|, clamped from below at its `clamp_quantile` quantile, weighs the B columns:
  B[:, k] = sum_t coef * s_t[k] * masked B_t[:, k] / sum_t s_t[k]. Task weights are not part of the method.
  Edge case the rule leaves open (our choice): a rank row whose kept entries are all zero has an infinite ratio; it
  takes the largest finite ratio of that task (1 if none). The source scaling is folded into each B_t first.

`merge_loras` works on state dicts (what the run folder holds); `merge_with_peft` does the same through a live
`PeftModel` and PEFT's `add_weighted_adapter`. They agree (tests/export/test_merge.py checks it), except that
`merge_with_peft` refuses rsLoRA sources: PEFT keeps `use_rslora` on the merged config, so its scaling becomes
sqrt(r_out) instead of 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
from peft.utils import merge_utils

from mcit.errors import McitError

PEFT_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
METHODS = (*PEFT_METHODS, "cat", "copa")
DEFAULT_DENSITY = 0.2  # fraction of entries kept by ties / dare / copa (CoPA's 20 %; TIES' usual setting)
COPA_COEF = 2.0
COPA_CLAMP_QUANTILE = 0.8

_LORA_KEY = re.compile(r"^(?P<prefix>.*)\.lora_(?P<side>[AB])(?P<name>\.[^.]+)?\.weight$")

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


def is_lora_key(key: str) -> bool:
    """True for `...lora_A[.name].weight` / `...lora_B[.name].weight` keys."""
    return _LORA_KEY.match(key) is not None


def split_lora_state(state: StateDict) -> tuple[StateDict, StateDict]:
    """Split a checkpoint into (LoRA tensors, everything else, e.g. the projector) for the two merge functions."""
    lora = {k: v for k, v in state.items() if is_lora_key(k)}
    rest = {k: v for k, v in state.items() if not is_lora_key(k)}
    return lora, rest


def default_weights(method: str, num_tasks: int) -> list[float]:
    """Task weights used when none are given.

    `linear` / `dare_linear` average (1/T) so the merged update keeps the scale of one task; `cat` uses 1 so the
    result is the exact sum (the multi-LoRA forward); `ties` / `dare_ties` use 1 because their disjoint merge already
    averages the agreeing entries. `copa` takes no weights.
    """
    if method in ("linear", "dare_linear"):
        return [1.0 / num_tasks] * num_tasks
    return [1.0] * num_tasks


def merge_loras(
    adapters: Sequence[StateDict],
    method: str,
    weights: Sequence[float] | None = None,
    *,
    scaling: float | Sequence[float] = 1.0,
    density: float = DEFAULT_DENSITY,
    majority_sign_method: str = "total",
    seed: int | None = None,
    coef: float = COPA_COEF,
    clamp_quantile: float = COPA_CLAMP_QUANTILE,
) -> StateDict:
    """Merge per-task LoRA state dicts into one (see the module docstring for what each method computes).

    `scaling` is each source's lora_alpha / r (one value, or one per task); it is folded into the result, which is
    to be served with lora_alpha == r_out. `seed` makes the DARE methods reproducible without touching the global
    RNG stream. Tensors are merged in float32 and returned in the first adapter's dtype.
    """
    if method not in METHODS:
        raise McitError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    num_tasks = len(adapters)
    if num_tasks == 0:
        raise McitError("merge_loras got no adapters: pass one LoRA state dict per task")
    if method == "copa" and weights is not None:
        raise McitError("copa takes no task weights (its normalisation is part of the method); drop `weights`")
    weights = list(default_weights(method, num_tasks) if weights is None else weights)
    if len(weights) != num_tasks:
        raise McitError(f"got {len(weights)} merge weights for {num_tasks} adapters; give one weight per task")
    scalings = [float(scaling)] * num_tasks if isinstance(scaling, (int, float)) else [float(s) for s in scaling]
    if len(scalings) != num_tasks:
        raise McitError(f"got {len(scalings)} scalings for {num_tasks} adapters; give one value or one per task")
    if method in ("ties", "dare_linear", "dare_ties", "copa") and not 0.0 < density <= 1.0:
        raise McitError(f"merge density must be in (0, 1], got {density}")
    pairs = _lora_pairs(adapters, allow_rank_mismatch=method == "cat")

    merged: StateDict = {}
    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        for a_key, b_key in pairs:
            dtype = adapters[0][a_key].dtype
            As = [adapter[a_key].detach().float() for adapter in adapters]
            Bs = [adapter[b_key].detach().float() for adapter in adapters]
            if method == "cat":
                A, B = _cat(As, Bs, weights, scalings)
            elif method == "copa":
                A, B = _copa(As, [b * s for b, s in zip(Bs, scalings)], density, coef, clamp_quantile)
            else:
                A, B = _peft_task_arithmetic(As, Bs, method, weights, scalings, density, majority_sign_method)
            merged[a_key], merged[b_key] = A.to(dtype), B.to(dtype)
    return merged


def merge_non_lora(states: Sequence[StateDict], weights: Sequence[float] | None = None) -> StateDict:
    """Average the non-LoRA trainables (the projector) over tasks, 1/T each unless `weights` are given.

    Step 1 of CoPA-Merging; also the natural choice for the other methods since the projector is shared.
    """
    if not states:
        raise McitError("merge_non_lora got no state dicts: pass one per task")
    weights = [1.0 / len(states)] * len(states) if weights is None else list(weights)
    if len(weights) != len(states):
        raise McitError(f"got {len(weights)} weights for {len(states)} state dicts; give one per task")
    keys = list(states[0])
    for index, state in enumerate(states[1:], start=1):
        if set(state) != set(keys):
            diff = sorted(set(state) ^ set(keys))
            raise McitError(f"state dict {index} does not have the same keys as state dict 0 (e.g. {diff[0]!r})")
    out: StateDict = {}
    for key in keys:
        first = states[0][key]
        for index, state in enumerate(states[1:], start=1):
            if state[key].shape != first.shape:
                raise McitError(
                    f"{key!r}: shape {tuple(state[key].shape)} in state dict {index} != {tuple(first.shape)} in 0"
                )
        if not first.is_floating_point():
            if any(not torch.equal(state[key], first) for state in states[1:]):
                raise McitError(f"{key!r} is a non-float tensor that differs across tasks; it cannot be averaged")
            out[key] = first.clone()
            continue
        total = sum(w * state[key].detach().float() for w, state in zip(weights, states))
        out[key] = total.to(first.dtype)
    return out


def lowrank_factors(
    delta: Tensor, rank: int, oversample: int = 8, power_iterations: int = 2
) -> tuple[Tensor, Tensor, float]:
    """(A, B, relative residual) with B @ A the best rank-`rank` approximation of `delta` (truncated SVD).

    Carries a dense weight change as a LoRA served with scaling 1, e.g. the base weights of a method that merged its
    per-task LoRAs into the base (RegLoRA): k merged rank-r updates have rank <= k*r, so at that rank the factors are
    exact up to float rounding; the residual ||delta - B A|| / ||delta|| says how far from exact they are.

    The top singular vectors come from a seeded randomized range finder (rank + `oversample` probes, a few power
    iterations), then an exact SVD of the small projected matrix: for a change of rank <= `rank` the probes span its
    whole range, so the result is the exact truncated SVD, at a fraction of the cost of a full SVD of a 4096 x 11008
    matrix. The singular values are split evenly (sqrt on both sides) so A and B have comparable scales; fewer
    singular values than `rank` are padded with zero rows/columns to keep the requested rank.
    """
    delta = delta.detach().float()
    rows, cols = delta.shape
    probes = min(rank + oversample, rows, cols)
    if probes == min(rows, cols):
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        generator = torch.Generator().manual_seed(0)
        Q = torch.linalg.qr(delta @ torch.randn(cols, probes, generator=generator)).Q
        for _ in range(power_iterations):  # sharpen the range when the spectrum decays slowly (bf16 rounding noise)
            Q = torch.linalg.qr(delta @ torch.linalg.qr(delta.T @ Q).Q).Q
        U_small, S, Vh = torch.linalg.svd(Q.T @ delta, full_matrices=False)
        U = Q @ U_small
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    A = torch.zeros(rank, cols)
    B = torch.zeros(rows, rank)
    A[:k], B[:, :k] = root[:, None] * Vh[:k], U[:, :k] * root[None, :]
    norm = torch.linalg.norm(delta)
    residual = float(torch.linalg.norm(delta - B @ A) / norm) if norm > 0 else 0.0
    return A, B, residual


def merged_lora_config(config: Any, rank: int) -> Any:
    """The LoraConfig to save next to a merged adapter: rank r_out, lora_alpha = r_out, no rsLoRA, no patterns."""
    return replace(config, r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})


def merge_with_peft(
    peft_model: Any,
    adapter_names: Sequence[str],
    method: str,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    new_name: str = "merged",
    *,
    majority_sign_method: str = "total",
) -> StateDict:
    """Merge adapters loaded in a PeftModel into a new adapter `new_name`; return its PEFT state dict.

    linear / cat / ties / dare_* go through `add_weighted_adapter`; copa extracts the adapters' state dicts, merges
    them with `merge_loras` and loads the result as a new adapter configured by `merged_lora_config`.
    """
    if method not in METHODS:
        raise McitError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    configs = peft_model.peft_config
    if new_name in configs:
        # add_weighted_adapter silently returns when the name exists: the caller would get the old adapter back.
        raise McitError(f"adapter {new_name!r} already exists in the model; choose another merged adapter name")
    missing = [name for name in adapter_names if name not in configs]
    if missing:
        raise McitError(f"adapter(s) {missing} not in the model; loaded adapters: {sorted(configs)}")
    sources = [configs[name] for name in adapter_names]
    if any(getattr(c, "use_rslora", False) for c in sources):
        raise McitError("merge_with_peft does not support rsLoRA adapters; merge their state dicts with merge_loras")
    weights = list(default_weights(method, len(adapter_names)) if weights is None else weights)
    density = DEFAULT_DENSITY if density is None else density

    if method == "copa":
        if any(c.rank_pattern or c.alpha_pattern for c in sources):
            raise McitError("copa via merge_with_peft needs uniform rank/alpha (no rank_pattern / alpha_pattern)")
        states = [get_peft_model_state_dict(peft_model, adapter_name=name) for name in adapter_names]
        states = [split_lora_state(state)[0] for state in states]
        merged = merge_loras(states, "copa", scaling=[c.lora_alpha / c.r for c in sources], density=density)
        peft_model.add_adapter(new_name, merged_lora_config(sources[0], sources[0].r))
        set_peft_model_state_dict(peft_model, merged, adapter_name=new_name)
    else:
        peft_model.add_weighted_adapter(
            adapters=list(adapter_names),
            weights=weights,
            adapter_name=new_name,
            combination_type=method,
            density=None if method in ("linear", "cat") else density,
            majority_sign_method=majority_sign_method,
        )
    return get_peft_model_state_dict(peft_model, adapter_name=new_name)


def _lora_pairs(adapters: Sequence[StateDict], allow_rank_mismatch: bool) -> list[tuple[str, str]]:
    """(A key, B key) pairs in the first adapter's order, after checking every adapter has the same LoRA layout."""
    first = adapters[0]
    for index, adapter in enumerate(adapters):
        for key in adapter:
            if not is_lora_key(key):
                raise McitError(
                    f"adapter {index}: {key!r} is not a lora_A/lora_B weight; separate non-LoRA tensors with "
                    "split_lora_state and average them with merge_non_lora"
                )
        if set(adapter) != set(first):
            diff = sorted(set(adapter) ^ set(first))
            raise McitError(f"adapter {index} and adapter 0 cover different LoRA weights (e.g. {diff[0]!r})")
    pairs = []
    for a_key in first:
        match = _LORA_KEY.match(a_key)
        if match is None or match["side"] != "A":
            continue
        b_key = f"{match['prefix']}.lora_B{match['name'] or ''}.weight"
        if b_key not in first:
            raise McitError(f"{a_key!r} has no matching {b_key!r}")
        for index, adapter in enumerate(adapters):
            A, B = adapter[a_key], adapter[b_key]
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise McitError(
                    f"adapter {index}: {a_key!r} {tuple(A.shape)} and {b_key!r} {tuple(B.shape)} are not a "
                    "(r x d_in, d_out x r) LoRA pair"
                )
            A0, B0 = first[a_key], first[b_key]
            same = (A.shape[1], B.shape[0]) == (A0.shape[1], B0.shape[0])
            if not same or (not allow_rank_mismatch and A.shape != A0.shape):
                raise McitError(
                    f"adapter {index}: {a_key!r} has shape {tuple(A.shape)} but adapter 0 has {tuple(A0.shape)}; "
                    "all adapters need the same layer sizes (and the same rank, except for `cat`)"
                )
        pairs.append((a_key, b_key))
    unpaired = set(first) - {k for pair in pairs for k in pair}
    if unpaired:
        raise McitError(f"{sorted(unpaired)[0]!r} has no matching lora_A weight")
    return pairs


def _peft_task_arithmetic(As, Bs, method, weights, scalings, density, majority_sign_method):
    """PEFT's per-side rule: sqrt(|w s|) on both A and B, the sign on A only (as in add_weighted_adapter)."""
    ws = [w * s for w, s in zip(weights, scalings)]
    weights_a = torch.tensor([math.copysign(math.sqrt(abs(w)), w) for w in ws])
    weights_b = torch.tensor([math.sqrt(abs(w)) for w in ws])
    out = []
    for tensors, side_weights in ((As, weights_a), (Bs, weights_b)):
        if method == "linear":
            out.append(merge_utils.task_arithmetic(tensors, side_weights))
        elif method == "ties":
            out.append(merge_utils.ties(tensors, side_weights, density, majority_sign_method))
        elif method == "dare_linear":
            out.append(merge_utils.dare_linear(tensors, side_weights, density))
        else:
            out.append(merge_utils.dare_ties(tensors, side_weights, density, majority_sign_method))
    return out[0], out[1]


def _cat(As, Bs, weights, scalings):
    A = torch.cat([w * s * a for a, w, s in zip(As, weights, scalings)], dim=0)
    return A, torch.cat(Bs, dim=1)


def _keep_top_magnitude(tensor: Tensor, density: float) -> Tensor:
    """Zero all but the `density` fraction of largest-magnitude entries (at least one), like PEFT's pruning."""
    k = max(1, int(density * tensor.numel()))
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k).indices] = 1.0
    return (flat * mask).reshape(tensor.shape)


def _copa(As, Bs, density, coef, clamp_quantile):
    merged_A = torch.zeros_like(As[0])
    numerator = torch.zeros_like(Bs[0])
    denominator = torch.zeros(As[0].shape[0])
    for A, B in zip(As, Bs):
        masked_A, masked_B = _keep_top_magnitude(A, density), _keep_top_magnitude(B, density)
        ratio = A.abs().sum(dim=1) / masked_A.abs().sum(dim=1)
        finite = torch.isfinite(ratio)
        fill = ratio[finite].max() if finite.any() else torch.tensor(1.0)
        ratio = torch.where(finite, ratio, fill)
        ratio = ratio.clamp(min=torch.quantile(ratio, clamp_quantile).item())
        merged_A += coef * masked_A
        numerator += coef * ratio[None, :] * masked_B
        denominator += ratio
    return merged_A, numerator / denominator[None, :]
