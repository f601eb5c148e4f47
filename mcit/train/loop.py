"""Train one stage: length-grouped micro-batches, gradient accumulation, cosine schedule with warmup, clipping,
step checkpoints for resume. Plain PyTorch in one process; a DeepSpeed engine when launched with `deepspeed`.

A step checkpoint (`checkpoints/last-step`) resumes the stage only where its trainer.json matches this stage exactly
(stage, number of steps, world size, ZeRO stage, DeepSpeed or not); anything else restarts the stage from step 0.
Under DeepSpeed the engine saves its own state (module, ZeRO optimizer shards, schedule) into `deepspeed/`; mcit adds
trainer.json, each rank's RNG state and the method's tensors, and the folder is published only once every rank wrote.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mcit.config import Recipe, TrainConfig
from mcit.data.collate import Encoded, PixelCache, collate
from mcit.runs import checkpoint as ckpt
from mcit.runtime import dist, failpoints
from mcit.runtime.files import load_tensors
from mcit.runtime.placement import module_device, to_device
from mcit.runtime.precision import AUTOCAST, autocast
from mcit.runtime.seeding import rng_state, set_rng_state
from mcit.train import deepspeed as ds
from mcit.train.frozen_cast import FrozenLinearCast
from mcit.train.optimizer_state import optimizer_from_tensors, optimizer_to_tensors
from mcit.train.schedule import cosine_lambda, plan_stage

STEP_META = "trainer.json"
DEEPSPEED_DIR = "deepspeed"
"""The engine's own files inside a step checkpoint (`deepspeed/step/...`: torch.save pickles, see `_resume`)."""
DEEPSPEED_TAG = "step"


