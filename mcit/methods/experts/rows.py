"""Per-sample expert weights delivered to the batch rows the evaluator builds, and the evaluation context of one
routed group."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mcit.data.collate import Encoder, PixelCache
from mcit.data.records import Sample
from mcit.errors import EvalError, ModelError
from mcit.methods.experts.bank import ExpertBank
from mcit.models.families import family_of


class SampleRouting:
    """Per-sample expert weights, delivered to whatever batch rows the evaluator builds from those samples.

    Rows are recognised by their prompt tokens: a sample's key is the longest token prefix shared by its generation
    prompt and its full training encoding, registered also shortened by up to `KEY_MARGIN` tokens, so generation
    rows (prompt), candidate-scoring rows (a prompt prefix, cut where the candidate's tokenization starts to differ)
    and probe rows (whole conversation) all match it, however they are padded. Samples with identical prompts (the
    usual case: one question template per task) are told apart by a 4x4 thumbnail of their pixels.

    Calls that continue a KV cache (decoding steps, candidate tokens scored on top of a prompt cache) carry no
    prompt; their weights travel with the cache: the cache of a routed call is tagged with its rows' weights, and
    `reorder_cache` reorders the tag with the cache; a cache built from some rows of a tagged one (candidate
    scoring's per-chunk caches) gets their weights from `follow_rows`.
    """

    KEY_MARGIN = 3

    def __init__(self, processor, max_length: int, thumbnails: dict[str, torch.Tensor] | None = None):
        self.thumbnails = {} if thumbnails is None else thumbnails
        """Thumbnails by image path, shareable across evaluations (an image's pixels do not change)."""
        self.encoder = Encoder(processor, max_length)
        self.pixels = PixelCache(processor, 0)
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
                for path in need:
                    inputs = self.pixels.inputs([path])
                    self.thumbnails[path] = _thumbnail(_split_images(inputs, 1)[0])
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

    def _match(self, input_ids: torch.Tensor, mask: torch.Tensor | None, images: dict | None) -> torch.Tensor:
        image_rows = (input_ids == self.image_token_id).any(dim=1).tolist()
        cache: dict[str, list[torch.Tensor] | None] = {}

        def thumb_of(row: int) -> Callable[[], torch.Tensor | None]:
            def get() -> torch.Tensor | None:
                if not images or images.get("pixel_values") is None or not image_rows[row]:
                    return None
                if "all" not in cache:
                    split = _split_images(images, sum(image_rows))
                    cache["all"] = None if split is None else [_thumbnail(chunk) for chunk in split]
                return None if cache["all"] is None else cache["all"][sum(image_rows[:row])]
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
        images = {k: kwargs[k] for k in ("pixel_values", "image_grid_thw") if kwargs.get(k) is not None}
        if not images and kwargs.get("mm_encoder_outputs"):
            images = self._encoded_pixels  # generate() ran the vision tower before this call (transformers >= 5.24)
        self.current = self._match(input_ids, kwargs.get("attention_mask"), images)
        if cache is not None:
            _tag(cache, self.current)
        return None

    def see_pixels(self, _module, args, kwargs):
        # LLaVA's tower is called with pixel_values; Qwen2-VL's with (patch rows, grid_thw)
        pixels = kwargs.get("pixel_values", kwargs.get("hidden_states", args[0] if args else None))
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self._encoded_pixels = {"pixel_values": pixels, **({"image_grid_thw": grid} if grid is not None else {})}
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
        try:
            vision = family_of(base).part(base, "vision_tower")
        except ModelError:
            vision = None
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
    """The KV cache of a model call or output: `past_key_values`, named `cache` since transformers 5.24 (read first:
    reading an output's deprecated `past_key_values` prints a warning on every call)."""
    cache = kwargs.get("cache") if "cache" in kwargs else None
    return cache if cache is not None else kwargs.get("past_key_values")


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


def follow_rows(source, target, rows: torch.Tensor) -> None:
    """`target` is a new cache built from `rows` of `source` (candidate scoring builds one per chunk of candidates
    instead of reordering the prompt cache): tag it with those rows' routing weights, if `source` carries any."""
    weights = getattr(source, "_mcit_route", None)
    if weights is not None:
        _tag(target, weights[rows.to(weights.device)])


def _split_images(images: dict, count: int) -> list[torch.Tensor] | None:
    """The pixel values of each of `count` images in a batch of image inputs: rows of dim 0 where there is one per
    image (LLaVA, OneVision, Idefics3), Qwen2-VL's patch rows cut by `image_grid_thw`; None where the batch does not
    say which rows are whose (InternVL's tiles), and matching falls back to the prompt tokens alone."""
    pixels = images["pixel_values"]
    if count == 1:
        return [pixels[0] if pixels.dim() == 5 else pixels]
    if pixels.shape[0] == count:
        return list(pixels)
    grid = images.get("image_grid_thw")
    if grid is not None and grid.shape[0] == count:
        return list(torch.split(pixels, grid.prod(dim=-1).tolist()))
    return None


def _thumbnail(pixels: torch.Tensor) -> torch.Tensor:
    """A small fingerprint of one image's pixel values (only compared with other thumbnails): 4x4 channel means of
    the image (of its first tile, for tiled inputs), or 64 means of flattened patch rows."""
    pixels = pixels.detach().float().cpu()
    if pixels.dim() == 4:
        pixels = pixels[0]
    if pixels.dim() == 3:
        return F.adaptive_avg_pool2d(pixels[None], 4).flatten()
    return F.adaptive_avg_pool1d(pixels.reshape(1, 1, -1), 64).flatten()


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
