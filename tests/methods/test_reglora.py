"""RegLoRA (and SEFE): key positions, the sparse penalty, the merge, checkpoint round trip, and a short runner run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mcit.config import recipe_from_dict
from mcit.errors import RecipeError
from mcit.methods.base import build_method
from mcit.methods.reglora import key_penalty, keyed_product, top_key_positions, union_keys
from mcit.models.loading import load_base
from tests.recipes import write_recipe


def _recipe(**method):
    return recipe_from_dict({"output_dir": "unused", "seed": 3,
                             "method": {"name": "reglora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **method}})


def _model_and_method(**method):
    recipe = _recipe(**method)
    reg = build_method(recipe)
    model, _ = load_base(recipe.model)
    model = reg.attach(model, None)
    return model, reg


def _perturb_lora(model, seed: int) -> None:
    """Stand-in for a task's training: give every LoRA factor non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _batch(seed: int = 0) -> dict:
    ids = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


# --- the math --------------------------------------------------------------------------------------------------------

def test_key_positions_are_the_top_fraction_of_abs_delta():
    delta = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    keys = top_key_positions(delta, 0.05)
    assert keys.dtype == torch.int32 and keys.numel() == 12  # ceil(0.05 * 240)
    chosen = torch.zeros(240, dtype=torch.bool)
    chosen[keys.long()] = True
    flat = delta.abs().flatten()
    assert flat[chosen].min() > flat[~chosen].max()
    assert set(keys.tolist()) == set(flat.argsort(descending=True)[:12].tolist())
    assert top_key_positions(delta, 1e-9).numel() == 1  # never empty


def test_union_accumulates_keys_over_tasks():
    a = torch.tensor([1, 5, 9], dtype=torch.int32)
    b = torch.tensor([0, 5, 11], dtype=torch.int32)
    assert union_keys(a, b).tolist() == [0, 1, 5, 9, 11]
    assert union_keys(None, b).tolist() == b.tolist()


@pytest.mark.parametrize("chunk", [1, 3, 1 << 16])
def test_keyed_product_equals_the_dense_product_values_and_gradients(chunk):
    g = torch.Generator().manual_seed(1)
    b = torch.randn(6, 3, generator=g, dtype=torch.float64).float().requires_grad_()
    a = torch.randn(3, 8, generator=g).requires_grad_()
    keys = torch.tensor([0, 7, 9, 18, 23, 40, 47], dtype=torch.int32)
    sparse = keyed_product(b, a, keys, chunk)
    dense_b, dense_a = b.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    dense = (dense_b @ dense_a).flatten()[keys.long()]
    torch.testing.assert_close(sparse, dense)
    weights = torch.randn(keys.numel(), generator=g)
    (sparse * weights).sum().backward()
    (dense * weights).sum().backward()
    torch.testing.assert_close(b.grad, dense_b.grad)
    torch.testing.assert_close(a.grad, dense_a.grad)


def test_penalty_equals_the_dense_formula_on_small_matrices():
    g = torch.Generator().manual_seed(2)
    factors = []
    for d_out, d_in in [(5, 7), (4, 9), (6, 6)]:
        b, a = torch.randn(d_out, 2, generator=g), torch.randn(2, d_in, generator=g)
        keys = top_key_positions(torch.randn(d_out, d_in, generator=g), 0.3)
        factors.append((b, a, keys))
    expected = 2.5e3 / 3 * sum((b @ a).flatten()[k.long()].abs().mean() for b, a, k in factors)
    torch.testing.assert_close(key_penalty(factors, 2.5e3), expected)


# --- the method on the tiny model ------------------------------------------------------------------------------------

