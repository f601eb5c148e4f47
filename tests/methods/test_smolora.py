"""SMoLoRA: VU experts routed on the pooled layer input, IF experts on the sample's own instruction (or, as published,
on its task's), straight-through top-1 gates that learn on the first task and freeze afterwards, per-token fusion of
the two halves, and state that survives a save/load round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcit.config import recipe_from_dict
from mcit.data.collate import Encoder, PixelCache
from mcit.data.records import IMAGE_PREFIX
from mcit.errors import RecipeError
from mcit.evaluation.generate import generate
from mcit.methods.base import build_method
from mcit.methods.lora import lora_layers
from mcit.methods.smolora import GATES, SCORERS
from tests.methods.harness import TASKS, batch_of, build, train_stage

OPTIONS = {"r": 4, "experts": 4}  # two VU and two IF experts of rank 1 per layer


@pytest.fixture(scope="module")
def stage0(synthcit_root):
    """(model, method, ctx, gates before training) after a few steps of the first task."""
    model, smolora, ctx = build(synthcit_root, "smolora", **OPTIONS)
    initial = _params(model, GATES)
    train_stage(model, smolora, ctx, 0, steps=2)
    return model, smolora, ctx, initial


def _params(model, parts) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if any(p in k for p in parts)}


def _separating_gates(model, first: torch.Tensor, second: torch.Tensor) -> None:
    """Set every layer's IF gate so that `first` picks IF expert 0 and `second` IF expert 1: each row is the part of
    one vector orthogonal to the other, so the logits have opposite signs for the two."""
    p = first - (first @ second) / (second @ second) * second  # p.second = 0, p.first > 0
    q = second - (second @ first) / (first @ first) * first  # q.first = 0, q.second > 0
    with torch.no_grad():
        for ref in lora_layers(model):
            getattr(ref.module, GATES[1]).weight.copy_(torch.stack([p - q, q - p]))


def _if_routes(smolora, model, samples, ctx) -> torch.Tensor:
    """(N, layers): the IF expert each sample picks in every layer, through the evaluator's grouping."""
    picks = torch.empty(len(samples), len(lora_layers(model)), dtype=torch.long)
    for context, indices in smolora.eval_groups(model, samples):
        with context, smolora.tracing() as trace, torch.no_grad():
            model(**batch_of(ctx, [samples[i] for i in indices]))
        picks[indices] = trace[0]["routes"][:, 1::2]
    return picks


def test_the_if_route_follows_the_sample_s_own_instruction_not_its_task_label(synthcit_root):
    model, smolora, ctx = build(synthcit_root, "smolora", **OPTIONS)
    model.eval()
    shape, caption = ctx.data.train["shape"][0], ctx.data.train["caption"][0]
    features = smolora.instruction_features([shape, caption])
    assert not torch.allclose(features[0], features[1])
    _separating_gates(model, features[0], features[1])
    swapped = [dataclasses.replace(shape, task="caption"), dataclasses.replace(caption, task="shape")]
    caption_question = dataclasses.replace(shape, turns=[(IMAGE_PREFIX + caption.question, shape.answer)])
    routes = _if_routes(smolora, model, [shape, caption, *swapped, caption_question], ctx)
    assert routes[0].eq(0).all() and routes[1].eq(1).all()  # two instructions, two IF experts
    assert torch.equal(routes[2:4], routes[:2])  # the task label plays no part
    assert routes[4].eq(1).all()  # a shape image asked the caption question routes as the caption question
    # the embedding routed on inside the model call is the sample's own, the same in training and in generation
    with smolora.tracing() as trace, torch.no_grad():
        model(**batch_of(ctx, [shape, caption]))
    torch.testing.assert_close(trace[0]["instruction"], features)
    with smolora.tracing() as trace:
        generate(model, Encoder(ctx.processor, 160), [shape, caption], PixelCache(ctx.processor), max_new_tokens=4)
    prefill, steps = trace[0], trace[1:]
    assert not prefill["continued"] and steps and all(s["continued"] for s in steps)
    picks = prefill["routes"][:, 1::2]  # generation orders its rows by prompt length
    assert sorted(picks[:, 0].tolist()) == [0, 1] and picks.eq(picks[:, :1]).all()
    assert all(torch.equal(s["routes"], prefill["routes"]) for s in steps)  # decoding keeps the prompt's route


def test_the_oracle_routes_on_the_task_index(synthcit_root):
    model, smolora, ctx = build(synthcit_root, "smolora", oracle_task_id=True, task_samples=8, **OPTIONS)
    model.eval()
    assert smolora.task_names == TASKS and list(smolora.task_instruction) == TASKS
    expected = smolora.instruction_features(ctx.data.train["caption"][:8]).mean(0)
    torch.testing.assert_close(smolora.task_instruction["caption"], expected)
    _separating_gates(model, smolora.task_instruction["shape"], smolora.task_instruction["caption"])
    shape, caption = ctx.data.test["shape"][0], ctx.data.test["caption"][0]
    relabelled = dataclasses.replace(shape, task="caption")
    routes = _if_routes(smolora, model, [shape, caption, relabelled], ctx)
    assert routes[0].eq(0).all() and routes[1].eq(1).all() and routes[2].eq(1).all()  # the label decides
    smolora.prepare(model, 2, [2])  # training rows route on the stage's task, here caption
    with smolora.tracing() as trace, torch.no_grad():
        model(**batch_of(ctx, [shape]))
    assert trace[0]["routes"][:, 1::2].eq(1).all()
    with pytest.raises(RecipeError, match="oracle_task_id: test samples of \\['elsewhere'\\]") as info:
        list(smolora.eval_groups(model, [dataclasses.replace(shape, task="elsewhere")]))
    assert "\n" not in str(info.value)
    fresh = build_method(smolora.recipe)  # the task embeddings are method state: a rebuilt stage routes alike
    fresh.load_state(json.loads(json.dumps(smolora.state())), smolora.method_tensors())
    assert fresh.task_names == TASKS
    assert all(torch.equal(fresh.task_instruction[t], smolora.task_instruction[t]) for t in TASKS)


