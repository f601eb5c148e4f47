"""Part 4 (router overhead): routed inference with T experts (hide, disco) against one merged adapter.

Each variant gets T = `--experts` LoRA experts built through the method's own hooks (`prepare`, `before_task` which
computes the task prototypes from `--proto-samples` training samples per task, `after_task`), with random non-zero B
factors (latency does not depend on trained values). The timed call is what evaluation runs for every task: routing
(`eval_groups`: router features and per-sample weights, one group for all samples) plus generation under its
context. Every variant generates exactly `--new-tokens` tokens per sample (`min_new_tokens = max_new_tokens`), so
latencies compare equal work. Variants:

- `merged`: one LoRA merged into the base weights (`merge_and_unload`): a plain model, the floor;
- `lora`: one unmerged PEFT LoRA (how `lora_ft` is evaluated);
- `hide`: the paper's layout: the top layer routed per sample, the other layers fused ((sum B)(sum A)); image +
  text prototypes. (The SynthCIT recipe picks the layers by CKA, which on random experts would be chance; with
  trained experts it routes every layer, which is the `disco` row's cost.) The result lists the fused layers;
- `disco`: recipe settings with one slot per task (`reuse_threshold: null`), every layer routed, text prototypes.

The same test samples (evenly from all six SynthCIT tasks, whatever T) go through every variant; the median of
`--repeats` timed passes is reported, each pass with the router's feature cache cleared (as at every evaluation
row). One more, untimed pass runs under torch's `FlopCounterMode`, so the time ratio can be read against the work
ratio.

`--width W` swaps the shipped base for a randomly initialised copy whose language model is W wide (same depth,
vocabulary, processor and vision tower): the rank channels a routed layer adds cost R (d_in + d_out) per token
against the base layer's d_in d_out, so the overhead shrinks with the model's width (at d = 4096, LLaVA-1.5-7B,
R = 48 adds about 2 % to a layer).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import child_main, synthcit_samples

TASKS = ("shape", "mc-color", "caption", "mc-shape", "count", "caption-detail")


def _randomize_lora(model, adapter: str, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def wide_base(width: int, folder: Path) -> Path:
    """A random-init tiny LLaVA whose language model is `width` wide, with the shipped processor (built once)."""
    from transformers import AutoProcessor

    from mcit.models.tiny import TinyLlavaSpec, create_init, resolve_builtin

    path = folder / f"tiny-llava-w{width}"
    if (path / "config.json").is_file():
        return path
    spec = TinyLlavaSpec(text_hidden=width, text_heads=max(1, width // 64),
                         text_intermediate=64 * round(width * 2.75 / 64))
    return create_init(path, spec, processor=AutoProcessor.from_pretrained(resolve_builtin("builtin:tiny-llava")))


def build(variant: str, experts: int, proto_samples: int, workdir: Path, width: int | None = None):
    """(model, method or None, encoder, processor) with `experts` experts (1 for merged / lora)."""
    from mcit.config import load_recipe
    from mcit.data.collate import Encoder
    from mcit.methods.base import TaskData, build_method
    from mcit.workflows.load import attach_method, build_model

    repo = Path(__file__).resolve().parents[1]
    recipe_file = {"hide": "hide", "disco": "disco"}.get(variant, "lora_ft")
    tasks = list(TASKS[:experts])
    overrides = [f"output_dir={workdir}", f"benchmark.tasks=[{','.join(tasks)}]"]
    if variant == "disco":
        overrides.append("method.reuse_threshold=null")
    if variant == "hide":
        overrides += ["method.expand_layers=[-1]", "method.expand_threshold=null"]  # CKA of random experts: chance
    if width:
        overrides.append(f"model.name_or_path={wide_base(width, workdir.parent)}")
    recipe = load_recipe(repo / "recipes" / "synthcit" / f"{recipe_file}.yaml", overrides)
    model, processor = build_model(recipe)
    train = {t: synthcit_samples(t, "train", proto_samples) for t in tasks}
    data = TaskData(tasks, train, {t: [] for t in tasks})
    method = build_method(recipe)
    model = attach_method(method, model, processor, recipe, data, output_dir=workdir)
    if variant in ("hide", "disco"):
        for stage in range(experts):
            method.prepare(model, stage, [stage])
            method.before_task(model, stage, [stage], data)
            _randomize_lora(model, method.expert_name(stage), stage)
            method.after_task(model, stage, [stage], data)
        if len(method.trained_experts()) != experts:
            raise RuntimeError(f"{variant}: expected {experts} experts, got {method.trained_experts()}")
    else:
        method.prepare(model, 0, [0])
        _randomize_lora(model, "default", 0)
        if variant == "merged":
            model = model.merge_and_unload()
            method = None
    model.eval()
    return model, method, Encoder(processor, recipe.train.max_length), processor, recipe


def timed_pass(model, method, encoder, pixels, samples, new_tokens: int, batch: int, autocast) -> dict[str, float]:
    import contextlib

    from mcit.evaluation.generate import generate

    t0, c0 = time.perf_counter(), time.process_time()
    groups = iter(method.eval_groups(model, samples)) if method is not None else iter(
        [(contextlib.nullcontext(), list(range(len(samples))))])
    first = next(groups)
    routing = time.perf_counter() - t0
    count = 0
    for context, indices in [first, *groups]:
        with context:
            generate(model, encoder, [samples[i] for i in indices], pixels, batch_size=batch,
                     max_new_tokens=new_tokens, autocast=autocast)
        count += 1
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    report = method.routing_report() if method is not None else None  # clears the feature cache, as each eval row
    return {"seconds": total, "cpu_seconds": cpu, "routing_seconds": routing, "groups": count,
            "router_accuracy": report.get("accuracy") if report else None}


def bench_samples(n: int) -> list:
    """The timed samples: the same for every variant and T (evenly from all six tasks, interleaved), so every variant
    generates from the same prompts; samples of tasks without an expert are routed too, and left out of the router
    accuracy."""
    per_task = -(-n // len(TASKS))
    by_task = [synthcit_samples(t, "test", per_task) for t in TASKS]
    return [by_task[k % len(TASKS)][k // len(TASKS)] for k in range(n)]


def run(args) -> dict[str, Any]:
    from mcit.data.collate import PixelCache
    from mcit.runtime.precision import AUTOCAST

    workdir = Path(args.out).with_suffix("")
    model, method, encoder, processor, recipe = build(args.variant, args.experts, args.proto_samples, workdir,
                                                      args.width)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.generation_config.min_new_tokens = args.new_tokens
    samples = bench_samples(args.samples)
    autocast = AUTOCAST[recipe.model.autocast]
    pixels = PixelCache(processor)
    timed_pass(model, method, encoder, pixels, samples[:4], args.new_tokens, args.batch, autocast)  # warm-up
    passes = [timed_pass(model, method, encoder, pixels, samples, args.new_tokens, args.batch, autocast)
              for _ in range(args.repeats)]
    seconds = statistics.median(p["seconds"] for p in passes)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        timed_pass(model, method, encoder, pixels, samples, args.new_tokens, args.batch, autocast)
    config = getattr(model, "config", None) or model.get_base_model().config
    return {"variant": args.variant, "experts": args.experts, "samples": len(samples), "new_tokens": args.new_tokens,
            "batch": args.batch, "seconds": round(seconds, 4), "all_seconds": [round(p["seconds"], 4) for p in passes],
            "cpu_seconds": round(statistics.median(p["cpu_seconds"] for p in passes), 4),
            "routing_seconds": round(statistics.median(p["routing_seconds"] for p in passes), 4),
            "groups": passes[0]["groups"], "router_accuracy": passes[0]["router_accuracy"],
            "fused_layers": sorted(method._fused_layers(model)) if hasattr(method, "_fused_layers") else [],
            "ms_per_sample": round(1000 * seconds / len(samples), 3), "flops": float(counter.get_total_flops()),
            "width": config.text_config.hidden_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant", choices=["merged", "lora", "hide", "disco"])
    parser.add_argument("--experts", type=int, default=6)
    parser.add_argument("--samples", type=int, default=120)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--proto-samples", type=int, default=64)
    parser.add_argument("--width", type=int, default=None, help="language-model width of a random-init base "
                        "(default: the shipped base)")
    child_main(parser, run, argv)


if __name__ == "__main__":
    main()
