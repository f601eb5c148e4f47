"""Part 3 (evaluation): mcit's batched generation against one-at-a-time `generate` on the same checkpoint and samples.

The checkpoint is a LoRA trained for `--train-steps` steps on the evaluated tasks (untimed), so answers have the
lengths a trained model gives. Both sides decode greedily with the same `max_new_tokens` and autocast:

- **batched**: `mcit.evaluation.generate.generate` (prompts sorted by length, left padding, batch `--batch`);
- **one at a time**: what a user writes first: per sample, the processor renders the chat template and preprocesses
  the image, `model.generate(**inputs)` runs, the new tokens are decoded. Special tokens are not added by the
  tokenizer (the chat template is the whole prompt, as in training), so both sides feed identical token ids; the
  child checks that and reports it.

Predictions are compared string by string.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.common import child_main, synthcit_samples


def one_at_a_time(model, processor, samples, max_new_tokens: int, autocast, method=None,
                  pad_to_square: bool = False) -> tuple[list[str], list[list[int]]]:
    """Answers and prompt token ids, one `generate` per sample, nothing kept between samples.

    `method`: a routed method (HiDe, DISCO, ...) routes each sample alone through its `eval_groups`, as the
    reference implementations route inside the forward pass; None runs the model as it is. `pad_to_square`: the
    recipe's `benchmark.pad_to_square` (LLaVA-1.5's `image_aspect_ratio: pad`), applied as mcit applies it.
    """
    import contextlib

    import torch
    from PIL import Image

    from mcit.data.collate import pad_to_square as square
    from mcit.runtime.precision import autocast as autocast_context

    answers, prompts = [], []
    eos = model.generation_config.eos_token_id
    stops = set(eos) if isinstance(eos, list | tuple) else {eos}
    device = next(model.parameters()).device
    model.eval()
    for sample in samples:
        user = sample.turns[0][0]
        content = ([{"type": "image"}] if user.startswith("<image>\n") else []) + [
            {"type": "text", "text": user.removeprefix("<image>\n")}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        if sample.image is None:
            inputs = processor(text=text, return_tensors="pt", add_special_tokens=False)
        else:
            with Image.open(sample.image) as img:
                image = img.convert("RGB")
            if pad_to_square:
                image = square(image, processor)
            inputs = processor(text=text, images=image, return_tensors="pt", add_special_tokens=False)
        prompts.append(inputs["input_ids"][0].tolist())
        inputs = inputs.to(device)
        groups = method.eval_groups(model, [sample]) if method is not None else [(contextlib.nullcontext(), [0])]
        for context, _ in groups:
            with context, torch.inference_mode(), autocast_context(autocast, device):
                out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=eos)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        end = next((k for k, t in enumerate(new) if t in stops), len(new))
        answers.append(processor.tokenizer.decode(new[:end], skip_special_tokens=True).strip())
    return answers, prompts


def run(args) -> dict[str, Any]:
    from bench.train_speed import prepare_mcit
    from mcit.data.collate import PixelCache
    from mcit.evaluation.generate import generate

    tasks = args.tasks.split(",")
    workdir = Path(args.out).with_suffix("")
    trainer, _, _, encoder = prepare_mcit(args.tasks, args.train_steps, 32, args.autocast, workdir)
    t0 = time.perf_counter()
    trainer.run()
    train_seconds = time.perf_counter() - t0
    model = trainer.model
    processor = encoder.processor
    samples = [s for t in tasks for s in synthcit_samples(t, "test", args.per_task)]
    # warm both paths on two samples (first-call allocations), then time all samples
    generate(model, encoder, samples[:2], PixelCache(processor), batch_size=args.batch,
             max_new_tokens=args.max_new_tokens, autocast=_dtype(args.autocast))
    one_at_a_time(model, processor, samples[:2], args.max_new_tokens, args.autocast)
    t0, c0 = time.perf_counter(), time.process_time()
    batched = generate(model, encoder, samples, PixelCache(processor), batch_size=args.batch,
                       max_new_tokens=args.max_new_tokens, autocast=_dtype(args.autocast))
    batched_s, batched_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    single, prompts = one_at_a_time(model, processor, samples, args.max_new_tokens, args.autocast)
    single_s, single_cpu = time.perf_counter() - t0, time.process_time() - c0
    same_inputs = sum(p == encoder.prompt_ids(s) for p, s in zip(prompts, samples))
    identical = [a == b for a, b in zip(batched, single)]
    examples = [{"task": s.task, "batched": a, "single": b} for s, a, b in zip(samples, batched, single) if a != b]
    return {"samples": len(samples), "tasks": tasks, "batch": args.batch, "max_new_tokens": args.max_new_tokens,
            "autocast": args.autocast, "adapter_train_steps": args.train_steps,
            "adapter_train_seconds": round(train_seconds, 2),
            "batched_seconds": round(batched_s, 3), "single_seconds": round(single_s, 3),
            "batched_samples_per_s": round(len(samples) / batched_s, 2),
            "single_samples_per_s": round(len(samples) / single_s, 2),
            "speedup": round(single_s / batched_s, 2), "batched_cpu_seconds": round(batched_cpu, 3),
            "single_cpu_seconds": round(single_cpu, 3), "speedup_cpu": round(single_cpu / batched_cpu, 2),
            "identical": sum(identical),
            "identical_inputs": same_inputs, "mean_answer_chars": round(sum(map(len, single)) / len(single), 1),
            "differences": examples[:5]}


def _dtype(name: str | None):
    from mcit.runtime.precision import AUTOCAST

    return AUTOCAST[name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="shape,count,caption")
    parser.add_argument("--per-task", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--autocast", default="bf16", type=lambda s: None if s in ("none", "null") else s)
    child_main(parser, run, argv)


if __name__ == "__main__":
    main()
