"""A finished stage on disk: the model tensors the method keeps, its own state, and a plain PEFT adapter folder,
published whole (runs.checkpoint) or not at all; and the way back into a model whose structure `prepare` rebuilt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mcit.methods.base import Method
from mcit.runs import checkpoint as ckpt
from mcit.runs.folder import METHOD_META
from mcit.runtime import dist, zero
from mcit.runtime.files import load_tensors


def save_stage(model, method: Method, folder: Path, stage: int, label: str, step_dir: Path | None = None) -> None:
    """Write the checkpoint of the 0-based `stage` (collective: every rank calls it; the main rank writes), then
    remove the stage's step checkpoint `step_dir`, which the finished stage supersedes."""
    tensors = method.state_tensors(model)
    if dist.is_main():
        writer = ckpt.CheckpointWriter(folder)
        writer.tensors("model.safetensors", tensors)
        writer.tensors("method.safetensors", method.method_tensors())
        writer.json(METHOD_META, {"method": method.name, "stage": stage + 1, "task": label, "state": method.state()})
        if hasattr(model, "peft_config"):
            # the tensors gathered above, so that a ZeRO-3 run saves real shapes (loads with plain PEFT)
            with writer.guard():  # a full disk here ends like one in writer.tensors: clear error, old folder kept
                model.save_pretrained(writer.tmp / "adapter", state_dict=tensors)
        writer.commit()
        if step_dir is not None and step_dir.exists():
            shutil.rmtree(step_dir)
    dist.barrier()


def stage_meta(folder: Path) -> dict:
    """method.json of a verified stage checkpoint (sizes and hashes checked first)."""
    ckpt.open_checkpoint(folder)
    return json.loads((Path(folder) / METHOD_META).read_text(encoding="utf-8"))


def load_stage(model, method: Method, folder: Path, meta: dict | None = None) -> None:
    """Load a stage checkpoint into `model` (structure already rebuilt by `prepare`) and `method`. `meta`: the
    folder's `stage_meta`, when the caller has just verified it (a large checkpoint is then hashed once, not twice)."""
    meta = stage_meta(folder) if meta is None else meta
    method.load_state(meta.get("state", {}), load_tensors(folder / "method.safetensors"))
    tensors = load_tensors(folder / "model.safetensors")
    params = dict(model.named_parameters())
    zero.load_parameters(model, {k: v for k, v in tensors.items() if k in params})
    buffers = {k: v for k, v in tensors.items() if k not in params}
    if buffers:
        model.load_state_dict(buffers, strict=False)
