"""Task prototypes and the prototype router shared by HiDe-LLaVA and DISCO.

A prototype is the running mean (with its sample count) of two features of a task's training samples: a pooled image
feature and a pooled instruction-text feature. At inference a sample's features are compared with every prototype by
cosine similarity and turned into per-sample mixing weights `softmax(s / tau)`.

Feature sources:
- `model` (default): the base model's own frozen parts, so it works for any LLaVA-style model and needs nothing else.
  Image = mean over patch tokens of the vision tower's hidden states at the layer the projector reads
  (`vision_feature_layer`), i.e. what the language model actually sees. Text = mean of the language model's input
  embeddings over the instruction tokens (the question without the chat template or image placeholder, at most
  77 tokens as with CLIP).
- `clip`: external CLIP encoders named in the recipe (the references use CLIP image embeddings and the CLIP text
  pooled output of the instruction, at most 77 tokens).

Why running means with counts rather than plain means: prototypes of one slot can be fed several tasks (DISCO's
slot reuse) and must weight them by their sample counts. Prototypes are saved as safetensors with the checkpoint
(`to_tensors`/`load_tensors`), so inference never lacks them; the references' users hit exactly that failure (the
router's text encoder was not restored at load time).

The encoders are frozen, so a task's prototype is a function of its data alone: computing it in one pass over the
training samples (before or after training) gives the same numbers as accumulating it inside the training loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from mcit.errors import CheckpointError, ModelError, RecipeError

TEXT_TOKENS = 77
"""Instruction tokens kept for the text feature (CLIP's context length, as in the references)."""


@dataclass
class RouterOptions:
    """How the router turns samples into expert weights (recipe keys under `method.router`)."""

    mode: Literal["prototype", "oracle"] = "prototype"
    """`prototype`: cosine to task prototypes; `oracle`: the sample's true task (separates routing errors from
    expert quality). Tasks not trained yet have no expert, so oracle routing falls back to the prototypes for them."""
    features: Literal["both", "image", "text"] = "both"
    """Which similarities enter the score: HiDe averages image and text cosine, DISCO uses text only."""
    tau: float = 0.1
    """Softmax temperature (HiDe 0.1, DISCO 0.05)."""
    source: Literal["model", "clip"] = "model"
    image_encoder: str | None = None
    """CLIP vision encoder (HF id or local dir) when source is clip, e.g. openai/clip-vit-large-patch14-336."""
    text_encoder: str | None = None
    """CLIP text encoder when source is clip, e.g. openai/clip-vit-large-patch14."""
    max_samples: int | None = None
    """Training samples per task used for its prototype (None: all; the seed picks the subset)."""
    batch_size: int = 32


def check_router_options(options: RouterOptions, recipe, where: str = "method.router") -> None:
    if options.tau <= 0:
        raise RecipeError(f"{where}.tau must be > 0, got {options.tau}")
    if options.batch_size < 1:
        raise RecipeError(f"{where}.batch_size must be >= 1, got {options.batch_size}")
    if options.max_samples is not None and options.max_samples < 1:
        raise RecipeError(f"{where}.max_samples must be >= 1 or null, got {options.max_samples}")
    if options.source == "clip":
        needed = {"image": ["image_encoder"], "text": ["text_encoder"],
                  "both": ["image_encoder", "text_encoder"]}[options.features]
        missing = [k for k in needed if not getattr(options, k)]
        if missing:
            raise RecipeError(f"{where}.source is clip but {', '.join(f'{where}.{k}' for k in missing)} is not set "
                              "(an HF id or local directory of a CLIP model)")
    elif recipe.model.train_vision or recipe.model.full_finetune:
        raise RecipeError(f"{where}.source is model, but the recipe trains the vision tower / whole model, so router "
                          "features would drift between tasks and old prototypes would go stale; use "
                          f"{where}.source: clip or keep model.train_vision / model.full_finetune false")


# --- prototypes ------------------------------------------------------------------------------------------------------

@dataclass
class SampleFeatures:
    """Router features of n samples: image rows (zeros where `has_image` is False) and text rows."""

    image: torch.Tensor | None
    has_image: torch.Tensor
    text: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.has_image.shape[0])


