"""`mcit train`: the continual runner. Trains the stages of a recipe in order, checkpoints and evaluates after each
one, and resumes a killed run from its last complete step.

Resume rule: the run folder is the state. `checkpoints/stage-XX-*` folders with a valid manifest are finished stages;
`checkpoints/last-step` holds the newest mid-stage step; `results.json` holds the evaluated rows. Running the same
command again rebuilds the model structure (the method's `prepare` for every finished stage), loads the newest finished
stage, evaluates a row that is missing, and continues training from the step checkpoint. In one CPU process the final
`results.json` is identical to that of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from mcit.config import Recipe, TrainConfig
from mcit.data.cards import DataCard
from mcit.data.collate import Encoder
from mcit.errors import RecipeError
from mcit.evaluation.evaluate import evaluate_tasks
from mcit.evaluation.metrics import continual_metrics, matrix_to_markdown, metrics_to_markdown
from mcit.methods.base import Method, TaskData, build_method
from mcit.models.loading import trainable_summary
from mcit.report.render import write_report
from mcit.runs import checkpoint as ckpt
from mcit.runs.folder import RunFolder
from mcit.runs.log import RunLog
from mcit.runs.results import empty_results, set_row
from mcit.runtime import dist, zero
from mcit.runtime.placement import module_device
from mcit.runtime.seeding import seed_everything
from mcit.train import deepspeed as ds
from mcit.train.loop import StageTrainer
from mcit.train.stages import load_stage, save_stage
from mcit.workflows.load import align_boxes, attach_method, build_model, eval_pixels, load_task_data, prepare_card

DEEPSPEED_TEMPLATES = ("zero2", "zero3", "zero3_offload")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def environment(recipe: Recipe) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "seed": recipe.seed,
        "world_size": dist.world_size(), "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(), "argv": sys.argv,
    }


def stage_labels(names: list[str], schedule: list[list[int]]) -> list[str]:
    """A stage's label: its task, the tasks it trains joined by '+', or 'joint' for all of them at once."""
    return ["+".join(names[t] for t in ids) if len(ids) < len(names) or len(ids) == 1 else "joint"
            for ids in schedule]


ENGINE_KEYS = ("batch_size", "grad_accum", "max_grad_norm", "deepspeed")
"""`train:` keys a DeepSpeed engine fixes for the whole run (its config is built once from the recipe)."""


def stage_settings(method: Method, recipe: Recipe, stage: int, task_ids: list[int],
                   deepspeed: bool = False) -> TrainConfig:
    """The recipe's `train:` settings with the method's overrides for this stage (unknown keys are refused, and
    under DeepSpeed so are the keys its engine fixes for the run)."""
    overrides = method.stage_training(stage, task_ids)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise RecipeError(f"method {method.name!r}: stage_training returned unknown train keys {unknown}; "
                          f"known: {', '.join(sorted(known))}")
    fixed = sorted(k for k in overrides if k in ENGINE_KEYS and overrides[k] != getattr(recipe.train, k))
    if deepspeed and fixed:
        raise RecipeError(f"method {method.name!r}: stage {stage + 1} changes train.{', train.'.join(fixed)}, which the "
                          "DeepSpeed engine fixes for the whole run; set them in the recipe instead")
    return dataclasses.replace(recipe.train, **overrides) if overrides else recipe.train


def deepspeed_template(value: str) -> Path:
    """The JSON file `train.deepspeed` names: a shipped template (zero2 | zero3 | zero3_offload, package data in
    mcit/assets/launch/, so it exists in any install) or a path to the user's own file."""
    if value in DEEPSPEED_TEMPLATES:
        return Path(str(files("mcit") / "assets" / "launch" / f"{value}.json"))
    path = Path(value).expanduser()
    if not path.is_file():
        hint = ""
        if Path(value).stem in DEEPSPEED_TEMPLATES:  # the templates lived in launch/ before they became package data
            hint = f"; the shipped template is named without a path: train.deepspeed={Path(value).stem}"
        raise RecipeError(f"train.deepspeed: {value!r} is neither a shipped template "
                          f"({' | '.join(DEEPSPEED_TEMPLATES)}) nor an existing JSON file{hint}")
    return path


