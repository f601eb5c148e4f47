"""Part 1 (training throughput) and part 2 (MFU): mcit's training loop against a plain transformers `Trainer` + PEFT.

Both sides train the same LoRA (r 8, alpha 16, dropout 0.05 on the language model's q/k/v/o/gate/up/down) on the
same tiny base, the same SynthCIT samples (one epoch of `steps * batch` samples), the same batch size, optimizer
settings (AdamW, lr 1e-3, 3 % warmup, cosine, clip 1.0) and number of optimizer steps. Loading, tokenization and
model set-up are excluded: each side records a timestamp after every optimizer step, and the first `warmup` steps are
dropped, so the numbers are steady-state steps.

- **mcit**: `mcit.train.loop.StageTrainer` exactly as `mcit train` runs it (length-grouped batches padded to the
  longest in the batch, images preprocessed once and cached, bf16 autocast from the recipe); step checkpoints off
  (`save_steps 0`), as on the Trainer side.
- **trainer**: a plain script: text pre-tokenized with the processor's chat template (prompt masked in the labels),
  images opened and preprocessed by the collate function, `Trainer` with its defaults (random batches, fp32) or with
  `bf16=True` and `group_by_length` (`trainer-tuned`: the two switches a user would try first).

Tokens/s counts real tokens (image placeholders included, padding excluded) of the timed steps.

`--dropout-masks packed` runs the mcit side with `method.lora.dropout_masks: packed` (the same Bernoulli dropout from
a quarter of the generator draws; the Trainer side keeps PEFT's `nn.Dropout`).

`--dropout 0` runs either side without LoRA dropout: a diagnostic pair, not the headline. The dropout masks cost both
sides the same (the CPU's random-number generator is serial), so without them the ratio shows what the training loop
itself saves.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.common import child_main, synthcit_samples

LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
RECIPE = "recipes/synthcit/lora_ft.yaml"


def _lm_target_regex() -> str:
    from mcit.config import DEFAULT_LORA_TARGETS

    # the language model's linears only; a plain `target_modules=[...q_proj...]` would also wrap the CLIP tower
    return rf"^(?:base_model\.model\.)?model\.language_model\.layers\.\d+\..*\b(?:{'|'.join(DEFAULT_LORA_TARGETS)})$"


def _stamp() -> tuple[float, float]:
    """(wall clock, this process's CPU time): CPU time is what the process got, wall what it waited."""
    return time.perf_counter(), time.process_time()


def _steady(stamps: list[tuple[float, float]], sizes: list[int], tokens: list[int], warmup: int) -> dict[str, Any]:
    """Throughput of steps warmup+1..N from per-step end stamps (stamps[0] = end of step 1).

    `cpu_seconds` (CPU time of all the process's threads over the same steps) stays meaningful when other processes
    share the cores; `samples_per_cpu_s` compares two sides fairly on a busy machine."""
    if len(stamps) <= warmup + 1:
        raise RuntimeError(f"only {len(stamps)} steps recorded; need more than warmup={warmup} + 1")
    first = warmup if warmup > 0 else 1
    span = stamps[-1][0] - stamps[first - 1][0]
    cpu = stamps[-1][1] - stamps[first - 1][1]
    samples, toks = sum(sizes[first:]), sum(tokens[first:])
    steps = len(stamps) - first
    return {"timed_steps": steps, "seconds": round(span, 4), "cpu_seconds": round(cpu, 4), "samples": samples,
            "tokens": toks, "samples_per_s": round(samples / span, 2), "tokens_per_s": round(toks / span, 1),
            "samples_per_cpu_s": round(samples / cpu, 2), "seconds_per_step": round(span / steps, 4)}


# --- mcit ----------------------------------------------------------------------------------------------------------

def mcit_recipe(task: str, steps: int, batch: int, autocast: str | None, workdir: Path,
                dropout: float = LORA["dropout"], base: Path | None = None, dropout_masks: str = "bernoulli"):
    from mcit.config import load_recipe

    overrides = [*([f"model.name_or_path={base}"] if base else []), f"output_dir={workdir}", f"benchmark.tasks=[{task}]", f"train.max_steps={steps}",
                 f"train.batch_size={batch}", "train.save_steps=0", "train.log_steps=1", "train.lr=1e-3",
                 f"method.lora.r={LORA['r']}", f"method.lora.alpha={LORA['alpha']}",
                 f"method.lora.dropout={dropout}", f"method.lora.dropout_masks={dropout_masks}",
                 f"model.autocast={autocast or 'null'}"]
    return load_recipe(Path(__file__).resolve().parents[1] / RECIPE, overrides)


def prepare_mcit(task: str, steps: int, batch: int, autocast: str | None, workdir: Path, method_name: str = "lora_ft",
                 dropout: float = LORA["dropout"], base: Path | None = None, dropout_masks: str = "bernoulli"):
    """A model with the method's adapter, the encoded samples and a StageTrainer ready to run (untimed)."""
    from mcit.data.collate import Encoder, PixelCache
    from mcit.methods.base import TaskData, build_method
    from mcit.train.loop import StageTrainer
    from mcit.workflows.load import attach_method, build_model

    tasks = task.split(",")
    recipe = mcit_recipe(tasks[0], steps, batch, autocast, workdir, dropout, base, dropout_masks)
    recipe.method.name = method_name
    per_task = -(-steps * batch // len(tasks))
    samples = [s for name in tasks for s in synthcit_samples(name, "train", per_task)][:steps * batch]
    model, processor = build_model(recipe)
    data = TaskData([task], {task: samples}, {task: []})
    method = build_method(recipe)
    model = attach_method(method, model, processor, recipe, data, output_dir=workdir)
    method.prepare(model, 0, [0])
    encoder = Encoder(processor, recipe.train.max_length)
    encoded = [encoder.encode(s, i) for i, s in enumerate(samples)]
    stamps: list[tuple[float, float]] = []
    trainer = StageTrainer(model, method, recipe, encoded, PixelCache(processor), encoder.tokenizer.pad_token_id,
                           stage=0, label=task, step_dir=workdir / "last-step",
                           log=lambda record: stamps.append(_stamp()))
    return trainer, stamps, encoded, encoder


def count_step_flops(trainer, encoded, steps: list[int]) -> list[float]:
    """FLOPs of forward + backward of the given steps' micro-batches, counted by torch's FlopCounterMode (matmuls,
    attention); the optimizer step adds O(trainable params), negligible here."""
    from torch.utils.flop_counter import FlopCounterMode

    from mcit.runtime.precision import autocast as autocast_context

    model = trainer.model
    model.train()
    out = []
    for step in steps:
        total = 0
        for micro in range(trainer.plan.grad_accum):
            batch = trainer._batch(trainer.plan.micro_batches[step * trainer.plan.grad_accum + micro])
            counter = FlopCounterMode(display=False)
            with counter, autocast_context(trainer.recipe.model.autocast):
                loss = model(**batch).loss
                loss.backward()
            total += counter.get_total_flops()
        model.zero_grad(set_to_none=True)
        out.append(float(total))
    return out


def step_breakdown(trainer, steps: list[int]) -> dict[str, Any]:
    """Where a step's time goes: wall seconds of batch building, forward, backward and clip + optimizer over `steps`
    (a second pass over the same batches, after the timed run: images are cached by then, so `batch` is the cached
    cost), and the top operators of a profiled third pass by self CPU time. The frozen linear weights are held in
    the autocast dtype as in the timed loop (`FrozenLinearCast`), so the profile shows that loop's casts."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mcit.runtime.precision import AUTOCAST
    from mcit.runtime.precision import autocast as autocast_context
    from mcit.train.frozen_cast import FrozenLinearCast

    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-9)
    plan = trainer.plan

    def one_step(step: int, clock: dict[str, float]) -> None:
        t0 = time.perf_counter()
        batch = trainer._batch(plan.micro_batches[step * plan.grad_accum])
        t1 = time.perf_counter()
        with autocast_context(trainer.recipe.model.autocast):
            loss = model(**batch).loss
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for key, value in (("batch", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2), ("optimizer", t4 - t3)):
            clock[key] = clock.get(key, 0.0) + value

    # the frozen linears in the autocast dtype, as StageTrainer.run holds them for its steps
    cast = FrozenLinearCast(model, AUTOCAST.get(trainer.recipe.model.autocast))
    clock: dict[str, float] = {}
    cast.apply()
    try:
        for step in steps:
            one_step(step, clock)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for step in steps:
                one_step(step, {})
    finally:
        cast.restore()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return {"steps": len(steps), "seconds_per_step": {k: round(v / len(steps), 4) for k, v in clock.items()},
            "top_ops": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
                        for e in events[:8]]}


def run_mcit(args) -> dict[str, Any]:
    workdir = Path(args.out).with_suffix("")
    trainer, stamps, encoded, _ = prepare_mcit(args.task, args.steps, args.batch, args.autocast, workdir,
                                               dropout=args.dropout, base=_base(args),
                                               dropout_masks=getattr(args, "dropout_masks", "bernoulli"))
    plan = trainer.plan
    sizes = [len(plan.micro_batches[s]) for s in range(plan.steps)]
    tokens = [sum(len(encoded[i]) for i in plan.micro_batches[s]) for s in range(plan.steps)]
    padded = [len(plan.micro_batches[s]) * max(len(encoded[i]) for i in plan.micro_batches[s])
              for s in range(plan.steps)]
    stats = trainer.run()
    result = {"side": "mcit", "autocast": args.autocast, "dropout": args.dropout,
              "dropout_masks": getattr(args, "dropout_masks", "bernoulli"), "steps": plan.steps,
              "batch": args.batch, "width": getattr(args, "width", None),
              "device": str(next(trainer.model.parameters()).device),
              "final_loss": stats["final_loss"], "padding_fraction": round(1 - sum(tokens) / sum(padded), 4),
              **_steady(stamps, sizes, tokens, args.warmup)}
    if args.breakdown:
        result["breakdown"] = step_breakdown(trainer, list(range(args.warmup, min(plan.steps, args.warmup + 5))))
    if args.flops:
        timed = list(range(max(1, args.warmup), plan.steps))
        flops = count_step_flops(trainer, encoded, timed)
        params = sum(p.numel() for p in trainer.model.parameters())
        result.update({"flops_counted": sum(flops), "flops_per_step": sum(flops) / len(flops),
                       "parameters": params, "flops_6nt": 6.0 * params * result["tokens"]})
    return result


def _base(args) -> Path | None:
    """The random-init wide base of `--width` (built once next to the output), or None for the shipped base."""
    if not getattr(args, "width", None):
        return None
    from bench.router_speed import wide_base

    return wide_base(args.width, Path(args.out).resolve().parent)


# --- plain transformers Trainer + PEFT ----------------------------------------------------------------------------

def run_trainer(args) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

    from bench.common import base_model_dir

    tuned = args.side == "trainer-tuned"
    path = _base(args) or base_model_dir()
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=args.dropout,
                                             target_modules=_lm_target_regex(), bias="none"))
    samples = synthcit_samples(args.task, "train", args.steps * args.batch)
    image_tokens = processor.num_image_tokens if hasattr(processor, "num_image_tokens") else 36
    expand = processor.image_token * image_tokens
    rows = []
    for s in samples:  # pre-tokenized text (untimed, as mcit's encoding)
        user, answer = s.turns[0]
        content = [{"type": "image"}, {"type": "text", "text": user.removeprefix("<image>\n")}]
        prompt_msgs = [{"role": "user", "content": content}]
        full_msgs = prompt_msgs + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        prompt = processor.apply_chat_template(prompt_msgs, add_generation_prompt=True).replace(
            processor.image_token, expand)
        full = processor.apply_chat_template(full_msgs).replace(processor.image_token, expand)
        ids = processor.tokenizer(full, add_special_tokens=False)["input_ids"]
        n_prompt = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        rows.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:], "image": s.image,
                     "length": len(ids)})
    pad = processor.tokenizer.pad_token_id

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        images = [Image.open(r["image"]).convert("RGB") for r in batch]
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            stamps.append(_stamp())

    workdir = Path(args.out).with_suffix("")
    training = TrainingArguments(
        output_dir=str(workdir), per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-3,
        warmup_steps=0.03, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0, save_strategy="no",
        logging_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), bf16=tuned,
        disable_tqdm=True, seed=0,
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=False,
        train_sampling_strategy="group_by_length" if tuned else "random")
    trainer = Trainer(model=model, args=training, train_dataset=Rows(), data_collator=collate,
                      callbacks=[Stamp()])
    # the batches the sampler will produce are not exposed; record them through the collate function instead
    seen: list[tuple[int, int, int]] = []
    inner = trainer.data_collator

    def recording(batch):
        seen.append((len(batch), sum(len(r["input_ids"]) for r in batch),
                     len(batch) * max(len(r["input_ids"]) for r in batch)))
        return inner(batch)

    trainer.data_collator = recording
    out = trainer.train()
    sizes, tokens = [s[0] for s in seen[:len(stamps)]], [s[1] for s in seen[:len(stamps)]]
    padded = [s[2] for s in seen[:len(stamps)]]
    return {"side": args.side, "autocast": "bf16" if tuned else None, "dropout": args.dropout, "steps": len(stamps),
            "batch": args.batch, "width": getattr(args, "width", None),
            "device": str(next(model.parameters()).device),
            "final_loss": out.training_loss, "padding_fraction": round(1 - sum(tokens) / sum(padded), 4),
            **_steady(stamps, sizes, tokens, args.warmup)}


# --- matmul peak ---------------------------------------------------------------------------------------------------

def matmul_peak(sizes=(1024, 2048, 4096), repeats: int = 5) -> dict[str, Any]:
    """Best achieved FLOP/s of square matmuls in fp32 and bf16 (2 n^3 FLOPs each), on the GPU when there is one
    (synchronised around each product), else on the CPU: the denominator of MFU on the device the training ran on."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best, per_size = 0.0, {}
        for n in sizes:
            a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
            torch.mm(a, b)
            sync()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.mm(a, b)
                sync()
                times.append(time.perf_counter() - t0)
            rate = 2 * n ** 3 / min(times)
            per_size[str(n)] = round(rate / 1e9, 3)
            best = max(best, rate)
        out[name] = {"peak_gflops": round(best / 1e9, 3), "by_size_gflops": per_size}
    return out


def run_peak(args) -> dict[str, Any]:
    return matmul_peak(tuple(int(x) for x in args.sizes.split(",")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("side", choices=["mcit", "trainer", "trainer-tuned", "peak"])
    parser.add_argument("--task", default="caption")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--autocast", default="bf16", type=lambda s: None if s in ("none", "null") else s)
    parser.add_argument("--dropout", type=float, default=LORA["dropout"],
                        help="LoRA dropout of both sides (0 = the diagnostic pair without dropout masks)")
    parser.add_argument("--dropout-masks", default="bernoulli", choices=["bernoulli", "packed"],
                        help="mcit side: the recipe's method.lora.dropout_masks (the Trainer side always uses PEFT's "
                             "nn.Dropout)")
    parser.add_argument("--flops", action="store_true")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--width", type=int, default=None,
                        help="a random-init base whose language model is this wide (bench.router_speed.wide_base)")
    run = {"mcit": run_mcit, "trainer": run_trainer, "trainer-tuned": run_trainer, "peak": run_peak}
    child_main(parser, lambda args: run[args.side](args), argv)


if __name__ == "__main__":
    main()
