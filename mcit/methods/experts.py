"""Task experts on top of PEFT LoRA: one PEFT adapter per expert, mixed per sample or fused into one at inference.

Used by `hide` and `disco` (and the building blocks by anything that wants experts). The experts are ordinary PEFT
adapters, so training, `save_pretrained` and export see plain LoRA; only inference differs:

- **mixed** layers output `W x + sum_i w_i * s_i * B_i A_i x` with per-sample weights w (from the router). All
  experts' factors are stacked once per stage into `A_cat` (R x d_in) and `B_cat` (d_out x R, scaling folded in),
  so a forward pass is two matmuls and an element-wise scale of the R = sum_i r_i rank channels, not a loop over
  experts and never a rebuilt layer.
- **fused** layers add one precomputed delta for all experts: `sum_b_sum_a` = (sum_i s_i B_i)(sum_i A_i) (the
  HiDe-LLaVA reference, which introduces cross terms B_i A_j) or `sum_ba` = sum_i s_i B_i A_i (exact). The factors
  stay low rank, or become one dense matrix when that is cheaper.

Routed inference runs inside a context: PEFT's own adapter path is switched off in every expert layer (the active
adapter is set to a name no layer holds, which PEFT skips) and a forward hook adds the mixed or fused delta. Per-sample
weights reach the batch rows through `SampleRouting`, a forward pre-hook on the base model that recognises each row
by its prompt tokens (and its image, when prompts repeat), so any batching, padding or row order of the evaluator works.

`ExpertMethod` is the shared method skeleton (router, prototypes, routed evaluation, router report, state).
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mcit.data.records import Sample
from mcit.errors import CheckpointError, EvalError, RecipeError
from mcit.methods.base import Method, TaskData, add_lora, set_lora_trainable
from mcit.routing.prototypes import (
    FeatureExtractor,
    RouterOptions,
    SampleFeatures,
    TaskPrototypes,
    check_router_options,
    routing_weights,
)

ROUTED = "__mcit_routed__"
"""An adapter name no layer holds: PEFT skips it, which switches PEFT's adapter path off without touching weights."""
FUSIONS = ("sum_b_sum_a", "sum_ba")
_LAYER_INDEX = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.")


# --- the expert layers ------------------------------------------------------------------------------------------------

@dataclass
class LoraLayerRef:
    name: str
    index: int
    """Language-model layer index (0-based)."""
    module: Any