class StageTrainer:
    """Runs the optimizer steps of one stage and writes step checkpoints the runner can resume from."""

    def __init__(self, model, method, recipe: Recipe, encoded: list[Encoded], pixels: PixelCache, pad_id: int, *,
                 stage: int, label: str, step_dir: Path, log: Callable[[dict], None], ds_config: dict | None = None,
                 image_info: dict | None = None, train: TrainConfig | None = None):
        self.model, self.method, self.recipe = model, method, recipe
        self.train = train or recipe.train
        """This stage's settings: the recipe's `train:` unless the method declares its own for the stage."""
        self.encoded, self.pixels, self.pad_id = encoded, pixels, pad_id
        self.stage, self.label, self.step_dir, self.log = stage, label, Path(step_dir), log
        self.ds_config = ds_config
        self.image_info = image_info or {}
        self.plan = plan_stage([len(e) for e in encoded], self.train, recipe.seed, stage)
        self.device = module_device(model)
        """Where batches go (collate builds them on the CPU); the engine's device once DeepSpeed wraps the model."""
        self.resumed_losses: list[float] = []
        """The losses of the steps before the resume that the next `train` log line still averages over."""

    # --- optimizer -------------------------------------------------------------------------------------------------
    def _build(self):
        groups = self.method.param_groups(self.model, self.train)
        if self.ds_config is not None:
            engine = ds.initialize(self.model, groups, self.ds_config, self.plan.steps, self.plan.warmup)
            return engine, engine.optimizer, engine.lr_scheduler
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(self.plan.warmup, self.plan.steps))
        return None, optimizer, scheduler

    # --- resume ----------------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """What a step checkpoint must match to be resumed: the same stage, plan length and the same sharding."""
        return {"stage": self.stage, "steps": self.plan.steps, "world_size": dist.world_size(),
                "deepspeed": self.ds_config is not None, "zero_stage": ds.zero_stage_of(self.ds_config)}

    def _resume(self, optimizer, scheduler, engine=None) -> int:
        folder = self.step_dir
        if not ckpt.is_complete(folder):
            return 0
        meta = json.loads((folder / STEP_META).read_text())
        saved = {**{"world_size": 1, "deepspeed": False, "zero_stage": 0}, **meta}  # written before these keys
        identity = self._identity()
        if any(saved.get(key) != value for key, value in identity.items()):
            if dist.is_main() and saved.get("stage") == self.stage:
                print(f"[mcit] {folder} was written with " + ", ".join(f"{k}={saved.get(k)}" for k in identity)
                      + " and cannot resume this stage (" + ", ".join(f"{k}={v}" for k, v in identity.items())
                      + "): training it from step 0", file=sys.stderr)
            return 0
        ckpt.open_checkpoint(folder)  # sizes and SHA-256 of every file, DeepSpeed's included, before anything loads
        if engine is not None:
            # DeepSpeed's files are torch.save pickles, and its checkpoint engine reads them with
            # torch.load(weights_only=False) (deepspeed 0.19.8, TorchCheckpointEngine.load). mcit loads them only from
            # this run's own step folder, which an earlier job of the same recipe wrote, and only after open_checkpoint
            # matched every file with the SHA-256 in the manifest: a file swapped or damaged since then is refused.
            # Nothing else in mcit unpickles (docs/RELIABILITY.md, "Step checkpoints under DeepSpeed").
            # Frozen weights are not in the checkpoint (exclude_frozen_parameters): the runner rebuilt them already.
            engine.load_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=True)
            set_rng_state(load_tensors(folder / f"rng-rank{dist.rank()}.safetensors"))
        else:
            tensors = load_tensors(folder / "model.safetensors")
            self.model.load_state_dict(tensors, strict=False)
            optimizer_from_tensors(optimizer, load_tensors(folder / "optimizer.safetensors"), meta["optimizer"])
            scheduler.load_state_dict(meta["scheduler"])
            set_rng_state(load_tensors(folder / "rng.safetensors"))
        self.method.load_state(meta.get("method", {}), load_tensors(folder / "method.safetensors"))
        self.resumed_losses = [float(x) for x in meta.get("losses", [])]
        return int(meta["step"])

    def _save_step(self, step: int, optimizer, scheduler, engine=None, losses: list[float] | None = None) -> None:
        meta = {**self._identity(), "step": step, "method": self.method.state(),
                "losses": (losses or [])[-self.train.log_steps:]}  # the window the next log line averages
        if engine is not None:
            self._save_engine_step(engine, meta)
            return
        writer = ckpt.CheckpointWriter(self.step_dir)
        writer.tensors("model.safetensors", self.method.state_tensors(self.model))
        tensors, layout = optimizer_to_tensors(optimizer)
        writer.tensors("optimizer.safetensors", tensors)
        writer.tensors("rng.safetensors", rng_state())
        writer.tensors("method.safetensors", self.method.method_tensors())
        writer.json(STEP_META, {**meta, "optimizer": layout, "scheduler": scheduler.state_dict()})
        writer.commit()

    def _save_engine_step(self, engine, meta: dict[str, Any]) -> None:
        """The step checkpoint under DeepSpeed (collective: every rank calls it). The engine writes its module
        (trainable tensors only), each rank's ZeRO optimizer shard and the schedule; every rank adds its RNG state,
        rank 0 trainer.json and the method's tensors; rank 0 publishes the folder once every rank is done."""
        writer = ckpt.CheckpointWriter(self.step_dir, collective=True)
        writer.tensors(f"rng-rank{dist.rank()}.safetensors", rng_state())
        with writer.guard():
            engine.save_checkpoint(str(writer.tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False,
                                   exclude_frozen_parameters=True)
        if dist.is_main():
            writer.tensors("method.safetensors", self.method.method_tensors())
            writer.json(STEP_META, meta)
        writer.commit()

    # --- loop ------------------------------------------------------------------------------------------------------
    def _batch(self, indices: list[int]) -> dict:
        batch = collate([self.encoded[i] for i in indices], self.pad_id, self.pixels)
        if dist.world_size() > 1 and self.image_info:
            batch = ds.ensure_vision_forward(batch, pad_token_id=self.pad_id, **self.image_info)
        return to_device(batch, self.device)

    def run(self) -> dict[str, Any]:
        engine, optimizer, scheduler = self._build()
        if engine is not None:
            self.device = engine.device
        start = self._resume(optimizer, scheduler, engine)
        model = engine if engine is not None else self.model
        model.train()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        bar = tqdm(total=self.plan.steps, initial=start, desc=f"train {self.label}", disable=not dist.is_main(),
                   dynamic_ncols=True, leave=False)
        cast = FrozenLinearCast(self.model, AUTOCAST.get(self.recipe.model.autocast)
                                if engine is None else None)
        try:
            cast.apply()
            losses, seen, elapsed = self._steps(model, engine, optimizer, scheduler, params, start, bar, cast)
        finally:
            cast.restore()
        bar.close()
        if engine is not None:
            self.model = ds.release(engine)
        optimizer.zero_grad(set_to_none=True)
        return {"steps": self.plan.steps, "resumed_from": start, "seconds": round(elapsed, 2),
                "samples_per_s": round(seen / max(elapsed, 1e-9), 2),
                "final_loss": losses[-1] if losses else None}

    def _steps(self, model, engine, optimizer, scheduler, params, start: int, bar, cast: FrozenLinearCast):
        tc = self.train
        t0, seen, losses = time.time(), 0, list(self.resumed_losses)
        for step in range(start, self.plan.steps):
            step_loss = 0.0
            for micro in range(self.plan.grad_accum):
                batch = self._batch(self.plan.micro_batches[step * self.plan.grad_accum + micro])
                with autocast(self.recipe.model.autocast, self.device):
                    outputs = model(**batch)
                    loss = outputs.loss
                    extra = self.method.extra_loss(self.model, batch, outputs)
                    if extra is not None:
                        loss = loss + extra
                if engine is not None:
                    engine.backward(loss)
                    engine.step()
                else:
                    (loss / self.plan.grad_accum).backward()
                step_loss += loss.item() / self.plan.grad_accum
                seen += batch["input_ids"].shape[0]
            if engine is None:
                if tc.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if dist.world_size() > 1:  # log the global mean, comparable with a one-process run
                step_loss = dist.mean_across_ranks(step_loss)
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            done = step + 1
            if done % max(1, tc.log_steps) == 0 or done == self.plan.steps:
                lr = optimizer.param_groups[0]["lr"]
                self.log({"event": "train", "stage": self.stage, "task": self.label, "step": done,
                          "steps": self.plan.steps, "loss": round(sum(losses[-tc.log_steps:]) /
                                                                  len(losses[-tc.log_steps:]), 5),
                          "lr": lr, "samples_per_s": round(seen / max(1e-9, time.time() - t0), 2)})
            if tc.save_steps and done % tc.save_steps == 0 and done < self.plan.steps:
                cast.restore()
                self._save_step(done, optimizer, scheduler, engine, losses)
                cast.apply()
            failpoints.hit("train.step")
        return losses, seen, time.time() - t0
