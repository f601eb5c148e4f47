"""Batches reach the device the model computes on, and collective tensors the backend's device (NCCL: the GPU)."""

from __future__ import annotations

import torch

from mcit.config import recipe_from_dict
from mcit.data.collate import Encoded
from mcit.runtime import dist
from mcit.runtime.placement import module_device, to_device
from mcit.train.loop import StageTrainer


def test_batches_follow_the_model_to_its_device():
    model = torch.nn.Linear(4, 2, device="meta")  # a device that is not the CPU, as a GPU would be
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.zeros(2, 3), "note": "kept"}
    moved = to_device(batch, module_device(model))
    assert module_device(model).type == "meta"
    assert all(v.device.type == "meta" for k, v in moved.items() if k != "note") and moved["note"] == "kept"
    assert batch["input_ids"].device.type == "cpu"  # the input is not modified in place
    assert module_device(torch.nn.ReLU()).type == "cpu"  # no parameters: CPU


def test_stage_trainer_batches_land_on_the_model_device(tmp_path):
    """The trainer's micro-batches go where the model's parameters are (a GPU in real runs; meta here)."""
    class Method:
        def param_groups(self, model, train):
            return [{"params": list(model.parameters()), "lr": train.lr}]

    recipe = recipe_from_dict({"output_dir": str(tmp_path), "model": {"autocast": None}})
    model = torch.nn.Linear(4, 2, device="meta")
    encoded = [Encoded([1, 2, 3], [1, 2, 3], None, 0), Encoded([4, 5], [4, 5], None, 1)]
    trainer = StageTrainer(model, Method(), recipe, encoded, pixels=None, pad_id=0, stage=0, label="t",
                           step_dir=tmp_path / "step", log=lambda r: None)
    batch = trainer._batch([0, 1])
    assert {v.device.type for v in batch.values() if torch.is_tensor(v)} == {"meta"}


def test_collective_tensors_live_on_the_gpu_under_nccl(monkeypatch):
    assert dist.collective_device().type == "cpu"  # no process group: CPU
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    assert dist.collective_device() == torch.device("cpu")
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist.collective_device() == torch.device("cuda", 3)
