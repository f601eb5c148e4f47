"""DeepSpeed ZeRO-2/3 with 2 CPU processes (gloo) through the real `deepspeed` launcher.

tests/distributed/ds_smoke.py trains a random tiny LLaVA with LoRA; these tests compare its launched runs with a
single-process plain-torch run on the same global batches, check the ZeRO-3 adapter, and check that a failure on one
rank ends the job (about 50 s on 2 cores, marked `distributed`); the helpers are also checked in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mcit.errors import CheckpointError, RecipeError
from mcit.runtime import zero
from mcit.train import deepspeed as ds

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SMOKE = HERE / "ds_smoke.py"
STEPS = 20


# --------------------------------------------------------------------------------------------------------------------
# In-process checks of the helpers (fast, no launcher)


def test_build_ds_config_fills_auto_from_the_recipe(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = ds.build_ds_config(
        ROOT / "mcit" / "assets" / "launch" / "zero3.json", micro_batch=2, grad_accum=4, lr=1e-4, weight_decay=0.0, grad_clip=0.5,
        bf16=True, zero_stage=None, hidden_size=256,
    )
    assert config["train_batch_size"] == 16 and config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5 and config["bf16"]["enabled"] is True
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 256 * 256
    assert zero["stage3_param_persistence_threshold"] == 2560
    assert "auto" not in json.dumps(config)


def test_build_ds_config_stage_override_drops_stage3_keys() -> None:
    config = ds.build_ds_config(
        ROOT / "mcit" / "assets" / "launch" / "zero3.json", micro_batch=1, grad_accum=1, lr=1e-4, weight_decay=0.0, grad_clip=1.0,
        bf16=False, zero_stage=2, hidden_size=None,
    )
    assert ds.zero_stage_of(config) == 2 and "reduce_bucket_size" not in config["zero_optimization"]
    assert "stage3_prefetch_bucket_size" not in config["zero_optimization"]


def test_build_ds_config_rejects_values_that_disagree_with_the_recipe() -> None:
    template = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}
    with pytest.raises(RecipeError, match="train_micro_batch_size_per_gpu=8"):
        ds.build_ds_config(template, micro_batch=2, grad_accum=1, lr=1e-4, weight_decay=0.0, grad_clip=1.0,
                             bf16=False, zero_stage=None)
    with pytest.raises(RecipeError, match="scheduler"):
        ds.build_ds_config({"scheduler": {"type": "WarmupLR"}}, micro_batch=2, grad_accum=1, lr=1e-4,
                             weight_decay=0.0, grad_clip=1.0, bf16=False, zero_stage=2)
    with pytest.raises(RecipeError, match="does not exist"):
        ds.build_ds_config(ROOT / "launch" / "nope.json", micro_batch=2, grad_accum=1, lr=1e-4,
                             weight_decay=0.0, grad_clip=1.0, bf16=False, zero_stage=2)


def test_hf_deepspeed_context_is_scoped() -> None:
    from transformers.integrations import is_deepspeed_zero3_enabled

    config = ds.build_ds_config(ROOT / "mcit" / "assets" / "launch" / "zero3.json", micro_batch=1, grad_accum=1, lr=1e-4,
                                  weight_decay=0.0, grad_clip=1.0, bf16=False, zero_stage=None)
    with ds.hf_deepspeed_context(config):
        assert is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()


def test_dummy_image_leaves_loss_and_gradients_unchanged() -> None:
    from transformers import LlavaForConditionalGeneration

    smoke = _smoke_module()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(smoke.tiny_config())
    batch = smoke.micro_batch(smoke.sample_pool(), step=2, part=1)
    assert "pixel_values" not in batch
    guarded = ds.ensure_vision_forward(batch, **smoke.dummy_image())
    grads = []
    for inputs in (batch, guarded):
        model.zero_grad(set_to_none=False)
        loss = model(**inputs).loss
        loss.backward()
        # Without the guard the vision tower is never used, so its gradients are None: count them as zero.
        grads.append((loss.item(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                    for n, p in model.named_parameters()}))
    (plain_loss, plain), (guarded_loss, guard) = grads
    assert guarded_loss == pytest.approx(plain_loss, abs=1e-5)
    for name, grad in guard.items():
        assert torch.allclose(grad, plain[name], atol=1e-6), name
    reached = {n for n, p in model.named_parameters() if p.grad is not None and "language_model" not in n}
    model.zero_grad(set_to_none=True)
    model(**smoke.micro_batch(smoke.sample_pool(), step=2, part=0)).loss.backward()
    with_image = {n for n, p in model.named_parameters() if p.grad is not None and "language_model" not in n}
    # Every vision/projector parameter a real image reaches, the dummy reaches too (so ZeRO gathers it), at zero.
    vision = with_image - {n for n in with_image if n.startswith("lm_head")}
    assert vision and vision <= reached, sorted(vision - reached)[:3]
    assert all(guard[n].abs().max() == 0 for n in vision)


def test_state_dict_for_saving_copies_trainable_parameters_without_zero() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    state = zero.state_dict_for_saving(model)
    assert set(state) == {"0.bias", "1.weight", "1.bias"}
    state["1.weight"].fill_(7.0)
    assert not torch.equal(model[1].weight.detach(), state["1.weight"]), "the result must be a copy"
    zero.load_parameters(model, {"1.weight": state["1.weight"]})
    assert torch.equal(model[1].weight.detach(), torch.full((2, 2), 7.0))


def test_load_parameters_names_the_bad_tensor() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="0.weight"):
        zero.load_parameters(model, {"0.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="lora_A"):
        zero.load_parameters(model, {"0.lora_A.weight": torch.zeros(1)})


# --------------------------------------------------------------------------------------------------------------------
# Launched runs


def _smoke_module():
    spec = importlib.util.spec_from_file_location("mcit_ds_smoke", SMOKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).parent / "deepspeed"
    assert launcher.exists(), f"no deepspeed launcher next to {sys.executable} (deepspeed is a dependency of mcit)"
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        MCIT_DIST_TIMEOUT_S="120",  # a hang fails the run instead of waiting 10 minutes
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    cmd = [
        str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), "--no_local_rank",
        str(SMOKE), "--out", str(out), *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero")
    _smoke_module().run_reference(out, STEPS)
    result = _launch(out, "--stages", "2,3", "--steps", str(STEPS))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["2", "3"])
def test_both_ranks_finish(runs: Path, stage: str) -> None:
    folder = runs / f"zero{stage}"
    assert (folder / "done-rank0").exists() and (folder / "done-rank1").exists()
    assert json.loads((folder / "checks.json").read_text())["world_size"] == 2


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["2", "3"])
def test_loss_curve_matches_single_process(runs: Path, stage: str) -> None:
    reference = json.loads((runs / "reference" / "losses.json").read_text())
    launched = json.loads((runs / f"zero{stage}" / "losses.json").read_text())
    assert len(launched) == len(reference) == STEPS
    assert reference[-1] < reference[0] - 0.5, "the reference run did not learn; the comparison would be vacuous"
    # Same weights, data, optimizer and schedule; only the reduction order differs (measured max gap ~1e-6).
    assert max(abs(a - b) for a, b in zip(launched, reference)) < 1e-3


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_builds_weights_sharded_and_writes_into_them(runs: Path) -> None:
    checks = json.loads((runs / "zero3" / "checks.json").read_text())
    assert checks["base_sharded"], "from_pretrained under hf_deepspeed_context did not shard the base model"
    assert checks["from_config_sharded"], "_from_config under hf_deepspeed_context did not shard the model"
    assert 0.01 < checks["from_config_std"] < 0.05, "weights built under zero.Init were not initialised"
    assert checks["zeroed_ok"] and checks["roundtrip_ok"], "writing into sharded LoRA weights did not stick"


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_next_task_gets_a_new_engine_on_the_same_module(runs: Path) -> None:
    checks = json.loads((runs / "zero3" / "checks.json").read_text())
    assert checks["task2_trained"] and checks["task2_shapes_ok"]
    assert checks["task1_unchanged"], "training the second adapter changed the frozen first one"


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_adapter_has_real_shapes_and_loads_with_peft(runs: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    saved = load_file(runs / "zero3" / "adapter" / "adapter_model.safetensors")
    reference = load_file(runs / "reference" / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == reference.keys() and len(saved) == 4 * 7 * 2
    for name, tensor in saved.items():
        assert tensor.shape == reference[name].shape, name
        assert torch.allclose(tensor, reference[name], atol=1e-4), f"{name} trained differently under ZeRO-3"
    base = LlavaForConditionalGeneration.from_pretrained(runs / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, runs / "zero3" / "adapter")
    loaded = dict(model.named_parameters())
    name = next(n for n in saved if "layers.3.mlp.down_proj.lora_B" in n)
    live = loaded[name.replace(".weight", ".default.weight")]
    assert live.shape == (256, 8)
    assert torch.equal(live.detach(), saved[name]) and live.abs().sum() > 0


@pytest.mark.distributed
@pytest.mark.slow
def test_exception_on_one_rank_ends_the_job(tmp_path: Path) -> None:
    _smoke_module().ensure_base(tmp_path)
    result = _launch(tmp_path, "--stages", "3", "--steps", "6", "--crash-rank", "1", "--crash-step", "2")
    ended = time.time()
    assert result.returncode != 0
    assert "injected failure on rank 1 at step 2" in result.stderr
    assert "[mcit rank 1/2] fatal error" in result.stderr
    crashed = float((tmp_path / "zero3" / "crash_time").read_text())
    assert ended - crashed < 60, f"the job took {ended - crashed:.0f} s to end after rank 1 failed"
    assert not (tmp_path / "zero3" / "done-rank0").exists()
