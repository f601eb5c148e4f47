"""Layer-wise CKA between models fine-tuned on different tasks (the HiDe-LLaVA analysis).

HiDe-LLaVA motivates its split into task-general and task-specific layers with one measurement: fine-tune the same
base model independently on each task, run every fine-tuned model on the *same* probe samples, hook the output of
each language-model layer's MLP ``down_proj``, average it over tokens, and compare the resulting (n x d) matrices
across tasks with CKA. Similarity stays high in the lower and middle layers and drops at the top, so the top layers
are the ones worth making task-specific. The reference probe set is 50 test samples per task, and the reference
hard-codes the expanded layer (the last one) instead of reading it off the measurement; ``choose_expand_layers``
closes that loop.

Protocol expected by ``layerwise_cka``: ``features_by_task[a][layer]`` holds the features that task a's model
produced on the probe set, and row i is probe sample i for every task. CKA compares representations of the same
inputs, so mixing probe orders or probe sets across tasks makes the numbers meaningless; the function checks the
shapes line up but cannot check the order.

CKA definition (Kornblith et al., 2019): CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with
HSIC(K, L) = sum((HKH) * (HLH)) and H = I - 11^T/n. The usual 1/(n-1)^2 factor of HSIC is left out because it
cancels in the ratio. All arithmetic is float64 whatever the input dtype, because bf16/fp32 activations of large
models make the centred Gram matrices lose most of their digits.

Degenerate inputs: if either feature matrix is constant across samples (within a relative 1e-12 of its norm, which
absorbs float rounding of the centring) or n < 2, its centred kernel is (numerically) zero and CKA is 0/0. We define it as 0.0
("no measurable shared structure") instead of returning NaN; this holds even for CKA of a constant matrix with
itself. Non-degenerate results are clamped to [0, 1], the range in exact arithmetic for positive semi-definite kernels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mcit.errors import EvalError, ModelError
from mcit.runtime.precision import eval_mode

CONSTANT_RTOL = 1e-12
KINDS = ("rbf", "linear")

# PEFT wraps a Linear in a lora.Linear that keeps the original as `<name>.base_layer`; the `$` anchor selects the
# wrapper (whose output includes the adapter) and skips the inner duplicate.
_LLAVA_DOWN_PROJ = re.compile(r"(?:^|\.)(?:language_model|text_model)\.layers\.(\d+)\.mlp\.down_proj$")
# Text-only causal LMs (``model.layers.<i>.mlp.down_proj``) are accepted when no LLaVA language model is found.
_LM_DOWN_PROJ = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$")


# ---------------------------------------------------------------------------------------------------------------
# CKA on feature matrices
# ---------------------------------------------------------------------------------------------------------------


def _centred_features(x: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    """Column-centre `x` in float64; also report whether it is constant across samples (degenerate)."""
    if x.dim() != 2:
        raise EvalError(f"CKA expects a 2-D (n_samples x n_features) matrix for {name}, got shape {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise EvalError(f"CKA input {name} contains NaN or Inf; check the model's activations (fp16 overflow?)")
    xc = x - x.mean(dim=0, keepdim=True)
    scale = torch.linalg.norm(x)
    constant = x.shape[0] < 2 or bool(torch.linalg.norm(xc) <= CONSTANT_RTOL * scale)
    return xc, constant


def _squared_distances(xc: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances; exactly 0 between identical rows (and on the diagonal).

    The Gram-matrix shortcut is fast but leaves rounding residue where the distance should be 0, and the reference
    median skips zeros, so identical rows are zeroed explicitly.
    """
    gram = xc @ xc.T
    norms = gram.diagonal()
    sq = (norms[:, None] + norms[None, :] - 2.0 * gram).clamp_min(0.0)
    _, row_id = torch.unique(xc, dim=0, return_inverse=True)
    return sq.masked_fill(row_id[:, None] == row_id[None, :], 0.0)


