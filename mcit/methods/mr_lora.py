"""MR-LoRA (`mr_lora`): one isolated LoRA expert per task, and the MLLM itself, with a router LoRA, picks the expert.

Zhao et al., "MLLM-CL: Continual Learning for Multimodal Large Language Models", 2025 (MR-LoRA), as added to
MCITlib. Task t trains a fresh LoRA adapter `expert<t>` on its own data only (PEFT runs that adapter alone; the others
get no gradient and no optimizer state, so every expert is frozen once its task ends). After the expert, a separate
LoRA adapter `router` on the same base is trained with plain cross-entropy to answer a letter (A, B, ...) from a fixed
"model pool" prompt: the image, one line per expert trained so far (a description of its task), the user question and
"Answer with the letter only." Its data are `replay_per_task` samples kept from each seen task's training set.

Inference is two passes: one batched greedy routing generation with the router adapter per evaluation row (cached, so
generation and constrained ranking share it), hard top-1, then each group of samples is answered by its chosen expert
through PEFT's own adapter path (one LoRA per forward, as in training). A router answer without a valid letter is
routed to a seeded random expert and counted (`fallbacks` in the routing report); a misrouted sample is answered by
the expert it was sent to and scored as it comes out. The routing report adds `fallbacks`, `routing_generations` (one
per routed sample: the cost of the method over a single expert) and is also written to
`analysis/mr_lora-routing-stage-XX.json`, because results.json keeps only the accuracy and confusion of each row.

Choices and deviations, each on purpose:
- the router is retrained from a fresh LoRA init at every stage (MCITlib's choice), on the replay of every seen task,
  so its prompt and its training always list exactly the experts that exist; it never sees a future expert (MCITlib's
  prompt lists all experts from the start). Retraining costs `epochs` x 20 x t samples at stage t;
- the router has its own `lr`, `epochs` / `max_steps`, `batch_size` and rank (`method.router`), trained in a small
  plain-PyTorch loop after the expert (one process's view: under a launch every rank trains the same router on the
  same replay and rank 0's weights are broadcast; ZeRO-3 is refused), so the accuracy matrix keeps one row per task;
- misrouted samples are scored, never dropped (MCITlib drops them, which inflates scores); a non-letter answer is a
  counted event, not a silent random pick;
- the projector, vision tower and base stay frozen (`model.train_projector` etc. are refused): a shared trained
  module would change every earlier expert, which MR-LoRA's isolation rules out (MCITlib's configs train the
  projector);
- the descriptions in the pool prompt come from `router.descriptions` (task name -> text; the official prompt is
  hand-written per domain), defaulting to the task's name;
- `router.mode: oracle` sends each sample of a trained task to its own expert (routing errors vs expert quality).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mcit.data.collate import Encoded, Encoder, PixelCache, collate, epoch_batches
from mcit.data.records import IMAGE_PREFIX, Sample
from mcit.errors import RecipeError
from mcit.methods.base import TaskData, register
from mcit.methods.experts import ExpertMethod
from mcit.methods.lora import add_lora, set_lora_trainable
from mcit.runs.folder import RunFolder
from mcit.runtime import dist
from mcit.runtime.files import write_json_atomic
from mcit.runtime.placement import module_device, to_device
from mcit.runtime.precision import autocast, eval_mode
from mcit.runtime.seeding import seed_everything
from mcit.runtime.zero import full_shape, zero_stage

logger = logging.getLogger(__name__)

ROUTER = "router"
"""The router's PEFT adapter name."""
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER = re.compile(r"^\W*([A-Z])(?![A-Za-z])")
"""A valid router answer starts with one capital letter, optionally wrapped ("B", "B.", "(B)"); "Answer: B" is not."""


@dataclass
class LetterRouterOptions:
    """The router LoRA (recipe keys under `method.router`)."""

    mode: Literal["generated", "oracle"] = "generated"
    """`generated`: the router LoRA names the expert; `oracle`: a trained task's samples go to its own expert."""
    lr: float = 2e-4
    epochs: int = 30
    """Passes over the replay at every stage (MCITlib 30; official 40)."""
    max_steps: int | None = None
    """Optimizer steps per stage instead of `epochs` (quick runs, tests)."""
    batch_size: int | None = None
    """Router micro-batch; null: `train.batch_size`. No gradient accumulation (the replay is small)."""
    r: int | None = None
    """Router LoRA rank; null: `method.lora.r` (MCITlib: the experts' rank)."""
    alpha: int | None = None
    """Router LoRA alpha; null: `method.lora.alpha`."""
    max_new_tokens: int = 4
    """Tokens the routing generation may produce (a letter, perhaps wrapped, then EOS)."""
    max_length: int | None = None
    """Tokens of a routing sample (image, pool prompt, question, letter); null: `train.max_length`. The pool prompt
    grows by one line per expert, so it usually needs more room than the task samples."""
    descriptions: dict[str, str] = field(default_factory=dict)
    """Task name -> the expert's line in the model-pool prompt; a task not listed is described by its name."""


