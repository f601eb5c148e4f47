"""Vision features kept per image across the evaluations of one run (`benchmark.vision_feature_cache_mb`).

Evaluating every checkpoint of a continual run on every task shows each test image to the model once per checkpoint,
but the vision tower is frozen in almost every recipe: its features for an image are the same at every checkpoint, so
only the first computation is needed. While `VisionFeatureCache.serving(model, keys)` is active, the tower of `model`
answers the rows of `keys` (one image path per row of `pixel_values`) from the cache and computes only the others.
What is kept is the hidden state the model selects from the tower (`vision_feature_layer`), before the projector:
the projector and the language model may change from one checkpoint to the next and still run on every call.

The cache is used only where it cannot change an answer:

- the family's tower sees one row of `pixel_values` per image and the model selects hidden states by index (LLaVA-1.5
  layout: `Family.vision_cache`); tiled and dynamic-resolution towers (LLaVA-NeXT, Qwen-VL, InternVL) compute as
  before;
- the tower holds no adapter (a LoRA on the vision tower changes its output per checkpoint and per routed expert);
- the tower's weights are the ones the cache was filled with: a digest of their bytes (recomputed only when a tensor's
  storage or version counter changed, i.e. after a rebuild or any in-place write such as loading a stage or an
  optimizer step; 0.3 B CLIP-L parameters hash in about a second) and the autocast state are checked on each call,
  and a mismatch empties the cache first. A model rebuilt from the same files keeps it.

Rows come out as the tower computed them in the batch that first met the image, so later checkpoints read bit for bit
what their first computation gave; a batch grouped differently (routed methods) could otherwise differ by float
rounding only, as any change of batch composition does.

Memory: an image's entry is its selected hidden state (LLaVA-1.5-7B: 577 x 1024 values, 1.1 MiB in bf16), held in
host memory. Test sets are evaluated checkpoint after checkpoint, the same images in the same order each time, so a
least-recently-used policy would evict every image just before it is needed again; instead the cache fills up to
`max_bytes` and then keeps what it has (the first images of the pass are served from it, the rest computed).
`max_bytes=0` turns it off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mcit.errors import RecipeError


def _tuner_layers(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - PEFT is a dependency
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


class VisionFeatureCache:
    """Selected vision-tower hidden states by image key, filled up to `max_bytes` (see the module docstring)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise RecipeError(f"benchmark.vision_feature_cache_mb: the vision feature cache budget must be >= 0, got "
                              f"{max_bytes} bytes")
        self.max_bytes = int(max_bytes)
        self._rows: dict[str, dict[int, torch.Tensor]] = {}
        self._states = 0
        """Length of the tower's `hidden_states` tuple (negative layer indices count from its end)."""
        self._fingerprint: tuple | None = None
        """(autocast state, weights digest) the held rows were computed under."""
        self._signature: tuple | None = None
        self._digest = ""
        self.bytes_used = 0
        self.hits = 0
        """Rows served from the cache."""
        self.misses = 0
        """Rows the tower computed while the cache was serving."""
        self.invalidations = 0
        """Times the tower's weights (or the autocast state) changed and the cache was emptied."""
        self.unused: str | None = None
        """Why the last `serving` call left the tower alone (None when it served)."""

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()
        self.bytes_used = 0
        self._fingerprint = None

    def stats(self) -> dict[str, Any]:
        return {"images": len(self), "bytes": self.bytes_used, "hits": self.hits, "misses": self.misses,
                "invalidations": self.invalidations, "unused": self.unused}

    @contextmanager
    def serving(self, model, keys: Sequence[str] | None) -> Iterator[None]:
        """While active, `model`'s vision tower answers the rows of `keys` (the images of the next forward call, one
        key per row of its `pixel_values`) from the cache, computing and keeping the others."""
        tower = self._tower(model) if self.max_bytes and keys else None
        if tower is None:
            yield
            return
        fingerprint = (self._autocast(), self._weights_of(tower))
        if self._fingerprint is not None and fingerprint != self._fingerprint:
            self.clear()
            self.invalidations += 1
        self._fingerprint = fingerprint
        original = tower.forward  # an instance attribute already there (e.g. accelerate's dispatch hook) is kept
        had_own = "forward" in tower.__dict__

        def forward(pixel_values=None, *args, **kwargs):
            if pixel_values is None and "pixel_values" in kwargs:
                pixel_values = kwargs.pop("pixel_values")
            selected = kwargs.get("output_hidden_states")
            layers = [selected] if isinstance(selected, int) and not isinstance(selected, bool) else selected
            if (args or pixel_values is None or pixel_values.shape[0] != len(keys) or not isinstance(layers, list)
                    or kwargs.get("return_dict") is False):
                return original(pixel_values, *args, **kwargs)
            return self._forward(original, pixel_values, list(keys), layers, kwargs)

        tower.forward = forward
        try:
            yield
        finally:
            if had_own:
                tower.forward = original
            else:
                del tower.forward  # the instance attribute goes; the class's forward is back

    def _tower(self, model) -> torch.nn.Module | None:
        from mcit.models.families import family_of

        self.unused = None
        try:
            family = family_of(model)
        except Exception:  # noqa: BLE001 - not one of mcit's families: leave it alone
            self.unused = f"{type(model).__name__} is not a known family"
            return None
        if not family.vision_cache:
            self.unused = f"the {family.name} family's tower is tiled or dynamic-resolution"
            return None
        tower = family.part(model, "vision_tower")
        if _tuner_layers(tower):
            self.unused = "the vision tower holds adapter layers"
            return None
        if any(hasattr(p, "ds_id") for p in tower.parameters()):
            self.unused = "the vision tower is partitioned by ZeRO-3"
            return None
        return tower

    def _weights_of(self, tower: torch.nn.Module) -> str:
        """A digest of the tower's weights, recomputed only when a tensor was replaced or written in place (its
        storage or version counter changed): a model rebuilt from the same files keeps the cache."""
        tensors = [*tower.parameters(), *tower.buffers()]
        signature = tuple((t.data_ptr(), t._version, t.dtype, str(t.device), tuple(t.shape)) for t in tensors)
        if signature != self._signature:
            digest = hashlib.blake2b(digest_size=16)
            for t in tensors:
                digest.update(str((t.dtype, tuple(t.shape))).encode())
                digest.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._signature, self._digest = signature, digest.hexdigest()
        return self._digest

    @staticmethod
    def _autocast() -> tuple:
        cuda = torch.cuda.is_available()
        return (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                cuda and torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda") if cuda else None)

    def _forward(self, original, pixel_values: torch.Tensor, keys: list[str], layers: list[int],
                 kwargs: dict[str, Any]):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        rows: dict[str, dict[int, torch.Tensor]] = {k: self._rows[k] for k in keys if k in self._rows
                                                    and all(layer in self._rows[k] for layer in layers)}
        missing = [i for i, key in enumerate(keys) if key not in rows]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        device = pixel_values.device
        if missing:
            out = original(pixel_values[missing] if len(missing) < len(keys) else pixel_values, **kwargs)
            self._states = len(out.hidden_states)
            computed = {layer: out.hidden_states[layer] for layer in layers}
            room = self.max_bytes - self.bytes_used
            # one host copy per layer for the rows that fit (not one device-to-host transfer per row)
            fit = [j for j in range(len(missing)) if keys[missing[j]] not in self._rows][:max(
                0, room // max(1, sum(t[0].nbytes for t in computed.values())))]
            host = {layer: t[fit].detach().to("cpu", copy=True) for layer, t in computed.items()} if fit else {}
            for j, i in enumerate(missing):
                rows[keys[i]] = {layer: t[j] for layer, t in computed.items()}
            for n, j in enumerate(fit):
                self._keep(keys[missing[j]], {layer: t[n].clone() for layer, t in host.items()})
        hidden: list[torch.Tensor | None] = [None] * self._states
        for layer in layers:
            hidden[layer] = torch.stack([rows[key][layer].to(device) for key in keys])
        return BaseModelOutputWithPooling(last_hidden_state=None, hidden_states=tuple(hidden))

    def _keep(self, key: str, row: dict[int, torch.Tensor]) -> None:
        """Keep a row (host tensors owning their storage) unless the budget is spent: then keep what is held (see
        the module docstring for why nothing is evicted)."""
        size = sum(t.nbytes for t in row.values())
        if key in self._rows or self.bytes_used + size > self.max_bytes:
            return
        self._rows[key] = row
        self.bytes_used += size
