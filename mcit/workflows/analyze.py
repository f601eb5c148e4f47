"""`mcit analyze cka`: layer-wise CKA between task models on one shared probe set (HiDe-LLaVA's analysis).

    mcit analyze cka --checkpoints A B C --benchmark CARD [--tasks a,b] [--samples 50] [--kind rbf|linear]
                     [--out DIR] [--expand 1 | --threshold 0.9]

Each checkpoint is a model fine-tuned on one task: independently fine-tuned adapters (HiDe's setting), or the stage
checkpoints `RUN/checkpoints/stage-XX-<task>` of a sequential run. Every model sees the *same* probe samples in the
same order (`--samples` test samples from each task of the card, drawn once with a fixed seed and never from a
checkpoint's own recipe, whose seed or test limits may differ), because CKA compares two representations of the same
inputs. Each model tokenizes the samples with its own processor; the samples are what must match.

Output in OUT (default `<run>/analysis` for a stage checkpoint, else `./analysis`): `cka.json` (CKAResult), the
heatmaps and the mean cross-task curve, and `probe.json` (checkpoints, labels and sample ids, so the measurement can
be repeated). The printed table marks the layers `choose_expand_layers` picks: the least similar ones, which HiDe makes
task-specific.
"""

from __future__ import annotations

import argparse
import gc
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mcit.analysis.cka import CKAResult, choose_expand_layers, collect_layer_features, layerwise_cka, plot_cka
from mcit.config import BenchmarkConfig, load_recipe, recipe_from_dict
from mcit.data.collate import MIB, Encoder, PixelCache, collate
from mcit.data.records import Sample
from mcit.errors import EvalError
from mcit.runs.folder import RunFolder, has_stage_state, parse_stage_folder
from mcit.runtime.files import write_text_atomic
from mcit.runtime.placement import compute_device
from mcit.runtime.precision import autocast as autocast_for
from mcit.workflows.load import load_checkpoint, prepare_card

PROBE_SEED = 0


def checkpoint_label(checkpoint: str) -> str:
    """`stage-03-count` -> `count`; a folder -> its name; `builtin:tiny-llava` or `org/model` -> the last part."""
    path = Path(checkpoint).expanduser()
    name = path.name or checkpoint
    parsed = parse_stage_folder(path)
    if parsed and has_stage_state(path):
        return parsed[1]
    return name.split(":")[-1]