def lora_layers(model) -> list[LoraLayerRef]:
    """Every PEFT LoRA layer of the language model, with its layer index."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            match = _LAYER_INDEX.search(name)
            if match:
                out.append(LoraLayerRef(name, int(match.group(1)), module))
    return out


def num_lm_layers(model) -> int:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", config)
    return int(text.num_hidden_layers)


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
                saved.append((ref.module, ref.module.active_adapters))
                ref.module._active_adapter = [ROUTED]
                handles.append(ref.module.register_forward_hook(_delta_hook(factors, weights if mixed else None)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, active in saved:
                module._active_adapter = active


def _delta_hook(factors: Factors, weights: Callable[[int], torch.Tensor] | None):
    def hook(_module, args, output):
        x = args[0]
        w = weights(x.shape[0]) if weights is not None else None
        return output + factors.delta(x, w).to(output.dtype)

    return hook


# --- per-sample weights for batch rows --------------------------------------------------------------------------------

class SampleRouting:
    """Per-sample expert weights, delivered to whatever batch rows the evaluator builds from those samples.

    Rows are recognised by their prompt tokens: a sample's key is the longest token prefix shared by its generation
    prompt and its full training encoding, registered also shortened by up to `KEY_MARGIN` tokens, so generation
    rows (prompt), candidate-scoring rows (a prompt prefix, cut where the candidate's tokenization starts to differ)
    and probe rows (whole conversation) all match it, however they are padded. Samples with identical prompts (the
    usual case: one question template per task) are told apart by a 4x4 thumbnail of their pixels.

    Calls that continue a KV cache (decoding steps, candidate tokens scored on top of a prompt cache) carry no
    prompt; their weights travel with the cache: the cache of a routed call is tagged with its rows' weights, and
    `reorder_cache` (which expands prompt rows into candidate rows) reorders the tag with the cache.
    """

    KEY_MARGIN = 3

    def __init__(self, processor, max_length: int, thumbnails: dict[str, torch.Tensor] | None = None):
        from mcit.data.collate import Encoder, PixelCache

        self.thumbnails = {} if thumbnails is None else thumbnails
        """Thumbnails by image path, shareable across evaluations (an image's pixels do not change)."""
        self.encoder = Encoder(processor, max_length)
        self.pixels = PixelCache(processor, keep=False)
        self.image_token_id = self.encoder.tokenizer.convert_tokens_to_ids(self.encoder.image_token)
        self.table: dict[tuple[int, ...], list[tuple[torch.Tensor | None, int]]] = {}
        self.lengths: list[int] = []
        self.weights = torch.zeros(0, 0)
        self.current: torch.Tensor | None = None
        self._encoded_pixels: torch.Tensor | None = None

    def _key(self, sample: Sample) -> tuple[int, ...]:
        prompt = self.encoder.prompt_ids(sample)
        try:
            full = self.encoder.encode(sample).input_ids
        except Exception:  # noqa: BLE001 - an unencodable answer only costs the answer-side key tokens
            return tuple(prompt[:max(1, len(prompt) - 1)])
        n = 0
        for a, b in zip(prompt, full):
            if a != b:
                break
            n += 1
        return tuple(prompt[:max(1, n)])

    def register(self, samples: Sequence[Sample], weights: torch.Tensor) -> None:
        self.weights = weights.float()
        by_key: dict[tuple[int, ...], list[int]] = {}
        for i, sample in enumerate(samples):
            by_key.setdefault(self._key(sample), []).append(i)
        for key, rows in list(by_key.items()):
            for cut in range(1, self.KEY_MARGIN + 1):
                if len(key) - cut >= 1:
                    by_key.setdefault(key[:len(key) - cut], [])
                    shorter = by_key[key[:len(key) - cut]]
                    shorter += [r for r in rows if r not in shorter]
        for key, rows in by_key.items():
            distinct = any(not torch.allclose(self.weights[rows[0]], self.weights[r], atol=1e-6) for r in rows[1:])
            if distinct:
                need = list(dict.fromkeys(samples[r].image for r in rows
                                          if samples[r].image and samples[r].image not in self.thumbnails))
                for start in range(0, len(need), 64):
                    chunk = need[start:start + 64]
                    self.thumbnails.update(zip(chunk, _thumbnails(self.pixels(chunk))))
            self.table[key] = [(self.thumbnails.get(samples[r].image) if distinct and samples[r].image else None, r)
                               for r in rows]
        self.lengths = sorted({len(k) for k in self.table}, reverse=True)

    def _row(self, ids: list[int], thumb: Callable[[], torch.Tensor | None]) -> int | None:
        for n in self.lengths:
            if len(ids) < n:
                continue
            entries = self.table.get(tuple(ids[:n]))
            if not entries:
                continue
            if len(entries) == 1 or all(e[0] is None for e in entries):
                return entries[0][1]
            t = thumb()
            if t is None:
                return entries[0][1]
            dists = [float((t - e[0]).pow(2).sum()) if e[0] is not None else float("inf") for e in entries]
            return entries[min(range(len(dists)), key=dists.__getitem__)][1]
        return None

    def _match(self, input_ids: torch.Tensor, mask: torch.Tensor | None, pixel_values) -> torch.Tensor:
        image_rows = (input_ids == self.image_token_id).any(dim=1).tolist()
        cache: dict[str, torch.Tensor] = {}

        def thumb_of(row: int) -> Callable[[], torch.Tensor | None]:
            def get() -> torch.Tensor | None:
                if pixel_values is None or not image_rows[row]:
                    return None
                if "all" not in cache:
                    cache["all"] = _thumbnails(pixel_values)
                return cache["all"][sum(image_rows[:row])]
            return get

        found = []
        for row in range(input_ids.shape[0]):
            ids = input_ids[row][mask[row].bool()] if mask is not None else input_ids[row]
            index = self._row(ids.tolist(), thumb_of(row))
            if index is None:
                raise EvalError(f"routed evaluation: batch row {row} matches no sample given to eval_groups (its "
                                "prompt tokens are not a registered prompt); evaluate samples through the method's "
                                "eval_groups before calling the model")
            found.append(index)
        return self.weights[torch.tensor(found)].to(input_ids.device)

    def pre_hook(self, _module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise EvalError("routed evaluation needs input_ids in the model call (got inputs_embeds only)")
        cache = _cache_arg(kwargs)
        tagged = getattr(cache, "_mcit_route", None)
        if tagged is not None and tagged.shape[0] == input_ids.shape[0]:
            self.current = tagged  # a continuation of a routed call
            return None
        pixels = kwargs.get("pixel_values")
        if pixels is None and kwargs.get("mm_encoder_outputs"):
            pixels = self._encoded_pixels  # generate() ran the vision tower before this call (transformers >= 5.24)
        self.current = self._match(input_ids, kwargs.get("attention_mask"), pixels)
        if cache is not None:
            _tag(cache, self.current)
        return None

    def see_pixels(self, _module, args, kwargs):
        self._encoded_pixels = kwargs.get("pixel_values", args[0] if args else None)
        return None

    def post_hook(self, _module, _args, _kwargs, output):
        cache = _cache_arg(output) if isinstance(output, dict) else getattr(output, "past_key_values", None)
        if cache is not None and self.current is not None and getattr(cache, "_mcit_route", None) is None:
            _tag(cache, self.current)
        return None

    def for_batch(self, n: int) -> torch.Tensor:
        if self.current is None or self.current.shape[0] != n:
            raise EvalError(f"routed evaluation: a layer ran on {n} rows but the router holds weights for "
                            f"{None if self.current is None else self.current.shape[0]}")
        return self.current

    @contextlib.contextmanager
    def attached(self, model) -> Iterator[None]:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        handles = [base.register_forward_pre_hook(self.pre_hook, with_kwargs=True),
                   base.register_forward_hook(self.post_hook, with_kwargs=True)]
        vision = getattr(getattr(base, "model", base), "vision_tower", None)
        if vision is not None:
            handles.append(vision.register_forward_pre_hook(self.see_pixels, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.current = None
            self._encoded_pixels = None


def _cache_arg(kwargs) -> Any:
    """The KV cache of a model call or output: `past_key_values`, named `cache` since transformers 5.24."""
    cache = kwargs.get("past_key_values")
    return cache if cache is not None else kwargs.get("cache")


def _tag(cache, weights: torch.Tensor) -> None:
    """Attach routing weights to a KV cache and keep them aligned when the cache's rows are reordered/expanded."""
    try:
        cache._mcit_route = weights
    except AttributeError:  # a cache type without a __dict__: continuations will be matched by prompt instead
        return
    if getattr(cache, "_mcit_reorder_wrapped", False) or not hasattr(cache, "reorder_cache"):
        return
    original = cache.reorder_cache

    def reorder_cache(beam_idx: torch.Tensor):
        out = original(beam_idx)
        cache._mcit_route = cache._mcit_route[beam_idx.to(cache._mcit_route.device)]
        return out

    cache.reorder_cache = reorder_cache
    cache._mcit_reorder_wrapped = True


def _thumbnails(pixels: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(pixels.detach().float().cpu(), 4).flatten(1)


class RoutedContext:
    """The evaluation context of one group: routed inference on; `.routes[k]` names the top expert of the group's
    k-th sample."""

    def __init__(self, bank: ExpertBank, routing: SampleRouting, model, experts: Sequence[str],
                 fused_layers: set[int], fusion: str, routes: Sequence[str]):
        self.bank, self.routing, self.model = bank, routing, model
        self.experts, self.fused_layers, self.fusion, self.routes = list(experts), fused_layers, fusion, list(routes)
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> RoutedContext:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.routing.attached(self.model))
        self._stack.enter_context(self.bank.routed(self.experts, self.routing.for_batch, self.fused_layers,
                                                   self.fusion))
        return self

    def __exit__(self, *exc) -> None:
        assert self._stack is not None
        self._stack.close()


# --- the shared method skeleton ---------------------------------------------------------------------------------------

class ExpertMethod(Method):
    """One PEFT adapter per expert; the current stage trains its expert only; a prototype router mixes at inference.

    Subclasses decide which expert a stage trains (`_expert_for_stage`) and which layers are fused
    (`_fused_layers`). Structure is rebuilt from saved state in `load_state` (missing adapters are added), so a
    checkpoint loads even when `prepare` ran without data (standalone evaluation).
    """

    expert_prefix = "expert"

    def __init__(self, recipe, options):
        super().__init__(recipe, options)
        router: RouterOptions = options.router
        check_router_options(router, recipe)
        self.experts: list[str] = []
        """Adapter names of the experts, in creation order."""
        self.expert_tasks: dict[str, list[str]] = {}
        """Tasks each expert was trained on."""
        self.task_prototypes = TaskPrototypes()
        self.model = None
        self._bank: ExpertBank | None = None
        self._extractor: FeatureExtractor | None = None
        self._routing = None
        self._routes: dict[tuple[str, str], tuple[str, str | None]] = {}
        self._feature_cache: dict[tuple, tuple] = {}
        self._thumbnails: dict[str, torch.Tensor] = {}

    # --- structure -------------------------------------------------------------------------------------------------
    def expert_name(self, index: int) -> str:
        return f"{self.expert_prefix}{index}"

    def setup(self, model, ctx):
        self.ctx = ctx
        model = add_lora(model, self.recipe, self.expert_name(0))
        self.model = model
        self._bank = ExpertBank(model)
        return model

    def _ensure_expert(self, model, name: str) -> None:
        if name not in model.peft_config:
            add_lora(model, self.recipe, name)
        if name not in self.experts:
            self.experts.append(name)
            self.experts.sort(key=lambda e: int(e[len(self.expert_prefix):]))
        self.expert_tasks.setdefault(name, [])

    def _activate(self, model, name: str) -> None:
        """Train `name` only: PEFT runs just this adapter (flat cost per task), others get no grad or optimizer."""
        model.set_adapter(name)
        set_lora_trainable(model, {name})
        if self._bank is not None:
            self._bank.invalidate()

    def trained_experts(self) -> list[str]:
        return [e for e in self.experts if self.expert_tasks.get(e)]

    def expert_of_task(self, task: str) -> str | None:
        for expert, tasks in self.expert_tasks.items():
            if task in tasks:
                return expert
        return None

    def _fused_layers(self, model) -> set[int]:
        return set()

    fusion: str = "sum_ba"

    # --- router ----------------------------------------------------------------------------------------------------
    def _features(self, model, samples: Sequence[Sample]) -> SampleFeatures:
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.options.router, model, self.ctx.processor)
        return self._extractor(samples)

    def _eval_features(self, model, samples: Sequence[Sample]) -> SampleFeatures:
        """Features of evaluation samples, cached for one evaluation row (generation and constrained scoring see the
        same samples; `routing_report` clears the cache)."""
        keys = [(s.task, s.id, s.image, s.question) for s in samples]
        missing = [i for i, k in enumerate(keys) if k not in self._feature_cache]
        if missing:
            fresh = self._features(model, [samples[i] for i in missing])
            for j, i in enumerate(missing):
                self._feature_cache[keys[i]] = (
                    None if fresh.image is None else fresh.image[j], bool(fresh.has_image[j]),
                    None if fresh.text is None else fresh.text[j])
        rows = [self._feature_cache[k] for k in keys]
        image = None if rows[0][0] is None else torch.stack([r[0] for r in rows])
        text = None if rows[0][2] is None else torch.stack([r[2] for r in rows])
        return SampleFeatures(image=image, has_image=torch.tensor([r[1] for r in rows], dtype=torch.bool), text=text)

    def _prototype_samples(self, task: str, data: TaskData) -> list[Sample]:
        samples = list(data.train[task])
        limit = self.options.router.max_samples
        if limit is not None and len(samples) > limit:
            samples = random.Random(f"{self.recipe.seed}:router:{task}").sample(samples, limit)
        return samples

    def observe_task(self, model, task: str, data: TaskData) -> None:
        """Compute the task's prototype from its training samples (frozen encoders: same as a running mean)."""
        if task not in self.task_prototypes:
            self.task_prototypes.update(task, self._features(model, self._prototype_samples(task, data)))

    def expert_prototypes(self, experts: Sequence[str]) -> TaskPrototypes:
        """Count-weighted merge of each expert's tasks' prototypes (a reused DISCO slot holds several tasks)."""
        merged = TaskPrototypes()
        for expert in experts:
            for task in self.expert_tasks[expert]:
                merged.update_from(expert, self.task_prototypes, task)
        return merged

    def route(self, model, samples: Sequence[Sample], experts: Sequence[str]) -> torch.Tensor:
        """(n, len(experts)) per-sample weights: softmax(cos / tau), or one-hot true expert in oracle mode."""
        opts: RouterOptions = self.options.router
        protos = self.expert_prototypes(experts)
        scores = protos.similarity(self._eval_features(model, samples), experts, use=opts.features)
        weights = routing_weights(scores, opts.tau)
        if opts.mode == "oracle":
            for i, sample in enumerate(samples):
                true = self.expert_of_task(sample.task)
                if true in experts:
                    weights[i] = 0.0
                    weights[i, experts.index(true)] = 1.0
        return weights

    # --- inference -------------------------------------------------------------------------------------------------
    def eval_groups(self, model, samples: Sequence[Sample]):
        experts = self.trained_experts()
        if not experts or not samples:
            yield contextlib.nullcontext(), list(range(len(samples)))
            return
        weights = self.route(model, samples, experts)
        top = weights.argmax(dim=1).tolist()
        for sample, e in zip(samples, top):
            self._routes[(sample.task, sample.id)] = (experts[e], self.expert_of_task(sample.task))
        routing = SampleRouting(self.ctx.processor, self.recipe.train.max_length, self._thumbnails)
        routing.register(samples, weights)
        labels = [f"{experts[e]}:{'+'.join(self.expert_tasks[experts[e]])}" for e in top]
        # One group: the per-sample weights reach every batch row, so samples routed to different experts share
        # batches (splitting by top expert would shrink the batches and multiply the generate calls).
        yield RoutedContext(self._bank, routing, model, experts, self._fused_layers(model), self.fusion,
                            labels), list(range(len(samples)))

    def routing_report(self) -> dict[str, Any] | None:
        """Router accuracy (%) over samples of trained tasks, and a true-task x routed-task confusion (counts); reset.

        A sample routed to an expert that holds its task (a reused DISCO slot holds several) counts as correct and
        lands on the diagonal; otherwise in the column of the routed expert's first task. `expert_confusion` keeps the
        raw true-task x expert counts.
        """
        self._feature_cache = {}
        if not self._routes:
            return None
        experts = self.trained_experts()
        tasks = list(self.ctx.data.names) if self.ctx.data.names else sorted({t for t, _ in self._routes})
        confusion = [[0] * len(tasks) for _ in tasks]
        by_expert = [[0] * len(experts) for _ in tasks]
        hits = total = 0
        for (task, _), (routed, true) in self._routes.items():
            if task not in tasks or routed not in experts:
                continue
            held = self.expert_tasks[routed]
            column = task if task in held else held[0]
            if column in tasks:
                confusion[tasks.index(task)][tasks.index(column)] += 1
            by_expert[tasks.index(task)][experts.index(routed)] += 1
            if true is not None:
                total += 1
                hits += routed == true
        self._routes = {}
        return {"accuracy": 100.0 * hits / total if total else None, "confusion": confusion, "tasks": tasks,
                "expert_confusion": by_expert,
                "experts": [f"{e}:{'+'.join(self.expert_tasks[e])}" for e in experts],
                "mode": self.options.router.mode}

    # --- state -----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        from mcit.train.distributed import full_shape

        sizes: dict[str, int] = {}
        nbytes: dict[str, int] = {}
        if self.model is not None:
            for name, param in self.model.named_parameters():
                for e in self.experts:
                    if f".{e}." in name:
                        n = full_shape(param).numel()
                        sizes[e] = sizes.get(e, 0) + n
                        nbytes[e] = nbytes.get(e, 0) + n * param.element_size()
        return {"experts": list(self.experts), "expert_tasks": {k: list(v) for k, v in self.expert_tasks.items()},
                "router": self.task_prototypes.state(), "expert_parameters": sizes, "expert_bytes": nbytes}

    def method_tensors(self) -> dict[str, torch.Tensor]:
        return self.task_prototypes.to_tensors()

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        self.task_prototypes = TaskPrototypes.from_saved(state.get("router", {}), tensors)
        self.expert_tasks = {k: list(v) for k, v in state.get("expert_tasks", {}).items()}
        for name in state.get("experts", []):
            if self.model is not None:
                self._ensure_expert(self.model, name)
        if self._bank is not None:
            self._bank.invalidate()