@dataclass
class MRLoRAOptions:
    replay_per_task: int = 20
    """Training samples kept from each task to train the router (the seed picks them)."""
    router: LetterRouterOptions = field(default_factory=LetterRouterOptions)


def router_letter(answer: str, count: int) -> int | None:
    """The expert index a router answer names, or None when it names none of the `count` experts."""
    found = _LETTER.match(answer.strip())
    if found is None:
        return None
    index = LETTERS.index(found.group(1))
    return index if index < count else None


class LetterRouter:
    """The routing strategy of MR-LoRA (the duties of mcit.routing.router): `observe` keeps a task's replay samples,
    `weights` asks the router adapter for a letter per sample (one-hot rows), `reset` forgets one evaluation row,
    `state`/`tensors`/`load` save the replay ids (the router's weights are LoRA tensors of the model)."""

    def __init__(self, options: LetterRouterOptions, replay_per_task: int, recipe):
        self.options = options
        self.replay_per_task = replay_per_task
        self.recipe = recipe
        self.replay: dict[str, list[str]] = {}
        """Sample ids kept per task for router training."""
        self._choices: dict[tuple, int] = {}
        self.answers: dict[tuple[str, str], tuple[str, bool]] = {}
        """(task, id) -> (router answer, fell back) of the generations since the last `reset`."""
        self._pixels: PixelCache | None = None

    # --- prompt ----------------------------------------------------------------------------------------------------
    def describe(self, tasks: Sequence[str]) -> str:
        return "; ".join(self.options.descriptions.get(t, f"the expert for the task '{t}'") for t in tasks)

    def prompt(self, question: str, experts: Sequence[str], expert_tasks: Mapping[str, Sequence[str]]) -> str:
        """The model-pool prompt: only the experts given (those trained so far), in creation order."""
        pool = "\n".join(f"{LETTERS[i]}. {self.describe(expert_tasks[e])}" for i, e in enumerate(experts))
        return ("Choose the expert model that should answer the request below, judging from the image and the "
                f"text.\nExperts:\n{pool}\nRequest: {question}\nAnswer with the letter only.")

    def encoder(self, processor) -> Encoder:
        """The routing samples' encoder: the run's, with the router's own `max_length`."""
        return Encoder(processor, self.options.max_length or self.recipe.train.max_length,
                       pad_to_square=self.recipe.benchmark.pad_to_square)

    def pixels(self, processor) -> PixelCache:
        """The router's preprocessed images (`benchmark.image_cache_mb`), kept across evaluation batches and rows
        while the processor stays the same (and across router trainings), so a routed test image is preprocessed once
        per run, not once per row."""
        if self._pixels is None or self._pixels.processor is not processor:
            self._pixels = PixelCache.from_recipe(processor, self.recipe)
        return self._pixels

    def routing_sample(self, sample: Sample, experts: Sequence[str], expert_tasks: Mapping[str, Sequence[str]],
                       letter: str = "") -> Sample:
        text = self.prompt(sample.question, experts, expert_tasks)
        return Sample(id=f"{sample.id}#route", task=sample.task, image=sample.image,
                      turns=[(IMAGE_PREFIX + text if sample.image else text, letter)], meta={"style": "letter"})

    # --- the strategy ----------------------------------------------------------------------------------------------
    def observe(self, model, processor, task: str, samples: Sequence[Sample]) -> None:
        if task in self.replay:
            return
        pool = list(samples)
        keep = random.Random(f"{self.recipe.seed}:mr_lora:replay:{task}").sample(
            pool, min(self.replay_per_task, len(pool)))
        self.replay[task] = [s.id for s in keep]

    def training_samples(self, data: TaskData, experts: Sequence[str],
                         expert_tasks: Mapping[str, Sequence[str]]) -> list[Sample]:
        """The router's data at this stage: every seen task's replay, answered with its expert's letter."""
        out = []
        for i, expert in enumerate(experts):
            for task in expert_tasks[expert]:
                by_id = {s.id: s for s in data.train[task]}
                out += [self.routing_sample(by_id[k], experts, expert_tasks, LETTERS[i]) for k in self.replay[task]]
        return out

    def weights(self, model, processor, samples: Sequence[Sample], experts: Sequence[str],
                expert_tasks: Mapping[str, Sequence[str]]) -> torch.Tensor:
        """(n, len(experts)) one-hot rows: the expert each sample's router answer names (hard top-1)."""
        pool = tuple(experts)
        need = []
        for i, s in enumerate(samples):
            key = (s.task, s.id, pool)
            if key in self._choices:
                continue
            true = next((k for k, e in enumerate(experts) if s.task in expert_tasks[e]), None)
            if self.options.mode == "oracle" and true is not None:
                self._choices[key] = true
            else:
                need.append(i)
        if need:
            asked = [samples[i] for i in need]
            for s, answer in zip(asked, self.generate(model, processor, asked, experts, expert_tasks), strict=True):
                choice = router_letter(answer, len(experts))
                fallback = choice is None
                if fallback:  # deterministic per sample, so a rerun routes it the same way
                    choice = random.Random(f"{self.recipe.seed}:mr_lora:fallback:{s.task}:{s.id}").randrange(
                        len(experts))
                self._choices[(s.task, s.id, pool)] = choice
                self.answers[(s.task, s.id)] = (answer, fallback)
        out = torch.zeros(len(samples), len(experts))
        for i, s in enumerate(samples):
            out[i, self._choices[(s.task, s.id, pool)]] = 1.0
        return out

    def generate(self, model, processor, samples: Sequence[Sample], experts: Sequence[str],
                 expert_tasks: Mapping[str, Sequence[str]]) -> list[str]:
        """The routing pass: greedy answers of the router adapter to the model-pool prompts of `samples`."""
        prompts = [self.routing_sample(s, experts, expert_tasks) for s in samples]
        encoder = self.encoder(processor)
        with AdapterActive(model, ROUTER):
            return greedy_answers(model, encoder, self.pixels(processor), prompts,
                                  batch_size=self.recipe.eval.batch_size, max_new_tokens=self.options.max_new_tokens,
                                  autocast_dtype=self.recipe.model.autocast)

    def reset(self) -> None:
        self._choices = {}
        self.answers = {}

    # --- state -----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"replay": {k: list(v) for k, v in self.replay.items()}}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.replay = {str(k): [str(i) for i in v] for k, v in state.get("replay", {}).items()}