def test_the_gates_get_gradients_through_the_straight_through_top1(stage0):
    model, smolora, ctx, initial = stage0
    changed = [k for k, v in _params(model, GATES).items() if not torch.equal(v, initial[k])]
    assert any(GATES[0] in k for k in changed) and any(GATES[1] in k for k in changed)
    model.train()
    model(**batch_of(ctx, ctx.data.train["shape"][:4])).loss.backward()
    layer = lora_layers(model)[0].module
    for name in GATES:  # a one-hot forward alone would leave these without a gradient
        assert getattr(layer, name).weight.grad is not None and float(getattr(layer, name).weight.grad.abs().sum()) > 0
    model.zero_grad(set_to_none=True)
    model.eval()


def test_the_layer_fuses_the_picked_experts_per_token(stage0):
    model, smolora, ctx, _ = stage0
    layer = lora_layers(model)[0].module
    vu_gate, if_gate = (getattr(layer, n) for n in GATES)
    vu_score, if_score = (getattr(layer, n) for n in SCORERS)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, layer.in_features, generator=generator)
    instruction = smolora.instruction_features(ctx.data.test["shape"][:1] + ctx.data.test["caption"][:1])
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    smolora.routing.fixed, smolora.routing.pool, smolora.routing.instruction = None, None, instruction
    with torch.no_grad(), smolora.tracing():
        out = layer(x)
        weights = smolora.routing.fusion[0]
        vu_pick = vu_gate(x.mean(1)).argmax(-1)
        if_pick = if_gate(instruction).argmax(-1) + 2  # IF experts follow the two VU experts
        expected = layer.base_layer(x)
        for row in range(2):
            vu = (x[row] @ a[vu_pick[row]][:, None]) @ b[:, vu_pick[row]][None] * s
            inst = (x[row] @ a[if_pick[row]][:, None]) @ b[:, if_pick[row]][None] * s
            w = torch.softmax(torch.cat([vu_score(vu), if_score(inst)], -1), -1)
            expected[row] += w[:, :1] * vu + w[:, 1:] * inst
            torch.testing.assert_close(weights[row], w)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    assert weights[..., 0].std() > 0  # per token, not one mixture for the layer


def test_a_saved_and_reloaded_stage_gives_the_same_outputs(stage0, synthcit_root, tmp_path):
    model, smolora, ctx, _ = stage0
    save_file(smolora.state_tensors(model), tmp_path / "model.safetensors")
    save_file(smolora.method_tensors(), tmp_path / "method.safetensors")
    state = json.loads(json.dumps(smolora.state()))
    tensors = load_file(tmp_path / "model.safetensors")
    assert sum(any(n in k for n in GATES + SCORERS) for k in tensors) == 4 * len(lora_layers(model))
    fresh_model, fresh, _ = build(synthcit_root, "smolora", **OPTIONS)
    fresh.prepare(fresh_model, 0, [0])
    fresh.load_state(state, load_file(tmp_path / "method.safetensors"))
    missing = fresh_model.load_state_dict(tensors, strict=False)
    assert not missing.unexpected_keys
    batch = batch_of(ctx, ctx.data.test["shape"][:2] + ctx.data.test["mc-color"][:2])
    outs = []
    for m, meth in ((model, smolora), (fresh_model, fresh)):
        m.eval()
        with torch.no_grad(), meth.tracing() as trace:
            outs.append((m(**batch).logits, trace[0]["routes"]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


def test_gates_freeze_after_the_first_task_while_experts_and_scorers_train(stage0):
    # last test of the module: trains the shared model on the second task
    model, smolora, ctx, _ = stage0
    gates, rest = _params(model, GATES), _params(model, ("lora_B", *SCORERS))
    train_stage(model, smolora, ctx, 1, steps=1)
    in_optimizer = {id(p) for g in smolora.param_groups(model, smolora.recipe.train) for p in g["params"]}
    named = dict(model.named_parameters())
    assert all(not named[k].requires_grad and id(named[k]) not in in_optimizer for k in gates)
    assert all(torch.equal(named[k], v) for k, v in gates.items())
    changed = [k for k, v in rest.items() if not torch.equal(named[k], v)]
    assert any("lora_B" in k for k in changed) and any(SCORERS[1] in k for k in changed)


def test_experts_split_evenly_into_vu_and_if_halves():
    for experts, r in ((3, 6), (4, 6), (0, 4)):
        recipe = recipe_from_dict({"output_dir": "x", "method": {"name": "smolora", "lora": {"r": r},
                                                                 "experts": experts}})
        with pytest.raises(RecipeError, match="even"):
            build_method(recipe)