class TaskPrototypes:
    """Running means with counts of image and text features, one row per key (a task or an expert slot)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.image_mean: torch.Tensor | None = None  # (K, d_img) float64
        self.image_count = torch.zeros(0, dtype=torch.float64)
        self.text_mean: torch.Tensor | None = None  # (K, d_txt) float64
        self.text_count = torch.zeros(0, dtype=torch.float64)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def _row(self, key: str, image_dim: int | None, text_dim: int | None) -> int:
        if key not in self.keys:
            self.keys.append(key)
            self.image_count = torch.cat([self.image_count, torch.zeros(1, dtype=torch.float64)])
            self.text_count = torch.cat([self.text_count, torch.zeros(1, dtype=torch.float64)])
            if self.image_mean is not None or image_dim is not None:
                dim = image_dim if self.image_mean is None else self.image_mean.shape[1]
                old = self.image_mean if self.image_mean is not None else torch.zeros(0, dim, dtype=torch.float64)
                self.image_mean = torch.cat([old, torch.zeros(len(self.keys) - old.shape[0], dim,
                                                              dtype=torch.float64)])
            if self.text_mean is not None or text_dim is not None:
                dim = text_dim if self.text_mean is None else self.text_mean.shape[1]
                old = self.text_mean if self.text_mean is not None else torch.zeros(0, dim, dtype=torch.float64)
                self.text_mean = torch.cat([old, torch.zeros(len(self.keys) - old.shape[0], dim,
                                                             dtype=torch.float64)])
        return self.keys.index(key)

    def update(self, key: str, features: SampleFeatures) -> None:
        """Fold n samples into the running means of `key` (a new key starts at count 0)."""
        image_dim = features.image.shape[1] if features.image is not None else None
        text_dim = features.text.shape[1] if features.text is not None else None
        row = self._row(key, image_dim, text_dim)
        if features.image is not None and bool(features.has_image.any()):
            if self.image_mean is None or self.image_mean.shape[1] != image_dim:
                raise ModelError(f"router: image features of {key!r} have dimension {image_dim}, the prototypes "
                                 f"{None if self.image_mean is None else self.image_mean.shape[1]}")
            x = features.image[features.has_image].to(torch.float64)
            self.image_mean[row], self.image_count[row] = _fold(self.image_mean[row], self.image_count[row], x)
        if features.text is not None and len(features):
            if self.text_mean is None or self.text_mean.shape[1] != text_dim:
                raise ModelError(f"router: text features of {key!r} have dimension {text_dim}, the prototypes "
                                 f"{None if self.text_mean is None else self.text_mean.shape[1]}")
            x = features.text.to(torch.float64)
            self.text_mean[row], self.text_count[row] = _fold(self.text_mean[row], self.text_count[row], x)

    def update_from(self, key: str, other: TaskPrototypes, other_key: str) -> None:
        """Fold `other`'s prototype `other_key` (mean and count) into `key` here: a count-weighted merge."""
        j = other.keys.index(other_key)
        image_dim = other.image_mean.shape[1] if other.image_mean is not None else None
        text_dim = other.text_mean.shape[1] if other.text_mean is not None else None
        row = self._row(key, image_dim, text_dim)
        for attr in ("image", "text"):
            src_mean, src_count = getattr(other, f"{attr}_mean"), getattr(other, f"{attr}_count")[j]
            if src_mean is None or src_count == 0:
                continue
            mean, count = getattr(self, f"{attr}_mean"), getattr(self, f"{attr}_count")
            total = count[row] + src_count
            mean[row] = (mean[row] * count[row] + src_mean[j] * src_count) / total
            count[row] = total

    def similarity(self, features: SampleFeatures, keys: Sequence[str], use: str = "both") -> torch.Tensor:
        """(n, len(keys)) score: cosine of image and/or text features with each key's prototype, averaged.

        A sample without an image is scored on text alone (with `use="image"` it gets zeros: no information).
        """
        rows = [self.keys.index(k) for k in keys]
        n = len(features)
        parts, weight = torch.zeros(n, len(rows), dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
        if use in ("both", "text") and features.text is not None and self.text_mean is not None:
            parts += _cosine(features.text, self.text_mean[rows])
            weight += 1
        if use in ("both", "image") and features.image is not None and self.image_mean is not None:
            mask = features.has_image.to(torch.float64)[:, None]
            parts += _cosine(features.image, self.image_mean[rows]) * mask
            weight += mask
        return parts / weight.clamp_min(1.0)

    def cosine_to(self, key: str, other: TaskPrototypes, other_key: str, use: str = "text") -> float:
        """Cosine between one prototype here and one in `other` (DISCO's slot-reuse test)."""
        values = []
        for attr in (("text_mean",) if use == "text" else ("image_mean",) if use == "image" else
                     ("text_mean", "image_mean")):
            a, b = getattr(self, attr), getattr(other, attr)
            if a is None or b is None:
                continue
            values.append(float(F.cosine_similarity(a[self.keys.index(key)], b[other.keys.index(other_key)], dim=0)))
        return sum(values) / len(values) if values else 0.0

    # --- persistence (safetensors + JSON) ---------------------------------------------------------------------------
    def to_tensors(self, prefix: str = "router.") -> dict[str, torch.Tensor]:
        out = {f"{prefix}image_count": self.image_count.clone(), f"{prefix}text_count": self.text_count.clone()}
        if self.image_mean is not None:
            out[f"{prefix}image_mean"] = self.image_mean.clone()
        if self.text_mean is not None:
            out[f"{prefix}text_mean"] = self.text_mean.clone()
        return out

    def state(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "image_count": self.image_count.tolist(),
                "text_count": self.text_count.tolist()}

    @classmethod
    def from_saved(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor],
                   prefix: str = "router.") -> TaskPrototypes:
        proto = cls()
        proto.keys = [str(k) for k in state.get("keys", [])]
        k = len(proto.keys)
        try:
            proto.image_count = tensors[f"{prefix}image_count"].to(torch.float64)
            proto.text_count = tensors[f"{prefix}text_count"].to(torch.float64)
        except KeyError as exc:
            if k:
                raise CheckpointError(f"router state names {k} prototypes but method.safetensors has no {exc}; "
                                      "the checkpoint was written by another method or is incomplete") from exc
            return proto
        proto.image_mean = tensors.get(f"{prefix}image_mean")
        proto.text_mean = tensors.get(f"{prefix}text_mean")
        for name, value in (("image_mean", proto.image_mean), ("text_mean", proto.text_mean),
                            ("image_count", proto.image_count), ("text_count", proto.text_count)):
            if value is not None and value.shape[0] != k:
                raise CheckpointError(f"router tensor {prefix}{name} has {value.shape[0]} rows but the state names "
                                      f"{k} prototypes ({proto.keys})")
        proto.image_mean = proto.image_mean.to(torch.float64) if proto.image_mean is not None else None
        proto.text_mean = proto.text_mean.to(torch.float64) if proto.text_mean is not None else None
        return proto


def _fold(mean: torch.Tensor, count: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    total = count + x.shape[0]
    return mean + (x.sum(dim=0) - x.shape[0] * mean) / total, total


def _cosine(x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.to(torch.float64), dim=-1) @ F.normalize(protos, dim=-1).T


def routing_weights(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(s / tau) per sample, in float64 (tau = 0.05 makes fp32 logits of 20x cosines; keep the digits)."""
    return torch.softmax(scores.to(torch.float64) / tau, dim=-1)
