"""What a stage trains on, step by step: the micro-batch plan (same seed, same plan on every rank) and the
learning-rate factor (linear warmup, cosine decay), shared by the plain loop and the DeepSpeed engine."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from mcit.config import TrainConfig
from mcit.data.collate import epoch_batches
from mcit.runtime import dist


def cosine_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class StagePlan:
    micro_batches: list[list[int]]
    steps: int
    grad_accum: int
    warmup: int


def plan_stage(lengths: list[int], tc: TrainConfig, seed: int, stage: int) -> StagePlan:
    """The exact micro-batch sequence of a stage trained with settings `tc` (same seed -> same plan, on every rank)."""
    world, rank = dist.world_size(), dist.rank()
    epochs = max(1, math.ceil(tc.epochs))
    batches = list(epoch_batches(lengths, tc.batch_size, seed * 7919 + stage, epochs,
                                 group=tc.group_by_length, rank=rank, world_size=world))
    per_epoch = len(batches) / epochs
    if tc.max_steps is not None:
        needed = tc.max_steps * tc.grad_accum
        while len(batches) < needed:  # more steps than the data: keep cycling fresh epochs
            batches += list(epoch_batches(lengths, tc.batch_size, seed * 7919 + stage + 104729 * len(batches),
                                          1, group=tc.group_by_length, rank=rank, world_size=world))
        batches = batches[:needed]
    else:
        batches = batches[:max(tc.grad_accum, int(round(per_epoch * tc.epochs)))]
    steps = max(1, len(batches) // tc.grad_accum)
    batches = batches[:steps * tc.grad_accum]
    return StagePlan(batches, steps, tc.grad_accum, int(math.ceil(tc.warmup_ratio * steps)))