def _median_sigma_from_distances(sq: torch.Tensor) -> float:
    n = sq.shape[0]
    upper = sq[torch.triu_indices(n, n, offset=1).unbind(0)]
    nonzero = upper[upper > 0].sort().values
    if nonzero.numel() == 0:
        return 1.0
    m = nonzero.numel()
    return float(torch.sqrt((nonzero[(m - 1) // 2] + nonzero[m // 2]) / 2))


def median_sigma(x: torch.Tensor) -> float:
    """The reference's RBF bandwidth: sigma = sqrt(median of the non-zero squared pairwise distances of `x`).

    The median runs over all distinct pairs whose distance is non-zero (exact duplicates and the diagonal are
    excluded, as in the reference) and averages the two middle values for an even count (numpy's median). This is
    "sqrt of the median pairwise distance" where the distance is the squared Euclidean one, i.e. sigma is about
    the median Euclidean distance. Returns 1.0 when all rows coincide (the kernel is then constant for any sigma).
    """
    xc, _ = _centred_features(x, "X")
    return _median_sigma_from_distances(_squared_distances(xc))


def _centred_kernel(x: torch.Tensor, kind: str, sigma: float | None, name: str) -> torch.Tensor | None:
    """H K H for one feature matrix, or None when the features are constant (CKA against it is defined as 0)."""
    xc, constant = _centred_features(x, name)
    if constant:
        return None
    if kind == "linear":
        # Centring the features first equals centring K = X X^T, without cancelling large offsets inside K.
        k = xc @ xc.T
    else:
        sq = _squared_distances(xc)
        s = _median_sigma_from_distances(sq) if sigma is None else float(sigma)
        k = torch.exp(-sq / (2.0 * s * s))
    # H K H without building H: subtract row and column means, add back the grand mean.
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


def _cka_from_centred(kc: torch.Tensor | None, lc: torch.Tensor | None) -> float:
    if kc is None or lc is None:
        return 0.0
    denom = torch.sqrt((kc * kc).sum() * (lc * lc).sum())
    if not torch.isfinite(denom) or denom <= 0:
        return 0.0
    return float(((kc * lc).sum() / denom).clamp(0.0, 1.0))


def _pair_kernels(
    x: torch.Tensor, y: torch.Tensor, kind: str, sigma: float | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if x.dim() >= 1 and y.dim() >= 1 and x.shape[0] != y.shape[0]:
        raise EvalError(
            f"CKA compares the same samples under two representations, but X has {x.shape[0]} rows and "
            f"Y has {y.shape[0]}"
        )
    return _centred_kernel(x, kind, sigma, "X"), _centred_kernel(y, kind, sigma, "Y")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear-kernel CKA between two (n x d1), (n x d2) feature matrices of the same n samples.

    Invariant to orthogonal transforms and isotropic scaling of either matrix; 0.0 when either is constant.
    """
    return _cka_from_centred(*_pair_kernels(x, y, "linear", None))


def _check_sigma(sigma: float | None) -> None:
    if sigma is not None and not sigma > 0:
        raise EvalError(f"rbf_cka sigma must be > 0, got {sigma}")


def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma: float | None = None) -> float:
    """RBF-kernel CKA, K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)), between two feature matrices of the same samples.

    With ``sigma=None`` each matrix gets its own bandwidth from its own pairwise distances (``median_sigma``), as
    the reference analysis does; that makes the score invariant to isotropic scaling of either matrix. A given
    ``sigma`` is used for both. Result in [0, 1]; 0.0 when either matrix is constant.
    """
    _check_sigma(sigma)
    return _cka_from_centred(*_pair_kernels(x, y, "rbf", sigma))


# ---------------------------------------------------------------------------------------------------------------
# Feature collection
# ---------------------------------------------------------------------------------------------------------------


def find_down_proj_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Map layer index -> the module producing that language-model layer's MLP ``down_proj`` output.

    Found by name suffix so the same code works on a bare ``LlavaForConditionalGeneration``, a PEFT-wrapped one
    (the LoRA wrapper is hooked, so its output includes the adapter), or a text-only causal LM.
    """
    named = list(model.named_modules())
    for pattern in (_LLAVA_DOWN_PROJ, _LM_DOWN_PROJ):
        found: dict[int, torch.nn.Module] = {}
        names: dict[int, str] = {}
        for name, module in named:
            match = pattern.search(name)
            if match is None:
                continue
            index = int(match.group(1))
            if index in found:
                raise ModelError(
                    f"two modules claim language-model layer {index}'s down_proj: '{names[index]}' and '{name}'; "
                    "pass a model with a single language model"
                )
            found[index], names[index] = module, name
        if found:
            return dict(sorted(found.items()))
    raise ModelError(
        "no module named '...language_model.layers.<i>.mlp.down_proj' (or '...layers.<i>.mlp.down_proj') in "
        f"{type(model).__name__}; CKA feature collection needs a Llama-style MLP in the language model"
    )


def _resolve_layers(available: list[int], layers: str | Iterable[int]) -> list[int]:
    if isinstance(layers, str):
        if layers != "all":
            raise EvalError(f"layers must be 'all' or a list of layer indices, got '{layers}'")
        return list(available)
    count = len(available)
    resolved = []
    for index in layers:
        real = index + count if index < 0 else index
        if real not in available:
            raise EvalError(
                f"layer {index} does not exist; the language model has layers {available[0]}..{available[-1]}"
            )
        resolved.append(real)
    return sorted(set(resolved))


def _move(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


@torch.no_grad()
def collect_layer_features(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    layers: str | Iterable[int] = "all",
) -> dict[int, torch.Tensor]:
    """Run `model` over `batches` and return, per layer, the token-averaged ``down_proj`` outputs (n x d, float32).

    Each batch is a dict the model's forward accepts (input_ids, attention_mask, pixel_values, ...); tensors are
    moved to the model's device. Tokens where ``attention_mask == 0`` are excluded from the average, so a sample
    gives the same row however it was padded; without an attention mask every position counts. Image tokens are
    part of the average (they are part of the LM sequence). Negative layer indices count from the top.
    The model runs in eval mode (dropout off); every submodule gets its previous mode back afterwards.
    """
    modules = find_down_proj_modules(model)
    wanted = _resolve_layers(list(modules), layers)
    device = next(model.parameters()).device
    sums: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(index: int):
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            hidden = (output[0] if isinstance(output, tuple) else output).float()
            mask = current["mask"]
            if mask is None:
                sums[index].append(hidden.mean(dim=1).cpu())
                return
            if mask.shape != hidden.shape[:2]:
                raise ModelError(
                    f"layer {index}: attention_mask has shape {tuple(mask.shape)} but the language model ran on "
                    f"{tuple(hidden.shape[:2])} tokens; pass input_ids with the image tokens already expanded"
                )
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            counts = weights.sum(dim=1).clamp_min(1.0)
            sums[index].append(((hidden * weights).sum(dim=1) / counts).cpu())

        return hook

    handles = [modules[i].register_forward_hook(make_hook(i)) for i in wanted]
    try:
        with eval_mode(model):  # each submodule's own mode comes back: a runner may keep frozen parts in eval
            for batch_index, batch in enumerate(batches):
                inputs = {key: _move(value, device) for key, value in batch.items()}
                mask = inputs.get("attention_mask")
                if mask is not None and bool((mask.sum(dim=-1) == 0).any()):
                    raise EvalError(f"batch {batch_index} has a sample whose attention_mask is all zeros")
                current["mask"] = mask
                model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    if not sums[wanted[0]]:
        raise EvalError("collect_layer_features got no batches; the probe set is empty")
    return {i: torch.cat(sums[i], dim=0) for i in wanted}


# ---------------------------------------------------------------------------------------------------------------
# Layer-wise comparison across tasks
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CKAResult:
    """Per-layer T x T CKA matrices between task models, and the mean off-diagonal (cross-task) CKA per layer.

    ``matrices[layer][a][b]`` is CKA between task ``tasks[a]``'s and task ``tasks[b]``'s features at ``layer``.
    """

    tasks: list[str]
    layers: list[int]
    kind: str
    n_samples: int
    matrices: dict[int, list[list[float]]]
    mean_cross_task: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "tasks": self.tasks,
                "layers": self.layers,
                "kind": self.kind,
                "n_samples": self.n_samples,
                "matrices": {str(k): v for k, v in self.matrices.items()},
                "mean_cross_task": {str(k): v for k, v in self.mean_cross_task.items()},
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> CKAResult:
        try:
            raw = json.loads(text)
            return cls(
                tasks=[str(t) for t in raw["tasks"]],
                layers=[int(i) for i in raw["layers"]],
                kind=str(raw["kind"]),
                n_samples=int(raw["n_samples"]),
                matrices={int(k): [[float(v) for v in row] for row in m] for k, m in raw["matrices"].items()},
                mean_cross_task={int(k): float(v) for k, v in raw["mean_cross_task"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise EvalError(f"not a CKA result JSON (keys tasks, layers, kind, n_samples, matrices, "
                            f"mean_cross_task): {err!r}") from err


def layerwise_cka(
    features_by_task: Mapping[str, Mapping[int, torch.Tensor]],
    kind: str = "rbf",
    sigma: float | None = None,
) -> CKAResult:
    """CKA between every pair of task models at every layer.

    ``features_by_task[task][layer]`` is an (n x d) matrix from ``collect_layer_features`` run with that task's
    fine-tuned model on the shared probe set (same samples, same order for every task). ``sigma`` only applies
    to ``kind="rbf"`` (None = per-matrix median heuristic).
    """
    if kind not in KINDS:
        raise EvalError(f"unknown CKA kind '{kind}'; choose one of {', '.join(KINDS)}")
    tasks = list(features_by_task)
    if len(tasks) < 2:
        raise EvalError(f"layer-wise CKA compares task models, so it needs at least 2 tasks; got {tasks}")
    layers = sorted(features_by_task[tasks[0]])
    if not layers:
        raise EvalError(f"task '{tasks[0]}' has no layer features")
    n = None
    for task in tasks:
        if sorted(features_by_task[task]) != layers:
            raise EvalError(
                f"task '{task}' has layers {sorted(features_by_task[task])} but task '{tasks[0]}' has {layers}; "
                "collect the same layers for every task"
            )
        for layer in layers:
            rows = features_by_task[task][layer].shape[0]
            n = rows if n is None else n
            if rows != n:
                raise EvalError(
                    f"task '{task}' layer {layer} has {rows} probe samples, expected {n}; every task model must run "
                    "on the same probe set"
                )
    if n is None or n < 2:
        raise EvalError(f"CKA needs at least 2 probe samples, got {n}")

    if kind == "rbf":
        _check_sigma(sigma)

    matrices: dict[int, list[list[float]]] = {}
    mean_cross: dict[int, float] = {}
    t = len(tasks)
    for layer in layers:
        # One centred kernel per task model, reused by every pair: T kernels instead of T^2.
        kernels = [_centred_kernel(features_by_task[task][layer], kind, sigma, f"task '{task}' layer {layer}")
                   for task in tasks]
        m = [[0.0] * t for _ in range(t)]
        for a in range(t):
            for b in range(a, t):
                m[a][b] = m[b][a] = _cka_from_centred(kernels[a], kernels[b])
        matrices[layer] = m
        mean_cross[layer] = sum(m[a][b] for a in range(t) for b in range(t) if a != b) / (t * (t - 1))
    return CKAResult(tasks=tasks, layers=layers, kind=kind, n_samples=n, matrices=matrices,
                     mean_cross_task=mean_cross)


def choose_expand_layers(result: CKAResult, count: int | None = None, threshold: float | None = None) -> list[int]:
    """The layers to make task-specific: lowest mean cross-task CKA first, returned sorted by index.

    Either the ``count`` lowest (default 1) or every layer whose mean is strictly below ``threshold`` (possibly
    none). Ties prefer the higher layer, in line with the finding that task specificity grows with depth.
    """
    if count is not None and threshold is not None:
        raise EvalError("choose_expand_layers takes count or threshold, not both")
    ranked = sorted(result.layers, key=lambda layer: (result.mean_cross_task[layer], -layer))
    if threshold is not None:
        return sorted(layer for layer in ranked if result.mean_cross_task[layer] < threshold)
    count = 1 if count is None else count
    if not 1 <= count <= len(ranked):
        raise EvalError(f"count must be between 1 and the number of layers ({len(ranked)}), got {count}")
    return sorted(ranked[:count])


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def plot_cka(result: CKAResult, out_dir: str | Path) -> list[Path]:
    """Write ``cka_heatmaps.png`` (one T x T heatmap per layer) and ``cka_mean_cross_task.png`` (the curve).

    Uses the Agg canvas directly, never pyplot, so it works headless and leaves no global figure state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = len(result.tasks)
    cols = min(4, len(result.layers))
    rows = -(-len(result.layers) // cols)
    fig = Figure(figsize=(3.2 * cols + 1.0, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, layer in zip(axes.flat, result.layers):
        image = ax.imshow(result.matrices[layer], vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"layer {layer}  (mean {result.mean_cross_task[layer]:.2f})", fontsize=9)
        ax.set_xticks(range(t), result.tasks, rotation=90, fontsize=7)
        ax.set_yticks(range(t), result.tasks, fontsize=7)
        if t <= 6:
            for a in range(t):
                for b in range(t):
                    value = result.matrices[layer][a][b]
                    ax.text(b, a, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if value > 0.6 else "white")
    for ax in list(axes.flat)[len(result.layers):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"{result.kind} CKA")
    heatmaps = out / "cka_heatmaps.png"
    fig.savefig(heatmaps, dpi=100)

    fig = Figure(figsize=(6.0, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(result.layers, [result.mean_cross_task[layer] for layer in result.layers], marker="o")
    ax.set_xlabel("language-model layer")
    ax.set_ylabel(f"mean cross-task {result.kind} CKA")
    ax.set_ylim(0.0, 1.05)
    ax.grid(alpha=0.3)
    curve = out / "cka_mean_cross_task.png"
    fig.savefig(curve, dpi=100)
    return [heatmaps, curve]
