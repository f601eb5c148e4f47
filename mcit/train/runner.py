"""The continual runner: trains the stages of a recipe in order, checkpoints and evaluates after each one, and
resumes a killed run from its last complete step.

Resume rule: the run folder is the state. `checkpoints/stage-XX-*` folders with a valid manifest are finished stages;
`checkpoints/last-step` holds the newest mid-stage step; `results.json` holds the evaluated rows. Running the same
command again rebuilds the model structure (the method's `prepare` for every finished stage), loads the newest finished
stage, evaluates a row that is missing, and continues training from the step checkpoint. In one CPU process the final
`results.json` is identical to that of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mcit.config import Recipe, save_recipe
from mcit.data.asd import diversify_with_stats
from mcit.data.cards import DataCard, load_card
from mcit.data.collate import Encoder, PixelCache, image_seq_length
from mcit.data.validate import filter_valid, validate_card
from mcit.errors import DataError, RecipeError
from mcit.evaluation.evaluate import TaskResult, evaluate_tasks
from mcit.evaluation.metrics import continual_metrics, matrix_to_markdown, metrics_to_markdown
from mcit.methods.base import Method, RunContext, TaskData, build_method
from mcit.models.loading import load_base, trainable_summary
from mcit.train import checkpoint as ckpt
from mcit.train import distributed as dist
from mcit.train.loop import AUTOCAST, StageTrainer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def prepare_card(recipe: Recipe) -> DataCard:
    card = load_card(recipe.benchmark.card)
    if recipe.benchmark.root:
        card.root = recipe.benchmark.root
    if recipe.benchmark.tasks:
        for name in recipe.benchmark.tasks:
            card.task(name)  # raises with a suggestion for an unknown task
        card = dataclasses.replace(card, tasks=[card.task(n) for n in recipe.benchmark.tasks])
    for task in card.tasks:
        if recipe.benchmark.max_train:
            task.max_train = min(task.max_train or recipe.benchmark.max_train, recipe.benchmark.max_train)
        if recipe.benchmark.max_test:
            task.max_test = min(task.max_test or recipe.benchmark.max_test, recipe.benchmark.max_test)
        if recipe.eval.max_test:
            task.max_test = min(task.max_test or recipe.eval.max_test, recipe.eval.max_test)
    if card.generator == "synthcit":
        from mcit.data import synthcit

        synthcit.ensure_built(card.root_dir)
    return card


def load_data(card: DataCard, recipe: Recipe, log) -> TaskData:
    report = validate_card(card)
    skipped = 0
    if not report.ok and not recipe.benchmark.skip_invalid:
        raise DataError(f"data card {card.name!r} has problems; fix them or set benchmark.skip_invalid=true to train "
                        f"on the valid samples only:\n{report.format()}")
    train, test = {}, {}
    for task in card.tasks:
        samples = card.load_task(task.name, "train", seed=recipe.seed, skip_malformed=recipe.benchmark.skip_invalid)
        tests = card.load_task(task.name, "test", seed=recipe.seed, skip_malformed=recipe.benchmark.skip_invalid)
        if not report.ok:
            samples, n1 = filter_valid(samples, report)
            tests, n2 = filter_valid(tests, report)
            skipped += n1 + n2
        if recipe.benchmark.asd.enabled:
            samples, stats = diversify_with_stats(samples, recipe.benchmark.asd.fraction,
                                                  styles=recipe.benchmark.asd.styles, seed=recipe.seed)
            log({"event": "asd", "task": task.name, **dataclasses.asdict(stats)})
        train[task.name], test[task.name] = samples, tests
    if skipped:
        log({"event": "skipped_invalid", "count": skipped})
        print(f"[mcit] skipped {skipped} invalid samples (benchmark.skip_invalid=true)", file=sys.stderr)
    return TaskData(card.task_names, train, test)


class RunLog:
    """log.jsonl (every event) + TensorBoard scalars, written by the main process only."""

    def __init__(self, folder: Path):
        self.enabled = dist.is_main()
        self.path = folder / "log.jsonl"
        self.tb = None
        if self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(folder / "tb"))
            except ImportError:  # tensorboard is optional
                self.tb = None
        self.global_step = 0

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and record.get("event") == "train":
            self.global_step += 1
            self.tb.add_scalar(f"loss/{record['task']}", record["loss"], record["step"])
            self.tb.add_scalar(f"lr/{record['task']}", record["lr"], record["step"])
        if self.tb is not None and record.get("event") == "eval":
            self.tb.add_scalar(f"eval/{record['task']}", record["score"], record.get("stage", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class ContinualRunner:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.out = Path(recipe.output_dir).expanduser().resolve()
        self.ckpt_dir = self.out / "checkpoints"

    # --- run folder ------------------------------------------------------------------------------------------------
    def _claim_folder(self) -> None:
        """Refuse a folder holding another recipe's run; the main rank checks and writes first, the other ranks
        check after the barrier (never while the main rank is writing the file)."""
        saved = self.out / "recipe.yaml"
        if dist.is_main():
            self._check_same_recipe(saved)
            self.out.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)
            ckpt.clean_stale(self.ckpt_dir)
            if not saved.is_file():
                save_recipe(self.recipe, saved)
            ckpt.write_json_atomic(self.out / "env.json", environment(self.recipe))
        dist.barrier()
        if not dist.is_main():
            self._check_same_recipe(saved)

    def _check_same_recipe(self, saved: Path) -> None:
        if not saved.is_file():
            return
        current = self.recipe.to_dict()
        current.pop("source", None)
        previous = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        previous.pop("source", None)
        if previous != current:
            changed = sorted(_diff_keys(previous, current))
            raise RecipeError(f"{self.out} holds a run of a different recipe (changed: {', '.join(changed)}); "
                              "resume with the same recipe or choose another output_dir")

    def _stage_dir(self, stage: int, label: str) -> Path:
        return self.ckpt_dir / f"stage-{stage + 1:02d}-{label}"

    def _results(self) -> dict:
        path = self.out / "results.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    # --- main loop -------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        recipe = self.recipe
        dist.init_distributed()
        seed_everything(recipe.seed)
        self._claim_folder()
        log = RunLog(self.out)
        card = prepare_card(recipe)
        data = load_data(card, recipe, log)
        method = build_method(recipe)
        ds_config = self._ds_config()
        with dist.hf_deepspeed_context(ds_config):
            model, processor = load_base(recipe.model)
        encoder = Encoder(processor, recipe.train.max_length)
        pixels = PixelCache(processor)
        ctx = RunContext(processor=processor, recipe=recipe, data=data, output_dir=self.out,
                         encode=lambda samples: self._batches(encoder, pixels, samples))
        seed_everything(recipe.seed + 1)  # adapter init must not depend on what ran before (resume = same numbers)
        model = method.setup(model, ctx)
        log({"event": "model", **trainable_summary(model)})
        schedule = method.schedule(len(data.names))
        labels = ["+".join(data.names[t] for t in ids) if len(ids) < len(data.names) or len(ids) == 1 else "joint"
                  for ids in schedule]
        results = self._results() or self._empty_results(card, data, schedule, labels)
        finished = [s for s in range(len(schedule)) if ckpt.is_complete(self._stage_dir(s, labels[s]))]
        last_done = max(finished, default=-1)
        autocast = AUTOCAST[recipe.model.autocast]
        image_info = {"image_token_id": processor.tokenizer.convert_tokens_to_ids(encoder.image_token),
                      "num_image_tokens": image_seq_length(processor), "image_shape": self._image_shape(processor)}

        if recipe.eval.zero_shot and results["matrix"][0] is None:
            self._evaluate_row(model, method, encoder, pixels, card, data, results, 0, autocast, log)

        for stage, task_ids in enumerate(schedule):
            label = labels[stage]
            seed_everything(recipe.seed + 1000 * (stage + 1))
            method.prepare(model, stage, task_ids)
            stage_dir = self._stage_dir(stage, label)
            if stage < last_done:
                continue
            if stage == last_done:
                self._load_stage(model, method, stage_dir)
            else:
                seed_everything(recipe.seed + 1000 * (stage + 1) + 1)
                method.before_task(model, stage, task_ids, data)
                samples = method.train_samples(stage, task_ids, data)
                encoded = [encoder.encode(s, i) for i, s in enumerate(samples)]
                trainer = StageTrainer(model, method, recipe, encoded, pixels, encoder.tokenizer.pad_token_id,
                                       stage=stage, label=label, step_dir=self.ckpt_dir / "last-step", log=log,
                                       ds_config=ds_config, image_info=image_info)
                stats = trainer.run()
                model = trainer.model
                log({"event": "stage_trained", "stage": stage + 1, "task": label, **stats})
                self._record_timing("train", label, {**stats, "peak_rss_mb": peak_rss_mb()})
                with self._gathered(model):
                    method.after_task(model, stage, task_ids, data)
                    self._save_stage(model, method, stage_dir, stage, label)
                self._record_timing("storage", label, {
                    "checkpoint_bytes": sum(f.stat().st_size for f in stage_dir.rglob("*") if f.is_file()),
                    "trainable_parameters": sum(getattr(p, "ds_numel", p.numel())  # ZeRO-3 shards report 0
                                                for p in model.parameters() if p.requires_grad)})
            if results["matrix"][stage + 1] is None:
                self._evaluate_row(model, method, encoder, pixels, card, data, results, stage + 1, autocast, log)
        log.close()
        self._finish(results)
        return self.out / "results.json"

    # --- pieces ----------------------------------------------------------------------------------------------------
    def _ds_config(self) -> dict | None:
        if not dist.is_distributed() and not dist._launched():
            return None
        tc = self.recipe.train
        template = tc.deepspeed or "zero2"
        if template in ("zero2", "zero3", "zero3_offload"):
            template = str(Path(__file__).resolve().parents[2] / "launch" / f"{template}.json")
            if not Path(template).is_file():
                from importlib.resources import files

                template = str(files("mcit") / "assets" / "launch" / f"{tc.deepspeed or 'zero2'}.json")
        return dist.build_ds_config(template, micro_batch=tc.batch_size, grad_accum=tc.grad_accum, lr=tc.lr,
                                    weight_decay=tc.weight_decay, grad_clip=tc.max_grad_norm,
                                    bf16=self.recipe.model.dtype == "bf16", zero_stage=None)

    @staticmethod
    def _image_shape(processor) -> tuple[int, int, int]:
        ip = processor.image_processor
        size = ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size
        h = size.get("height") or size.get("shortest_edge")
        w = size.get("width") or size.get("shortest_edge")
        return (3, int(h), int(w))

    @contextlib.contextmanager
    def _gathered(self, model):
        with dist.gathered_parameters(list(model.parameters()), modifier_rank=0):
            yield

    def _batches(self, encoder: Encoder, pixels: PixelCache, samples, batch_size: int = 32):
        from mcit.data.collate import collate

        for k in range(0, len(samples), batch_size):
            items = [encoder.encode(s, i) for i, s in enumerate(samples[k:k + batch_size])]
            yield collate(items, encoder.tokenizer.pad_token_id, pixels)

    def _save_stage(self, model, method: Method, folder: Path, stage: int, label: str) -> None:
        tensors = method.state_tensors(model)
        if dist.is_main():
            writer = ckpt.CheckpointWriter(folder)
            writer.tensors("model.safetensors", tensors)
            writer.tensors("method.safetensors", method.method_tensors())
            writer.json("method.json", {"method": method.name, "stage": stage + 1, "task": label,
                                        "state": method.state()})
            if hasattr(model, "peft_config"):
                # the tensors gathered above, so that a ZeRO-3 run saves real shapes (loads with plain PEFT)
                with writer.guard():  # a full disk here ends like one in writer.tensors: clear error, old folder kept
                    model.save_pretrained(writer.tmp / "adapter", state_dict=tensors)
            writer.commit()
            step = self.ckpt_dir / "last-step"
            if step.exists():
                import shutil

                shutil.rmtree(step)
        dist.barrier()

    def _load_stage(self, model, method: Method, folder: Path) -> None:
        ckpt.open_checkpoint(folder)
        meta = json.loads((folder / "method.json").read_text(encoding="utf-8"))
        method.load_state(meta.get("state", {}), ckpt.load_tensors(folder / "method.safetensors"))
        tensors = ckpt.load_tensors(folder / "model.safetensors")
        dist.load_parameters(model, {k: v for k, v in tensors.items()
                                     if k in dict(model.named_parameters())})
        buffers = {k: v for k, v in tensors.items() if k not in dict(model.named_parameters())}
        if buffers:
            model.load_state_dict(buffers, strict=False)

    def _empty_results(self, card: DataCard, data: TaskData, schedule, labels) -> dict:
        rows = len(schedule) + 1
        blank = [None] * rows
        return {
            "recipe": self.recipe.name, "method": self.recipe.method.name, "benchmark": card.name,
            "seed": self.recipe.seed, "tasks": list(data.names), "stages": ["zero-shot", *labels],
            "stage_tasks": [[], *[list(ids) for ids in schedule]],
            "matrix": list(blank), "format_matrix": list(blank), "superficial": list(blank),
            "essential": list(blank), "constrained_matrix": list(blank), "details": list(blank),
            "metrics": {}, "metrics_constrained": {}, "router": {"accuracy": list(blank)},
        }

    def _evaluate_row(self, model, method, encoder, pixels, card, data, results, row, autocast, log) -> None:
        ev = self.recipe.eval
        label = results["stages"][row]
        print(f"[mcit] evaluating after {label} on {len(data.names)} tasks", file=sys.stderr)
        with self._gathered(model):
            task_results: list[TaskResult] = evaluate_tasks(
                model, method, encoder, pixels, card.tasks, data.test, batch_size=ev.batch_size,
                max_new_tokens=ev.max_new_tokens, autocast=autocast, constrained=ev.constrained,
                predictions_dir=self.out / "predictions" / f"stage-{row:02d}" if dist.is_main() else None,
                log=lambda r: log({**r, "stage": row}))
        results["matrix"][row] = [r.score for r in task_results]
        results["format_matrix"][row] = [r.format_rate for r in task_results]
        results["superficial"][row] = [r.superficial for r in task_results]
        results["essential"][row] = [r.essential for r in task_results]
        results["constrained_matrix"][row] = [r.constrained for r in task_results]
        results["details"][row] = [r.details for r in task_results]
        self._record_timing("eval", label, {r.task: r.seconds for r in task_results})
        routing = method.routing_report()
        if routing is not None:
            results["router"]["accuracy"][row] = routing.get("accuracy")
            confusion = results["router"].setdefault("confusion", [None] * len(results["stages"]))
            confusion[row] = routing.get("confusion")
        self._write_results(results)

    def _record_timing(self, kind: str, label: str, record: dict) -> None:
        """Wall-clock, memory and storage records go to timing.json: results.json holds only what the seed determines
        (`train`: per stage seconds, samples/s, peak RSS; `eval`: per row and task seconds; `storage`: bytes of each
        stage checkpoint and trainable parameters)."""
        if not dist.is_main():
            return
        path = self.out / "timing.json"
        timing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        timing.setdefault(kind, {})[label] = record
        ckpt.write_json_atomic(path, timing)

    def _write_results(self, results: dict) -> None:
        if dist.is_main():
            ckpt.write_json_atomic(self.out / "results.json", results)

    def _finish(self, results: dict) -> None:
        if any(row is None for row in results["matrix"][1:]):
            return
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
        self._write_results(results)
        if dist.is_main():
            md = [f"# {results['recipe']} ({results['method']} on {results['benchmark']})", "",
                  matrix_to_markdown(filled(results["matrix"]), results["stages"], results["tasks"]), "",
                  metrics_to_markdown(results["metrics"]), ""]
            (self.out / "results.md").write_text("\n".join(md), encoding="utf-8")
            try:
                from mcit.report.report import write_report

                path = write_report([self.out])
                print(f"[mcit] report: {path}", file=sys.stderr)
            except Exception as exc:  # a broken plot must not lose a finished run's results
                print(f"[mcit] report failed ({type(exc).__name__}: {exc}); results are in {self.out}",
                      file=sys.stderr)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [prefix or "recipe"]
