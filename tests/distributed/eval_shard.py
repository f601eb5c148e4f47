"""Evaluate the tiny base on two SynthCIT tasks, the samples split over the ranks; run by torchrun (2 CPU ranks) or
as one plain process. Writes every task's result and predictions to OUT (rank 0). A script for test_eval_shard."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from mcit.data.collate import Encoder, PixelCache
from mcit.evaluation import evaluate as evaluation
from mcit.evaluation.evaluate import evaluate_tasks
from mcit.runtime import dist
from mcit.workflows.load import load_checkpoint, load_test_data, prepare_card


def main(root: str, out: str) -> None:
    dist.init_distributed()
    model, processor, method, recipe = load_checkpoint("builtin:tiny-llava")
    recipe.benchmark.card, recipe.benchmark.root = "synthcit-mini", root
    recipe.benchmark.tasks, recipe.benchmark.max_test = ["shape", "mc-color"], 13  # 13: shards of unequal size
    card = prepare_card(recipe)
    generated = []
    real_generate = evaluation.generate

    def counting(model, encoder, samples, *args, **kwargs):
        generated.extend(s.id for s in samples)
        return real_generate(model, encoder, samples, *args, **kwargs)

    evaluation.generate = counting
    results = evaluate_tasks(model, method, Encoder(processor), PixelCache(processor), card.tasks,
                             load_test_data(card, recipe), batch_size=4, max_new_tokens=6, autocast=None,
                             constrained=True, predictions_dir=Path(out) / "predictions", shard=True)
    (Path(out) / f"generated-rank{dist.rank()}.json").write_text(json.dumps(generated))
    if dist.is_main():
        rows = [{k: v for k, v in dataclasses.asdict(r).items() if k != "seconds"} for r in results]
        (Path(out) / "results.json").write_text(json.dumps({"world_size": dist.world_size(), "results": rows}))


if __name__ == "__main__":
    with dist.exit_on_error():
        main(sys.argv[1], sys.argv[2])
