"""CL-MoE: usage counting and top-2 selection, the momentum merge (expert by expert, against tensors computed by hand
from the values before and after the task), the task-level router at inference without a task id, MCITlib's reduced
variant, and a state round trip in the middle of a stage that merges exactly as the uninterrupted method."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcit.config import recipe_from_dict
from mcit.errors import RecipeError
from mcit.methods.base import build_method
from mcit.methods.cl_moe import ROUTER
from mcit.methods.lora import lora_layers
from tests.methods.harness import build, encode, train_stage

TWO = ["shape", "mc-color"]
R, E = 8, 4  # rank 2 per expert


def open_stage(model, method, ctx, stage: int, steps: int = 1, lr: float = 5e-2) -> None:
    """harness.train_stage without after_task: the test decides what happens at the end of the stage."""
    method.prepare(model, stage, [stage])
    method.before_task(model, stage, [stage], ctx.data)
    optimizer = torch.optim.AdamW([{**g, "lr": lr} for g in method.param_groups(model, method.recipe.train)])
    model.train()
    for _, batch in zip(range(steps), encode(ctx, method.train_samples(stage, [stage], ctx.data))):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def factors(model) -> dict[str, torch.Tensor]:
    """Copies of every layer's A, B and router weight."""
    out = {}
    for ref in lora_layers(model):
        out[f"{ref.name}.A"] = ref.module.lora_A["default"].weight.detach().clone()
        out[f"{ref.name}.B"] = ref.module.lora_B["default"].weight.detach().clone()
        out[f"{ref.name}.router"] = getattr(ref.module, ROUTER).weight.detach().clone()
    return out


def usage_picking(method, experts: list[int]) -> torch.Tensor:
    """Counts whose pooled top-2 is `experts`, although every single layer prefers the other experts."""
    usage = torch.zeros_like(method.usage)
    others = [e for e in range(E) if e not in experts]
    usage[0, others] = 1000  # one layer strongly prefers the others...
    usage[1:, experts] = 100  # ...but pooled over the 28 layers `experts` win
    return usage


def layer_output(layer, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """W x + s * sum_e gates_e * B_e A_e x, by hand."""
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    out = layer.base_layer(x)
    for e in range(E):
        rows = slice(2 * e, 2 * e + 2)
        out = out + gates[..., e:e + 1] * ((x @ a[rows].T) @ b[:, rows].T) * s
    return out


def test_usage_counts_each_tokens_top_two_and_the_pooled_top_two_become_the_tasks_experts(synthcit_root):
    model, moe, ctx = build(synthcit_root, "cl_moe", tasks=TWO, r=R, experts=E)
    moe.prepare(model, 0, [0])
    moe.before_task(model, 0, [0], ctx.data)
    layer = lora_layers(model)[3].module
    x = torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(0))
    model.train()
    layer(x)  # a training forward pass (dropout 0): counted for layer 3 only
    gates = torch.softmax(x @ getattr(layer, ROUTER).weight.detach().T, dim=-1).reshape(-1, E)
    top = gates.topk(2, dim=-1).indices.flatten()
    assert torch.equal(moe.usage[3], torch.bincount(top, minlength=E))
    assert int(moe.usage.sum()) == 2 * 14 and int(moe.usage[[0, 1, 2]].sum()) == 0
    model.eval()
    with torch.no_grad():
        layer(x)  # inference counts nothing
    assert int(moe.usage.sum()) == 28

    batch = next(encode(ctx, ctx.data.train["shape"][:4] + ctx.data.train["mc-color"][:4]))
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # the batch has padding
    moe.usage.zero_()
    model.train()
    model(**batch)  # every adapted layer counts 2 experts per real token, none per padding position
    assert int(moe.usage.sum()) == 2 * 28 * int(batch["attention_mask"].sum())
    model.eval()

    moe.usage = usage_picking(moe, [1, 2])
    moe.after_task(model, 0, [0], ctx.data)
    record = moe.state()["tasks"][0]
    assert record["experts"] == [1, 2] and record["usage"] == [1000, 2700, 2700, 1000]
    assert int(moe.usage.sum()) == 0  # a new stage counts from zero



def test_momentum_merge_moves_each_expert_exactly_as_the_rule_says(synthcit_root):
    model, moe, ctx = build(synthcit_root, "cl_moe", tasks=TWO, r=R, experts=E)
    for ref in lora_layers(model):
        a = ref.module.lora_A["default"].weight
        assert abs(float(a.detach().std()) - 0.01) < 0.002 and not ref.module.lora_B["default"].weight.any()  # N(0, .01), 0
    open_stage(model, moe, ctx, 0)
    assert not any(k.startswith("snapshot.") for k in moe.method_tensors())  # nothing to merge after task 1
    moe.usage = usage_picking(moe, [0, 1])
    before_merge = factors(model)
    moe.after_task(model, 0, [0], ctx.data)
    assert all(torch.equal(v, factors(model)[k]) for k, v in before_merge.items())  # the first task is not merged
    theta = factors(model)  # theta_1, by our own copy

    open_stage(model, moe, ctx, 1)
    saved = moe.method_tensors()
    assert len([k for k in saved if k.startswith("snapshot.")]) == 2 * 28
    assert all(torch.equal(saved[f"snapshot.{ref.name}.lora_A"], theta[f"{ref.name}.A"]) for ref in lora_layers(model))
    phi = factors(model)  # trained on task 2
    moe.usage = usage_picking(moe, [2, 3])  # S_1 = {0, 1}, S_2 = {2, 3}
    moe.after_task(model, 1, [1], ctx.data)
    assert moe.state()["tasks"][1]["experts"] == [2, 3]
    lam = {0: 0.3, 1: 0.3, 2: 0.7, 3: 0.7}  # experts of task 1 that task 2 dropped keep 0.3 old + 0.7 new
    merged = factors(model)
    for ref in lora_layers(model):
        for e, weight in lam.items():
            rows = slice(2 * e, 2 * e + 2)
            for part, index in (("A", (rows, slice(None))), ("B", (slice(None), rows))):
                old, new = theta[f"{ref.name}.{part}"][index], phi[f"{ref.name}.{part}"][index]
                assert float((new - old).abs().max()) > 1e-4  # the task moved this expert
                torch.testing.assert_close(merged[f"{ref.name}.{part}"][index], weight * old + (1 - weight) * new,
                                           rtol=0, atol=1e-7)
        key = f"{ref.name}.router"
        assert torch.equal(merged[key], phi[key]) and not torch.equal(phi[key], theta[key])  # routers: not merged
    assert not any(k.startswith("snapshot.") for k in moe.method_tensors())  # released with the stage


