"""Setting a method up and training its stages without the runner, as the runner would: the tiny base, a small
SynthCIT, a few AdamW steps per stage. A fixture module shared by the method and routing tests; it holds no tests."""

from __future__ import annotations

import torch

from mcit.config import recipe_from_dict
from mcit.data.collate import Encoder, PixelCache, collate
from mcit.methods.base import RunContext, build_method
from mcit.models.loading import load_base
from mcit.workflows.load import load_task_data, prepare_card

TASKS = ["shape", "mc-color", "caption"]


def build(root, name: str = "hide", tasks=TASKS, r: int = 4, **options):
    """(model, method, ctx) for `name` over the small SynthCIT, set up as the runner would."""
    recipe = recipe_from_dict({
        "output_dir": "unused", "seed": 0, "model": {"name_or_path": "builtin:tiny-llava", "autocast": None},
        "benchmark": {"card": "synthcit", "root": str(root), "tasks": list(tasks), "max_train": 24, "max_test": 6},
        "method": {"name": name, "lora": {"r": r, "alpha": 2 * r, "dropout": 0.0}, **options},
        "train": {"max_length": 160}})
    data = load_task_data(prepare_card(recipe), recipe, lambda _r: None)
    model, processor = load_base(recipe.model)
    ctx = RunContext(processor=processor, recipe=recipe, data=data)
    method = build_method(recipe)
    torch.manual_seed(1)
    return method.attach(model, ctx), method, ctx


def train_stage(model, method, ctx, stage: int, steps: int = 2, lr: float = 5e-2) -> None:
    """prepare + before_task + a few AdamW steps on the stage's samples + after_task, like the runner."""
    method.prepare(model, stage, [stage])
    method.before_task(model, stage, [stage], ctx.data)
    optimizer = torch.optim.AdamW([{**g, "lr": lr} for g in method.param_groups(model, method.recipe.train)])
    samples = method.train_samples(stage, [stage], ctx.data)
    model.train()
    for _, batch in zip(range(steps), encode(ctx, samples)):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    method.after_task(model, stage, [stage], ctx.data)


def encode(ctx, samples):
    """Training batches of `samples` (8 at a time), as the runner's collate builds them."""
    encoder, pixels = Encoder(ctx.processor, 160), PixelCache(ctx.processor)
    for k in range(0, len(samples), 8):
        yield collate([encoder.encode(s) for s in samples[k:k + 8]], encoder.tokenizer.pad_token_id, pixels)


def adapter_tensors(model, name: str) -> dict[str, torch.Tensor]:
    """Detached copies of adapter `name`'s parameters (PEFT names them `...lora_A.<name>.weight`)."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if f".{name}." in k}


def batch_of(ctx, samples) -> dict:
    """The first training batch of `samples`."""
    return next(iter(encode(ctx, samples)))
