"""MoELoRA: E experts of rank r/E mixed by a per-token softmax gate in every LoRA layer; all experts and gates train
on every task; the gates are saved with the checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mcit.config import load_recipe, recipe_from_dict
from mcit.errors import RecipeError
from mcit.methods.base import build_method
from mcit.methods.lora import lora_layers
from mcit.workflows.train import ContinualRunner
from tests.methods.harness import build, train_stage
from tests.recipes import write_recipe


def test_layer_output_is_the_gated_sum_of_rank_r_over_e_experts(synthcit_root):
    model, moe, ctx = build(synthcit_root, "moelora", r=6, experts=3)
    train_stage(model, moe, ctx, 0)
    layer = lora_layers(model)[0].module
    assert layer.lora_A["default"].weight.shape[0] == 6 and layer.mcit_moe_gate.out_features == 3
    assert float(layer.mcit_moe_gate.weight.detach().abs().sum()) > 0  # the gate trained
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    with torch.no_grad():
        gates = torch.softmax(x @ layer.mcit_moe_gate.weight.T, dim=-1)  # (2, 5, 3): per token
        expected = layer.base_layer(x)
        for e in range(3):
            rows = slice(2 * e, 2 * e + 2)
            expected = expected + gates[..., e:e + 1] * ((x @ a[rows].T) @ b[:, rows].T) * s
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(gates[0, 0], gates[0, 1])  # different tokens, different mixtures


def test_all_experts_and_gates_train_on_every_task(synthcit_root):
    model, moe, ctx = build(synthcit_root, "moelora", r=6, experts=3)
    train_stage(model, moe, ctx, 0)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k or "mcit_moe_gate" in k}
    train_stage(model, moe, ctx, 1)
    in_optimizer = {id(p) for g in moe.param_groups(model, moe.recipe.train) for p in g["params"]}
    named = dict(model.named_parameters())
    assert all(id(named[k]) in in_optimizer for k in before)
    changed = [k for k, v in before.items() if not torch.equal(v, named[k])]
    assert any("mcit_moe_gate" in k for k in changed) and any("lora_B" in k for k in changed)
    assert all(any(k in key for key in moe.state_tensors(model)) for k in before if "mcit_moe_gate" in k)


def test_rank_must_split_evenly():
    recipe = recipe_from_dict({"output_dir": "x", "method": {"name": "moelora", "lora": {"r": 8}, "experts": 3}})
    with pytest.raises(RecipeError, match="divide"):
        build_method(recipe)


@pytest.mark.slow
def test_runner_saves_the_gates(synthcit_root, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", synthcit_root,
                        method={"name": "moelora", "lora": {"r": 4, "alpha": 8}, "experts": 2},
                        train={"batch_size": 16, "lr": 1e-3, "max_steps": 2, "save_steps": 0, "max_length": 160},
                        benchmark={"card": "synthcit-mini", "root": str(synthcit_root), "tasks": ["shape", "mc-color"],
                                   "max_train": 32, "max_test": 8})
    out = ContinualRunner(load_recipe(path)).run().parent
    stage = sorted((out / "checkpoints").glob("stage-*"))[-1]
    gates = {k: v for k, v in load_file(stage / "model.safetensors").items() if "mcit_moe_gate" in k}
    assert len(gates) == 28 and any(float(v.abs().sum()) > 0 for v in gates.values())
    results = json.loads((out / "results.json").read_text())
    assert all(row is not None for row in results["matrix"])