def test_inference_mixes_the_task_level_router_without_a_task_id(synthcit_root):
    model, moe, ctx = build(synthcit_root, "cl_moe", tasks=TWO, r=R, experts=E)
    for stage in range(2):
        train_stage(model, moe, ctx, stage, steps=1)
    chosen = [r["experts"] for r in moe.state()["tasks"]]
    for record in moe.state()["tasks"]:  # real counts from real training pick the top two
        ranked = sorted(range(E), key=lambda e: (-record["usage"][e], e))
        assert sum(record["usage"]) > 0 and record["experts"] == sorted(ranked[:2])
    g = torch.zeros(E)
    for experts in chosen:
        g[experts] += 0.5 / len(chosen)  # mean over tasks of 1/2 on each task's two experts
    layer = lora_layers(model)[5].module
    x = torch.randn(2, 6, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        instance = torch.softmax(x @ getattr(layer, ROUTER).weight.T, dim=-1)
        expected = layer_output(layer, x, 0.5 * instance + 0.5 * g)
        model.eval()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(layer(x), layer_output(layer, x, instance), rtol=1e-5, atol=1e-6)
        model.train()  # training routes by the instance-level router alone
        torch.testing.assert_close(layer(x), layer_output(layer, x, instance), rtol=1e-5, atol=1e-6)
    model.eval()
    samples = [s for t in TWO for s in ctx.data.test[t][:2]]
    groups = list(moe.eval_groups(model, samples))
    assert len(groups) == 1 and groups[0][1] == list(range(len(samples)))  # one pass, no task id


def test_mcitlib_variant_routes_densely_and_never_merges(synthcit_root):
    model, moe, ctx = build(synthcit_root, "cl_moe", tasks=TWO, r=R, experts=E, variant="mcitlib")
    train_stage(model, moe, ctx, 0, steps=1)
    open_stage(model, moe, ctx, 1)
    assert not any(k.startswith("snapshot.") for k in moe.method_tensors())
    phi = factors(model)
    moe.usage = usage_picking(moe, [2, 3])
    moe.after_task(model, 1, [1], ctx.data)
    after = factors(model)
    assert all(torch.equal(after[k], phi[k]) for k in phi)
    layer = lora_layers(model)[0].module
    x = torch.randn(1, 4, layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        instance = torch.softmax(x @ getattr(layer, ROUTER).weight.T, dim=-1)
        torch.testing.assert_close(layer(x), layer_output(layer, x, instance), rtol=1e-5, atol=1e-6)


def test_state_saved_mid_stage_resumes_to_the_same_merged_model(synthcit_root, tmp_path):
    model, moe, ctx = build(synthcit_root, "cl_moe", tasks=TWO, r=R, experts=E)
    train_stage(model, moe, ctx, 0, steps=1)
    open_stage(model, moe, ctx, 1)
    state = json.loads(json.dumps(moe.state()))
    save_file(moe.method_tensors(), tmp_path / "method.safetensors")
    weights = {k: v.clone() for k, v in moe.state_tensors(model).items()}
    assert any(ROUTER in k for k in weights) and state["open_stage"] == 1

    model2, moe2, _ = build(synthcit_root, "cl_moe", tasks=TWO, r=R, experts=E)  # a fresh process
    for stage in range(2):
        moe2.prepare(model2, stage, [stage])
    moe2.load_state(state, load_file(tmp_path / "method.safetensors"))
    model2.load_state_dict(weights, strict=False)
    assert torch.equal(moe2.usage, moe.usage) and moe2.snapshot.keys() == moe.snapshot.keys()

    for m, method in ((model, moe), (model2, moe2)):
        method.after_task(m, 1, [1], ctx.data)
    assert moe2.state() == moe.state()
    merged, merged2 = factors(model), factors(model2)
    assert all(torch.equal(merged[k], merged2[k]) for k in merged)
    model.eval(), model2.eval()
    layer, layer2 = lora_layers(model)[2].module, lora_layers(model2)[2].module
    x = torch.randn(1, 3, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(layer(x), layer2(x))  # same task-level router at inference

    moe3 = build_method(moe.recipe)  # a finished stage's state alone rebuilds the inference vector
    moe3.load_state(json.loads(json.dumps(moe.state())), moe.method_tensors())
    assert torch.equal(moe3._gate, moe._gate)


def _recipe(**method):
    return recipe_from_dict({"output_dir": "x", "method": {"name": "cl_moe", "lora": {"r": 12}, **method}})


@pytest.mark.parametrize("method, match", [
    ({"experts": 5}, "divide"),
    ({"experts": 6, "task_top_k": 7}, "task_top_k"),
    ({"momentum": 1.5}, "momentum"),
    ({"variant": "coin"}, "variant"),
])
def test_options_are_checked(method, match):
    with pytest.raises(RecipeError, match=match):
        build_method(_recipe(**method))