def test_after_task_merges_delta_into_base_and_starts_a_fresh_lora():
    model, reg = _model_and_method(key_fraction=0.02)
    reg.prepare(model, 0, [0])
    _perturb_lora(model, 0)
    name, layer = next(iter(reg._layers.items()))
    before = layer.get_base_layer().weight.detach().clone()
    scaling = layer.scaling["default"]
    delta = scaling * layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach()
    reg.after_task(model, 0, [0], None)
    torch.testing.assert_close(layer.get_base_layer().weight, before + delta)
    assert torch.equal(reg.keys[name], top_key_positions(delta, 0.02))
    assert reg.keys[name].numel() == -(-delta.numel() * 2 // 100)
    assert len(reg.keys) == len(reg._layers) == 28  # 7 projections x 4 layers of the tiny LM
    assert all(float(layer.lora_B["default"].weight.detach().abs().sum()) == 0 for layer in reg._layers.values())
    assert float(layer.lora_A["default"].weight.detach().abs().sum()) > 0  # a fresh A, so the next LoRA can learn


def test_extra_loss_is_the_penalty_on_the_current_lora_and_has_gradients():
    model, reg = _model_and_method(reg_lambda=100.0)
    reg.prepare(model, 0, [0])
    model.train()
    assert reg.extra_loss(model, {}, model(**_batch())) is None  # no earlier task: no penalty
    _perturb_lora(model, 0)
    reg.after_task(model, 0, [0], None)
    reg.prepare(model, 1, [1])
    _perturb_lora(model, 1)
    out = model(**_batch())
    loss = reg.extra_loss(model, {}, out)
    factors = [(m.lora_B["default"].weight, m.lora_A["default"].weight, reg.keys[n]) for n, m in reg._layers.items()]
    dense = 100.0 / 28 * sum((b @ a).flatten()[k.long()].abs().mean() for b, a, k in factors)
    torch.testing.assert_close(loss, dense.detach())
    loss.backward()
    a_grad = reg._layers[next(iter(reg._layers))].lora_A["default"].weight.grad
    assert a_grad is not None and float(a_grad.abs().sum()) > 0
    with torch.no_grad():  # evaluation forward passes collect nothing
        model(**_batch())
    assert reg.extra_loss(model, {}, None) is None


def test_checkpoint_round_trip_rebuilds_the_same_model():
    model, reg = _model_and_method()
    reg.prepare(model, 0, [0])
    _perturb_lora(model, 0)
    reg.after_task(model, 0, [0], None)
    tensors, keys, state = reg.state_tensors(model), reg.method_tensors(), json.loads(json.dumps(reg.state()))
    assert all(v.dtype == torch.int32 for v in keys.values())
    assert any(k.endswith("q_proj.base_layer.weight") for k in tensors)  # the merged weights travel with the stage

    fresh, again = _model_and_method()  # what a resumed process does: setup, prepare, load
    again.prepare(fresh, 0, [0])
    again.load_state(state, keys)
    params = dict(fresh.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    for m, r in ((model, reg), (fresh, again)):
        r.prepare(m, 1, [1])
        _perturb_lora(m, 5)
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**_batch()).logits, fresh(**_batch()).logits, rtol=0, atol=0)
    for m in (model, fresh):
        m.train()
    penalties = [r.extra_loss(m, {}, m(**_batch())) for m, r in ((model, reg), (fresh, again))]
    assert float(penalties[0]) > 0 and float(penalties[0]) == float(penalties[1])


def test_options_are_validated_and_sefe_requires_asd():
    with pytest.raises(RecipeError, match="key_fraction"):
        build_method(_recipe(key_fraction=0.0))
    with pytest.raises(RecipeError, match="benchmark.asd.enabled"):
        build_method(recipe_from_dict({"output_dir": "x", "method": {"name": "sefe"}}))
    sefe = build_method(recipe_from_dict({"output_dir": "x", "method": {"name": "sefe"},
                                          "benchmark": {"asd": {"enabled": True}}}))
    assert sefe.name == "sefe" and sefe.options.reg_lambda == 2.5e3 and sefe.options.key_fraction == 0.02


@pytest.mark.slow
def test_runner_trains_two_tasks_and_stores_keys_compactly(tmp_path, synthcit_root):
    from mcit.config import load_recipe
    from mcit.workflows.train import ContinualRunner

    path = write_recipe(tmp_path / "r.yaml", synthcit_root, method={"name": "reglora", "lora": {"r": 4, "alpha": 8},
                                                                    "reg_lambda": 100.0},
                        benchmark={"max_train": 32, "max_test": 8}, eval={"constrained": False})
    out = ContinualRunner(load_recipe(path)).run().parent
    results = json.loads((out / "results.json").read_text())
    assert all(row is not None for row in results["matrix"])
    stage1, stage2 = (out / "checkpoints" / s for s in ("stage-01-shape", "stage-02-mc-color"))
    keys1, keys2 = load_file(str(stage1 / "method.safetensors")), load_file(str(stage2 / "method.safetensors"))
    assert len(keys1) == 28 and all(v.dtype == torch.int32 for v in keys1.values())
    # union over tasks: every key of task 1 is still a key after task 2
    for name, k1 in keys1.items():
        assert set(k1.tolist()) <= set(keys2[name].tolist())
    losses = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "train" and r.get("stage") == 1 for r in losses)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_zero3_run_with_really_sharded_lora(tmp_path, synthcit_root):
    """`mcit launch` at ZeRO-3 with persistence threshold 0, so every LoRA factor is sharded outside its forward."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    template = json.loads((Path(__file__).resolve().parents[2] / "mcit" / "assets" / "launch" / "zero3.json").read_text())
    template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3-sharded.json").write_text(json.dumps(template))
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", synthcit_root, output_dir=out,
                        method={"name": "reglora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "reg_lambda": 100.0},
                        benchmark={"max_train": 32, "max_test": 8}, eval={"constrained": False},
                        train={"batch_size": 8, "save_steps": 0, "deepspeed": str(tmp_path / "zero3-sharded.json")})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "mcit.cli", "launch", str(path), "--nproc", "2", "--cpu",
                           "--master-port", str(port)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert json.loads((out / "env.json").read_text())["world_size"] == 2
    results = json.loads((out / "results.json").read_text())
    assert all(row is not None for row in results["matrix"])
    stages = [out / "checkpoints" / s for s in ("stage-01-shape", "stage-02-mc-color")]
    weights = [load_file(str(s / "model.safetensors")) for s in stages]
    keys = [load_file(str(s / "method.safetensors")) for s in stages]
    base = next(k for k in weights[0] if k.endswith("q_proj.base_layer.weight"))
    assert weights[0][base].shape == (256, 256)  # gathered full weights, not empty shards
    assert not torch.equal(weights[0][base], weights[1][base])  # the second task was merged too
    for name, k1 in keys[0].items():
        assert set(k1.tolist()) <= set(keys[1][name].tolist())
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "train" and r.get("stage") == 1 for r in records)