def greedy_answers(model, encoder: Encoder, pixels: PixelCache, samples: Sequence[Sample], *, batch_size: int,
                   max_new_tokens: int, autocast_dtype) -> list[str]:
    """Greedy short answers of `samples`, left-padded batches (image and text-only samples apart), decoded until EOS.

    The evaluator's generator sits in a layer above the methods, so the routing pass has its own: it needs only a
    few tokens and the same prompts `Encoder` gives training."""
    tokenizer = encoder.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    stops = set(eos) if isinstance(eos, list | tuple) else {eos}
    prompts = [encoder.prompt_ids(s) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (samples[i].image is None, len(prompts[i])))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and \
                (samples[i].image is None) == (samples[batches[-1][0]].image is None):
            batches[-1].append(i)
        else:
            batches.append([i])
    device = module_device(model)
    answers = [""] * len(samples)
    with eval_mode(model), torch.inference_mode():
        for batch in batches:
            items = [Encoded(prompts[i], [-100] * len(prompts[i]), samples[i].image, i) for i in batch]
            inputs = to_device({k: v for k, v in collate(items, pad, pixels, padding_side="left").items()
                                if k != "labels"}, device)
            with autocast(autocast_dtype, device):
                out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     eos_token_id=eos)
            for i, row in zip(batch, out[:, inputs["input_ids"].shape[1]:].tolist(), strict=True):
                end = next((k for k, token in enumerate(row) if token in stops), len(row))
                answers[i] = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
    return answers


class AdapterActive:
    """Run one PEFT adapter for the body (PEFT's own path: one LoRA per forward); the previously active adapter and
    every LoRA weight's requires_grad flag (which PEFT's set_adapter changes) are put back on exit. `.routes[k]`
    labels the k-th sample of an evaluation group."""

    def __init__(self, model, adapter: str, routes: Sequence[str] | None = None):
        self.model, self.adapter = model, adapter
        self.routes = list(routes) if routes is not None else None
        self._saved: tuple[str, list] | None = None

    def __enter__(self) -> AdapterActive:
        grads = [(p, p.requires_grad) for n, p in self.model.named_parameters() if "lora_" in n]
        self._saved = (self.model.active_adapter, grads)
        self.model.set_adapter(self.adapter)
        return self

    def __exit__(self, *exc) -> None:
        assert self._saved is not None
        active, grads = self._saved
        self.model.set_adapter(active)
        for param, flag in grads:
            param.requires_grad_(flag)


