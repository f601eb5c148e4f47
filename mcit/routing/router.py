"""The prototype router: the strategy an expert method asks which experts a sample needs.

A router strategy has four duties, so another one (a learned router, an MLLM that names the expert) can replace it
without touching the expert method: `observe` a task before it is trained, give per-sample `weights` over the trained
experts at inference, `reset` what it cached for one evaluation row, and save/restore itself (`state`, `tensors`,
`load`). This one keeps one prototype per task and scores samples by cosine similarity (HiDe-LLaVA, DISCO).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mcit.data.records import Sample
from mcit.routing.features import FeatureExtractor
from mcit.routing.prototypes import RouterOptions, SampleFeatures, TaskPrototypes, routing_weights


class PrototypeRouter:
    def __init__(self, options: RouterOptions, seed: int):
        self.options = options
        self.seed = seed
        self.prototypes = TaskPrototypes()
        """One row per task, fed once from the task's training samples."""
        self._extractor: FeatureExtractor | None = None
        self._cache: dict[tuple, tuple] = {}

    # --- features --------------------------------------------------------------------------------------------------
    def features(self, model, processor, samples: Sequence[Sample]) -> SampleFeatures:
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.options, model, processor)
        return self._extractor(samples)

    def _eval_features(self, model, processor, samples: Sequence[Sample]) -> SampleFeatures:
        """Features of evaluation samples, cached for one evaluation row (generation and constrained scoring see the
        same samples; `reset` clears the cache)."""
        keys = [(s.task, s.id, s.image, s.question) for s in samples]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            fresh = self.features(model, processor, [samples[i] for i in missing])
            for j, i in enumerate(missing):
                self._cache[keys[i]] = (
                    None if fresh.image is None else fresh.image[j], bool(fresh.has_image[j]),
                    None if fresh.text is None else fresh.text[j])
        rows = [self._cache[k] for k in keys]
        image = None if rows[0][0] is None else torch.stack([r[0] for r in rows])
        text = None if rows[0][2] is None else torch.stack([r[2] for r in rows])
        return SampleFeatures(image=image, has_image=torch.tensor([r[1] for r in rows], dtype=torch.bool), text=text)

    # --- the strategy ----------------------------------------------------------------------------------------------
    def observe(self, model, processor, task: str, samples: Sequence[Sample]) -> None:
        """Compute the task's prototype from its training samples (frozen encoders: same as a running mean)."""
        if task in self.prototypes:
            return
        samples = list(samples)
        limit = self.options.max_samples
        if limit is not None and len(samples) > limit:
            samples = random.Random(f"{self.seed}:router:{task}").sample(samples, limit)
        self.prototypes.update(task, self.features(model, processor, samples))

    def expert_prototypes(self, experts: Sequence[str], expert_tasks: Mapping[str, Sequence[str]]) -> TaskPrototypes:
        """Count-weighted merge of each expert's tasks' prototypes (a reused DISCO slot holds several tasks)."""
        merged = TaskPrototypes()
        for expert in experts:
            for task in expert_tasks[expert]:
                merged.update_from(expert, self.prototypes, task)
        return merged

    def weights(self, model, processor, samples: Sequence[Sample], experts: Sequence[str],
                expert_tasks: Mapping[str, Sequence[str]]) -> torch.Tensor:
        """(n, len(experts)) per-sample weights: softmax(cos / tau), or one-hot true expert in oracle mode."""
        opts = self.options
        protos = self.expert_prototypes(experts, expert_tasks)
        scores = protos.similarity(self._eval_features(model, processor, samples), experts, use=opts.features)
        weights = routing_weights(scores, opts.tau)
        if opts.mode == "oracle":
            for i, sample in enumerate(samples):
                true = next((e for e in experts if sample.task in expert_tasks[e]), None)
                if true is not None:
                    weights[i] = 0.0
                    weights[i, experts.index(true)] = 1.0
        return weights

    def reset(self) -> None:
        self._cache = {}

    # --- state -----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return self.prototypes.state()

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.prototypes.to_tensors()

    def load(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.prototypes = TaskPrototypes.from_saved(state, tensors)