def deepspeed_config(recipe: Recipe) -> dict | None:
    """The filled DeepSpeed config of a launched run (None in a plain process)."""
    if not dist.is_distributed() and not dist.launched():
        return None
    tc = recipe.train
    template = deepspeed_template(tc.deepspeed or "zero2")
    return ds.build_ds_config(template, micro_batch=tc.batch_size, grad_accum=tc.grad_accum, lr=tc.lr,
                              weight_decay=tc.weight_decay, grad_clip=tc.max_grad_norm,
                              bf16=recipe.model.dtype == "bf16", zero_stage=None)


def finalize_results(results: dict) -> None:
    """Add the continual metrics (on scores and on constrained scores) and the final rows to a run's results."""
    stage_tasks = results["stage_tasks"]
    width = len(results["tasks"])

    def filled(matrix: list) -> list:  # the zero-shot row is None when eval.zero_shot is false
        return [row if row is not None else [None] * width for row in matrix]

    results["metrics"] = continual_metrics(filled(results["matrix"]), stage_tasks)
    constrained = filled(results["constrained_matrix"])
    closed = [i for i in range(width) if all(row[i] is not None for row in constrained[1:])]
    results["metrics_constrained"] = (
        {"tasks": [results["tasks"][i] for i in closed],
         **continual_metrics(constrained, stage_tasks, columns=closed)} if closed else {})
    for key in ("superficial", "essential", "format_matrix"):
        results.setdefault("final_" + key, results[key][-1])