@register("mr_lora")
class MRLoRA(ExpertMethod):
    Options = MRLoRAOptions
    expert_prefix = "expert"

    def __init__(self, recipe, options: MRLoRAOptions):
        if options.replay_per_task < 1:
            raise RecipeError(f"method.replay_per_task is {options.replay_per_task}, but the router is trained only "
                              "on replayed samples of every seen task; set it >= 1 (MCITlib: 20)")
        ro = options.router
        for key, value, low in (("lr", ro.lr, 0.0), ("epochs", ro.epochs, 1), ("max_steps", ro.max_steps, 1),
                                ("batch_size", ro.batch_size, 1), ("r", ro.r, 1), ("alpha", ro.alpha, 1),
                                ("max_new_tokens", ro.max_new_tokens, 1), ("max_length", ro.max_length, 1)):
            if value is not None and (value <= low if key == "lr" else value < low):
                raise RecipeError(f"method.router.{key} must be {'>' if key == 'lr' else '>='} {low}, got {value}")
        shared = [k for k in ("train_projector", "train_vision", "full_finetune") if getattr(recipe.model, k)]
        if shared:
            raise RecipeError(f"model.{shared[0]} is true, but mr_lora keeps every expert isolated and a shared trained "
                              f"module would change earlier experts; set model.{shared[0]}: false")
        if zero_stage(recipe.train.deepspeed) >= 3:
            raise RecipeError(f"train.deepspeed is {recipe.train.deepspeed}, but mr_lora trains its router in its own "
                              "loop on full (unsharded) parameters; use train.deepspeed: zero2")
        super().__init__(recipe, options)
        self.router_history: list[dict[str, Any]] = []

    def make_router(self) -> LetterRouter:
        return LetterRouter(self.options.router, self.options.replay_per_task, self.recipe)

    # --- structure -------------------------------------------------------------------------------------------------
    def setup(self, model):
        model = super().setup(model)
        ro = self.options.router
        return add_lora(model, self.recipe, ROUTER, r=ro.r, alpha=ro.alpha)

    def prepare(self, model, stage: int, task_ids: Sequence[int]) -> None:
        name = self.expert_name(stage)
        self._ensure_expert(model, name)
        self._activate(model, name)

    def before_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        if stage >= len(LETTERS):
            raise RecipeError(f"benchmark: stage {stage + 1} would be expert {stage + 1}, but the router names experts "
                              f"by one letter A-Z; mr_lora runs at most {len(LETTERS)} tasks")
        name = self.expert_name(stage)
        for t in task_ids:
            self.observe_task(model, data.names[t], data)
            if data.names[t] not in self.expert_tasks[name]:
                self.expert_tasks[name].append(data.names[t])

    def after_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        try:
            self.train_router(model, data, stage)
        finally:
            self._activate(model, self.expert_name(stage))

    # --- the router's own training ---------------------------------------------------------------------------------
    def _router_parameters(self, model) -> list[torch.nn.Parameter]:
        return [p for n, p in model.named_parameters() if "lora_" in n and f".{ROUTER}." in n]

    def _reset_router(self, model) -> None:
        from peft.tuners.lora import LoraLayer

        for module in model.modules():
            if isinstance(module, LoraLayer) and ROUTER in module.lora_A:
                module.reset_lora_parameters(ROUTER, True)

    def train_router(self, model, data: TaskData, stage: int) -> dict[str, Any]:
        """Retrain the router LoRA from a fresh init on the replay of every seen task (its own lr/epochs/steps)."""
        ro, tc = self.options.router, self.recipe.train
        experts = self.trained_experts()
        samples = self.router.training_samples(data, experts, self.expert_tasks)
        encoder = self.router.encoder(self.ctx.processor)
        pixels = self.router.pixels(self.ctx.processor)  # the replayed images stay cached across stages
        encoded = []
        for i, s in enumerate(samples):
            need = len(encoder.prompt_ids(s)) + 2  # the letter and EOS
            if need > encoder.max_length:
                raise RecipeError(f"method.router.max_length is {encoder.max_length}, but the model-pool prompt of "
                                  f"{s.id!r} with {len(experts)} experts needs {need} tokens; raise "
                                  "method.router.max_length")
            encoded.append(encoder.encode(s, i))
        seed = self.recipe.seed + 1000 * (stage + 1) + 2
        seed_everything(seed)
        self._reset_router(model)
        model.set_adapter(ROUTER)
        set_lora_trainable(model, {ROUTER})
        params = self._router_parameters(model)
        size = ro.batch_size or tc.batch_size
        lengths = [len(e) for e in encoded]
        if ro.max_steps is not None:
            passes = math.ceil(ro.max_steps / max(1, math.ceil(len(encoded) / size)))
            plan = list(epoch_batches(lengths, size, seed, passes, group=tc.group_by_length))[:ro.max_steps]
        else:
            plan = list(epoch_batches(lengths, size, seed, ro.epochs, group=tc.group_by_length))
        optimizer = torch.optim.AdamW([{"params": params, "lr": ro.lr, "weight_decay": tc.weight_decay}])
        scheduler = _warmup_cosine(optimizer, len(plan), math.ceil(tc.warmup_ratio * len(plan)))
        device = module_device(model)
        modes = [(m, m.training) for m in model.modules()]
        model.train()
        losses = []
        try:
            for indices in plan:
                batch = to_device(collate([encoded[i] for i in indices], encoder.tokenizer.pad_token_id, pixels),
                                  device)
                with autocast(self.recipe.model.autocast, device):
                    loss = model(**batch).loss
                loss.backward()
                if tc.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(round(float(loss.detach()), 5))
        finally:
            for module, flag in modes:
                module.training = flag
        if dist.is_distributed():  # every rank trained the same router; rank 0's weights are the run's
            for param in params:
                torch.distributed.broadcast(param.data, src=0)
        record = {"stage": stage + 1, "experts": len(experts), "samples": len(samples), "steps": len(plan),
                  "lr": ro.lr, "first_loss": losses[0] if losses else None,
                  "final_loss": losses[-1] if losses else None}
        self.router_history.append(record)
        logger.info("mr_lora router, stage %d: %s", stage + 1, record)
        return record

    # --- inference -------------------------------------------------------------------------------------------------
    def eval_groups(self, model, samples: Sequence[Sample]):
        experts = self.trained_experts()
        if not experts or not samples:
            yield contextlib.nullcontext(), list(range(len(samples)))
            return
        top = self.route(model, samples, experts).argmax(dim=1).tolist()
        labels = []
        for sample, e in zip(samples, top):
            self._routes[(sample.task, sample.id)] = (experts[e], self.expert_of_task(sample.task))
            label = f"{experts[e]}:{'+'.join(self.expert_tasks[experts[e]])}"
            answer, fallback = self.router.answers.get((sample.task, sample.id), (None, False))
            labels.append(f"{label} (fallback: router said {answer!r})" if fallback else label)
        for e, expert in enumerate(experts):
            rows = [i for i, k in enumerate(top) if k == e]
            if rows:  # hard top-1: each group runs only its expert
                yield AdapterActive(model, expert, [labels[i] for i in rows]), rows

    def routing_report(self) -> dict[str, Any] | None:
        """ExpertMethod's accuracy and confusion, plus `fallbacks` (router answers naming no expert, sent to a seeded
        random expert), their count per true task, up to five examples, and `routing_generations` (the cost: one
        routing generation per sample routed by the router; 0 in oracle mode for trained tasks)."""
        answers = dict(self.router.answers)
        if dist.is_distributed():
            for part in dist.all_gather_objects(answers):
                answers.update(part)
        experts = len(self.trained_experts())
        report = super().routing_report()
        if report is None:
            return None
        tasks = report["tasks"]
        failed = [(task, sample_id, answer) for (task, sample_id), (answer, fallback) in answers.items() if fallback]
        report.update({
            "fallbacks": len(failed),
            "fallbacks_by_task": [sum(t == task for t, _, _ in failed) for task in tasks],
            "fallback_examples": [{"task": t, "id": i, "answer": a} for t, i, a in failed[:5]],
            "routing_generations": len(answers),
            "routed_samples": sum(map(sum, report["confusion"])),
        })
        if self.ctx.output_dir is not None and dist.is_main():
            folder = RunFolder(self.ctx.output_dir).analysis
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / f"mr_lora-routing-stage-{experts:02d}.json", report)
        return report

    # --- state -----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        out = super().state()
        if self.model is not None:
            params = [p for n, p in self.model.named_parameters() if "lora_" in n and f".{ROUTER}." in n]
            out["router_parameters"] = sum(full_shape(p).numel() for p in params)
        out["router_history"] = list(self.router_history)
        return out

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(state, tensors)
        if state:
            self.router_history = list(state.get("router_history", []))


def _warmup_cosine(optimizer, steps: int, warmup: int):
    """Linear warmup then cosine decay to 0 over `steps` (the recipe's schedule shape, from torch's schedulers)."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup))
    if warmup < 1:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
