"""A whole run on a GPU that is not there: every tensor the model computes with must live on its device.

`simulated_cuda` (tests/runtime/simulated_cuda.py) makes tensors placed on `cuda:0` CPU tensors that refuse to meet
plain CPU tensors, as a real GPU does. With this process told it sees one GPU, `mcit train` must put the model on
it right after loading and then train (micro-batches, loss, optimizer), evaluate (the zero-shot row too; generation
and likelihood ranking), route (DISCO's and HiDe's routers and feature extractors) and run each method's
`after_task` without ever mixing devices.
"""

from __future__ import annotations

import json

import pytest
import torch

from mcit.config import load_recipe
from mcit.data.collate import Encoder, PixelCache
from mcit.evaluation.evaluate import evaluate_tasks
from mcit.runtime import placement
from mcit.workflows.load import load_checkpoint, load_test_data, prepare_card
from mcit.workflows.train import ContinualRunner
from tests.recipes import write_recipe
from tests.runtime.simulated_cuda import MixedDevices, on_simulated_cuda, simulated_cuda


@pytest.fixture
def one_gpu(monkeypatch):
    """This process sees one GPU (the simulated one)."""
    monkeypatch.setattr(placement, "gpu_count", lambda: 1)


def test_simulated_gpu_refuses_what_a_real_one_refuses():
    with simulated_cuda() as mode:
        layer = torch.nn.Linear(4, 2).to("cuda")
        assert on_simulated_cuda(layer.weight) and layer.weight.device == torch.device("cuda", 0)
        with pytest.raises(MixedDevices):
            layer(torch.ones(3, 4))  # a batch left on the CPU
        out = layer(torch.ones(3, 4).to("cuda"))
        out.sum().backward()
        assert on_simulated_cuda(layer.weight.grad)
        torch.optim.AdamW(layer.parameters()).step()
        assert on_simulated_cuda(out * torch.tensor(2.0))  # 0-dim CPU tensors may mix, as on a GPU
        assert not on_simulated_cuda(out.cpu())
    assert len(mode.mixed) == 1


def test_load_places_the_model_on_the_gpu(one_gpu):
    from mcit.config import ModelConfig
    from mcit.models.loading import load_base

    with simulated_cuda():
        model, _ = load_base(ModelConfig(name_or_path="builtin:tiny-llava"))
        assert all(on_simulated_cuda(p) for p in model.parameters())
        assert all(on_simulated_cuda(b) for b in model.buffers())


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    {"name": "lora_ft"},
    {"name": "disco"},
    {"name": "hide", "expand_layers": "auto", "cka_samples": 4},
])
def test_a_run_never_mixes_devices(tmp_path, synthcit_root, one_gpu, method):
    recipe_path = write_recipe(
        tmp_path / "recipe.yaml", synthcit_root, output_dir=tmp_path / "run",
        benchmark={"tasks": ["shape", "mc-color"], "max_train": 16, "max_test": 6},
        method={"lora": {"r": 4, "alpha": 8}, **method},
        train={"batch_size": 8, "max_steps": 2, "save_steps": 1},
        eval={"batch_size": 8, "max_new_tokens": 4, "constrained": True, "zero_shot": True})
    recipe = load_recipe(recipe_path)
    with simulated_cuda() as mode:
        results = json.loads(ContinualRunner(recipe).run().read_text())
    assert mode.mixed == []
    assert all(row is not None for row in results["matrix"])  # zero-shot row and both stages evaluated
    assert results["constrained_matrix"][-1][1] is not None  # likelihood ranking ran on mc-color
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2, 1, 2]
    assert next(r for r in log if r["event"] == "device")["device"] == "cuda:0"
    # `mcit eval` of a stage folder: the model and the method's state (adapters, router prototypes) rebuilt from disk
    stage = sorted((tmp_path / "run" / "checkpoints").glob("stage-*"))[-1]
    with simulated_cuda() as mode:
        model, processor, method, run_recipe = load_checkpoint(str(stage))
        assert all(on_simulated_cuda(p) for p in model.parameters())
        card = prepare_card(run_recipe)
        (row,) = evaluate_tasks(model, method, Encoder(processor, run_recipe.train.max_length), PixelCache(processor),
                                card.tasks[1:], load_test_data(card, run_recipe), batch_size=8, max_new_tokens=4,
                                autocast="bf16", constrained=True)
    assert mode.mixed == [] and row.score == pytest.approx(results["matrix"][-1][1])