def unique_labels(labels: Sequence[str]) -> list[str]:
    """Keep labels distinct (the same task's model given twice, or two folders with one name): `x`, `x#2`, ..."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def default_out_dir(checkpoint: str) -> Path:
    """`RUN/analysis` when the first checkpoint is a stage folder `RUN/checkpoints/stage-XX-*`, else `./analysis`."""
    path = Path(checkpoint).expanduser()
    if has_stage_state(path):
        return RunFolder.of_stage(path).analysis
    return Path("analysis")


def load_probe_samples(benchmark: str, tasks: list[str] | None, samples: int, root: str | None):
    """(card, probe samples): `samples` test samples of each task, the same subset on every call."""
    if samples < 1:
        raise EvalError(f"--samples must be at least 1, got {samples}")
    recipe = recipe_from_dict({"output_dir": ".", "seed": PROBE_SEED, "benchmark": {"card": benchmark}})
    recipe.benchmark.tasks = tasks
    recipe.benchmark.root = root
    recipe.benchmark.max_test = samples
    card = prepare_card(recipe)
    probe: list[Sample] = []
    for task in card.tasks:
        probe += card.load_task(task.name, "test", seed=PROBE_SEED)
    if len(probe) < 2:
        raise EvalError(f"the probe set from card {card.name!r} has {len(probe)} sample(s); CKA needs at least 2 "
                        "(raise --samples or add tasks)")
    return card, probe


def _batches(samples: Sequence[Sample], indices: Sequence[int], encoder, pixels, pad_id: int,
             batch_size: int) -> Iterator[dict[str, Any]]:
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        batch = collate([encoder.encode(samples[i], i) for i in chunk], pad_id, pixels)
        batch.pop("labels")  # a forward pass without labels skips the loss
        yield batch


def probe_features(model, processor, method, samples: Sequence[Sample], *, batch_size: int = 16,
                   max_length: int | None = None, autocast: str | None = None,
                   image_cache_mb: int = BenchmarkConfig.image_cache_mb) -> dict[int, torch.Tensor]:
    """Token-averaged down_proj outputs of every LM layer, one row per probe sample, in probe order.

    Samples go through the method's evaluation groups, so a routing method runs each sample with the expert it would
    use at inference; rows are put back in probe order afterwards.
    """
    encoder = Encoder(processor, max_length)
    pixels = PixelCache(processor, image_cache_mb * MIB)
    pad_id = processor.tokenizer.pad_token_id
    device = next(model.parameters()).device
    features: dict[int, torch.Tensor] = {}
    filled = torch.zeros(len(samples), dtype=torch.bool)
    for context, indices in method.eval_groups(model, samples):
        if not indices:
            continue
        with context, autocast_for(autocast, device):
            group = collect_layer_features(model, _batches(samples, indices, encoder, pixels, pad_id, batch_size))
        rows = torch.tensor(list(indices))
        for layer, matrix in group.items():
            if layer not in features:
                features[layer] = torch.zeros(len(samples), matrix.shape[1])
            features[layer][rows] = matrix
        filled[rows] = True
    if not bool(filled.all()):
        raise EvalError(f"method {method.name!r}: evaluation groups left {int((~filled).sum())} probe samples out")
    return features


def _device(name: str) -> torch.device:
    """`--device`: auto is where `load_base` already placed the model (placement.compute_device)."""
    return compute_device() if name == "auto" else torch.device(name)


def format_table(result: CKAResult, expand: Sequence[int]) -> str:
    lines = [f"| layer | mean cross-task {result.kind} CKA | expand |", "|---|---|---|"]
    for layer in result.layers:
        lines.append(f"| {layer} | {result.mean_cross_task[layer]:.4f} | {'*' if layer in expand else ''} |")
    return "\n".join(lines)


def run_cka(args: argparse.Namespace) -> int:
    """`mcit analyze cka` with the parsed arguments of mcit.cli.analyze."""
    checkpoints = list(args.checkpoints)
    if len(checkpoints) < 2:
        raise EvalError(f"--checkpoints: CKA compares task models, give at least 2 (got {len(checkpoints)})")
    if args.labels:
        labels = [label.strip() for label in args.labels.split(",")]
        if len(labels) != len(checkpoints) or len(set(labels)) != len(labels) or not all(labels):
            raise EvalError(f"--labels: need {len(checkpoints)} distinct non-empty names, one per checkpoint; "
                            f"got {labels}")
    else:
        labels = unique_labels([checkpoint_label(c) for c in checkpoints])
    if args.expand is not None and args.expand < 1:
        raise EvalError(f"--expand must be at least 1, got {args.expand}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    card, probe = load_probe_samples(args.benchmark, tasks, args.samples, args.root)
    out = Path(args.out).expanduser() if args.out else default_out_dir(checkpoints[0])
    autocast = None if args.autocast == "none" else args.autocast
    device = _device(args.device)

    features: dict[str, dict[int, torch.Tensor]] = {}
    for label, checkpoint in zip(labels, checkpoints):
        # A fresh recipe per checkpoint: load_checkpoint edits the recipe it is given.
        recipe = load_recipe(args.recipe, settings_only=True) if args.recipe else None
        model, processor, method, used = load_checkpoint(checkpoint, recipe)
        if getattr(model, "hf_quantizer", None) is None:
            model.to(device)
        print(f"{label}: {checkpoint}", flush=True)
        features[label] = probe_features(model, processor, method, probe, batch_size=args.batch_size,
                                         max_length=args.max_length, autocast=autocast,
                                         image_cache_mb=used.benchmark.image_cache_mb)
        del model, processor, method  # one model in memory at a time
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = layerwise_cka(features, kind=args.kind)
    if args.threshold is not None:
        expand = choose_expand_layers(result, threshold=args.threshold)
    else:
        expand = choose_expand_layers(result, count=args.expand if args.expand is not None else 1)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "cka.json", result.to_json())
    plots = plot_cka(result, out)
    provenance = {
        "checkpoints": [str(c) for c in checkpoints], "labels": labels, "benchmark": card.name,
        "tasks": card.task_names, "samples_per_task": args.samples, "probe_seed": PROBE_SEED,
        "probe": [[s.task, s.id] for s in probe], "kind": args.kind, "max_length": args.max_length,
        "autocast": args.autocast, "expand_layers": expand,
        "expand_rule": {"threshold": args.threshold} if args.threshold is not None else
        {"count": args.expand if args.expand is not None else 1},
    }
    write_text_atomic(out / "probe.json", json.dumps(provenance, indent=1))

    print(f"{result.kind} CKA over {result.n_samples} probe samples ({len(card.tasks)} tasks of {card.name}), "
          f"{len(labels)} models: {', '.join(labels)}")
    print(format_table(result, expand))
    rule = f"mean CKA < {args.threshold}" if args.threshold is not None else "lowest mean CKA"
    print(f"expand layers ({rule}): {expand if expand else 'none'}")
    print(f"wrote {out / 'cka.json'}, {out / 'probe.json'}, " + ", ".join(str(p) for p in plots))
    return 0