class ContinualRunner:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.run_folder = RunFolder(recipe.output_dir)
        self.out = self.run_folder.root
        self.shard_eval = False

    def run(self) -> Path:
        recipe, folder = self.recipe, self.run_folder
        dist.init_distributed()
        seed_everything(recipe.seed)
        folder.claim(recipe, environment(recipe))
        log = RunLog(folder.log, folder.tensorboard)
        card = prepare_card(recipe)
        data = load_task_data(card, recipe, log, run_folder=folder)
        method = build_method(recipe)
        ds_config = deepspeed_config(recipe)
        model, processor = build_model(recipe, ds_config)
        boxes = align_boxes(card, recipe, processor, data.train, data.test)
        if boxes:
            log({"event": "box_frames", "rewritten": boxes})
        # Ranks split the test samples, unless ZeRO-3 shards the weights: then every forward pass is collective, and
        # every rank evaluates every sample inside one gather of the full weights.
        self.shard_eval = ds.zero_stage_of(ds_config) < 3
        base_params = list(model.parameters())
        log({"event": "device", "device": str(module_device(model)), "world_size": dist.world_size()})
        log({"event": "zero", "stage": ds.zero_stage_of(ds_config), "parameters": len(base_params),
             "partitioned_parameters": sum(zero.is_sharded(p) for p in base_params)})
        encoder = Encoder.from_recipe(processor, recipe)
        pixels = eval_pixels(processor, recipe)
        model = attach_method(method, model, processor, recipe, data, output_dir=self.out)
        log({"event": "model", **trainable_summary(model)})
        schedule = method.schedule(len(data.names))
        labels = stage_labels(data.names, schedule)
        results = folder.read_results() or empty_results(
            recipe=recipe.name, method=recipe.method.name, benchmark=card.name, seed=recipe.seed, tasks=data.names,
            labels=labels, schedule=schedule)
        finished = [s for s in range(len(schedule)) if ckpt.is_complete(folder.stage_dir(s, labels[s]))]
        last_done = max(finished, default=-1)
        image_info = dict(zip(("image_ids", "image_inputs"), encoder.images.dummy(), strict=True),
                          image_token_id=processor.tokenizer.convert_tokens_to_ids(encoder.image_token))

        if recipe.eval.zero_shot and results["matrix"][0] is None:
            self._evaluate_row(model, method, encoder, pixels, card, data, results, 0, log)

        for stage, task_ids in enumerate(schedule):
            label = labels[stage]
            seed_everything(recipe.seed + 1000 * (stage + 1))
            method.prepare(model, stage, task_ids)
            stage_dir = folder.stage_dir(stage, label)
            if stage < last_done:
                continue
            if stage == last_done:
                load_stage(model, method, stage_dir)
            else:
                seed_everything(recipe.seed + 1000 * (stage + 1) + 1)
                method.before_task(model, stage, task_ids, data)
                samples = method.train_samples(stage, task_ids, data)
                encoded = [encoder.encode(s, i) for i, s in enumerate(samples)]
                trainer = StageTrainer(model, method, recipe, encoded, pixels, encoder.tokenizer.pad_token_id,
                                       stage=stage, label=label, step_dir=folder.last_step, log=log,
                                       ds_config=ds_config, image_info=image_info,
                                       train=stage_settings(method, recipe, stage, task_ids,
                                                            deepspeed=ds_config is not None))
                stats = trainer.run()
                model = trainer.model
                log({"event": "stage_trained", "stage": stage + 1, "task": label, **stats})
                folder.record_timing("train", label, {**stats, "peak_rss_mb": peak_rss_mb()})
                with zero.gathered_parameters(list(model.parameters()), modifier_rank=0):
                    method.after_task(model, stage, task_ids, data)
                    save_stage(model, method, stage_dir, stage, label, step_dir=folder.last_step)
                folder.record_timing("storage", label, {
                    "checkpoint_bytes": sum(f.stat().st_size for f in stage_dir.rglob("*") if f.is_file()),
                    "trainable_parameters": sum(getattr(p, "ds_numel", p.numel())  # ZeRO-3 shards report 0
                                                for p in model.parameters() if p.requires_grad)})
            if results["matrix"][stage + 1] is None:
                self._evaluate_row(model, method, encoder, pixels, card, data, results, stage + 1, log)
        log.close()
        self._finish(results)
        return folder.results

    def _evaluate_row(self, model, method: Method, encoder, pixels, card: DataCard, data: TaskData, results: dict,
                      row: int, log) -> None:
        ev = self.recipe.eval
        label = results["stages"][row]
        print(f"[mcit] evaluating after {label} on {len(data.names)} tasks", file=sys.stderr)
        with zero.gathered_parameters(list(model.parameters()), modifier_rank=0):
            task_results = evaluate_tasks(
                model, method, encoder, pixels, card.tasks, data.test, batch_size=ev.batch_size,
                max_new_tokens=ev.max_new_tokens, autocast=self.recipe.model.autocast, constrained=ev.constrained,
                predictions_dir=self.run_folder.predictions_dir(row) if dist.is_main() else None,
                log=lambda r: log({**r, "stage": row}), shard=self.shard_eval)
        set_row(results, row, task_results, method.routing_report())
        self.run_folder.record_timing("eval", label, {r.task: r.seconds for r in task_results})
        self.run_folder.write_results(results)

    def _finish(self, results: dict) -> None:
        if any(row is None for row in results["matrix"][1:]):
            return
        finalize_results(results)
        self.run_folder.write_results(results)
        if dist.is_main():
            width = len(results["tasks"])
            matrix = [row if row is not None else [None] * width for row in results["matrix"]]
            md = [f"# {results['recipe']} ({results['method']} on {results['benchmark']})", "",
                  matrix_to_markdown(matrix, results["stages"], results["tasks"]), "",
                  metrics_to_markdown(results["metrics"]), ""]
            self.run_folder.results_md.write_text("\n".join(md), encoding="utf-8")
            try:
                path = write_report([self.out])
                print(f"[mcit] report: {path}", file=sys.stderr)
            except Exception as exc:  # a broken plot must not lose a finished run's results
                print(f"[mcit] report failed ({type(exc).__name__}: {exc}); results are in {self.out}",
                      file=sys.stderr)
