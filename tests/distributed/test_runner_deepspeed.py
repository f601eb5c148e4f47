"""The same recipe under the deepspeed launcher with 2 CPU processes (gloo), at ZeRO-2 and ZeRO-3, as a user runs it.

A one-process run with grad_accum=2 sees exactly the samples of a 2-process step (the runner shards the same batch
list over ranks), so the two loss curves must agree within bf16-autocast noise. That agreement would also hold if
ZeRO-3 silently fell back to unpartitioned weights, so the run's own record of partitioning is checked too: the `zero`
event of log.jsonl, which counts the built model's parameters and those DeepSpeed partitioned (`ds_id`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.recipes import write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(out, name: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == name]


def _losses(out) -> list[float]:
    return [r["loss"] for r in _events(out, "train")]


def _recipe(tmp_path, root, out, model: str = "builtin:tiny-llava", max_train: int = 64, **train):
    return write_recipe(tmp_path / f"{out.name}.yaml", root, output_dir=out, method={"name": "lora_ft", "lora": {
        "r": 4, "alpha": 8, "dropout": 0.0}}, train={"batch_size": 8, "save_steps": 0, "log_steps": 1,
                                                     "max_length": 160, **train},
        model={"name_or_path": model}, benchmark={"card": "synthcit-mini", "root": str(root),
                                                  "tasks": ["shape", "mc-color"], "max_train": max_train,
                                                  "max_test": 8})


def _launch(recipe) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mcit.cli", "launch", str(recipe), "--nproc", "2", "--cpu",
           "--master-port", str(_port())]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, synthcit_root):
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "single"
    recipe = _recipe(tmp, synthcit_root, out, grad_accum=2)
    proc = subprocess.run([sys.executable, "-m", "mcit.cli", "train", str(recipe)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (plain,) = _events(out, "zero")  # a plain process has no DeepSpeed and claims no partitioning
    assert plain["stage"] == 0 and plain["partitioned_parameters"] == 0 and plain["parameters"] > 0, plain
    return out


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_recipe_runs_under_deepspeed_with_two_processes(zero, tmp_path, synthcit_root, single_process):
    out = tmp_path / zero
    proc = _launch(_recipe(tmp_path, synthcit_root, out, deepspeed=zero))
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert json.loads((out / "env.json").read_text())["world_size"] == 2
    # ZeRO-3 really partitions: every parameter of the model built under zero.Init is a DeepSpeed shard; ZeRO-2 none
    (partitioning,) = _events(out, "zero")
    assert partitioning["parameters"] == _events(single_process, "zero")[0]["parameters"] > 0  # the same model
    if zero == "zero3":
        assert partitioning["stage"] == 3
        assert partitioning["partitioned_parameters"] == partitioning["parameters"], partitioning
    else:
        assert partitioning["stage"] == 2
        assert partitioning["partitioned_parameters"] == 0, partitioning
    results = json.loads((out / "results.json").read_text())
    assert len(results["matrix"]) == 3 and set(results["metrics"]) >= {"MFT", "MFN", "MAA", "BWT"}
    reference, launched = _losses(single_process), _losses(out)
    assert len(reference) == len(launched) > 0
    for a, b in zip(reference, launched):
        assert b == pytest.approx(a, rel=0.05, abs=0.05)
    # the stage adapter has real (gathered) shapes and loads with plain PEFT
    from peft import PeftModel
    from safetensors.torch import load_file

    from mcit.config import ModelConfig
    from mcit.models.loading import load_base

    stage = out / "checkpoints" / "stage-02-mc-color"
    saved = load_file(str(stage / "adapter" / "adapter_model.safetensors"))
    assert all(t.numel() > 0 for t in saved.values())
    model, _ = load_base(ModelConfig())
    PeftModel.from_pretrained(model, str(stage / "adapter"))


def test_another_family_runs_under_zero3_with_two_processes(tmp_path, synthcit_root):
    """builtin:tiny-qwen2vl (variable image-token counts, image_grid_thw, 3-D RoPE, a merger as projector) under
    ZeRO-3 with 2 ranks: every parameter partitioned, the same losses as one process with grad_accum 2, and a stage
    adapter that loads onto the unsharded base with plain PEFT."""
    model = "builtin:tiny-qwen2vl"
    single = tmp_path / "single-qwen2vl"
    proc = subprocess.run([sys.executable, "-m", "mcit.cli", "train",
                           str(_recipe(tmp_path, synthcit_root, single, model=model, max_train=32, grad_accum=2))],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "zero3-qwen2vl"
    proc = _launch(_recipe(tmp_path, synthcit_root, out, model=model, max_train=32, deepspeed="zero3"))
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    (partitioning,) = _events(out, "zero")
    assert partitioning["stage"] == 3 and partitioning["partitioned_parameters"] == partitioning["parameters"] > 0
    reference, launched = _losses(single), _losses(out)
    assert len(reference) == len(launched) > 0
    for a, b in zip(reference, launched):
        assert b == pytest.approx(a, rel=0.05, abs=0.05)
    assert len(json.loads((out / "results.json").read_text())["matrix"]) == 3
    from peft import PeftModel

    from mcit.config import ModelConfig
    from mcit.models.loading import load_base

    base, _ = load_base(ModelConfig(name_or_path=model))
    PeftModel.from_pretrained(base, str(out / "checkpoints" / "stage-02-mc-color" / "adapter"))
