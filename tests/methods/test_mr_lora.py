"""MR-LoRA: isolated experts, a router LoRA whose pool prompt lists only the experts trained so far, hard top-1
routing where a misrouted sample is answered by the wrong expert and scored, counted fallbacks for non-letter router
answers, and a checkpoint that routes the same after loading."""

from __future__ import annotations

import json

import pytest
import torch

from mcit.config import recipe_from_dict
from mcit.data.collate import Encoder, PixelCache
from mcit.errors import RecipeError
from mcit.evaluation.evaluate import evaluate_task
from mcit.evaluation.generate import generate
from mcit.methods.base import build_method
from mcit.methods.mr_lora import AdapterActive, router_letter
from mcit.train.stages import load_stage, save_stage
from mcit.workflows.load import prepare_card
from tests.methods.harness import adapter_tensors, build, train_stage

TASKS = ["shape", "mc-color"]
DESCRIPTIONS = {"shape": "SHAPE-EXPERT names shapes", "mc-color": "COLOR-EXPERT picks colour options"}
OPTIONS = {"replay_per_task": 4, "router": {"max_steps": 2, "batch_size": 4, "lr": 5e-2, "max_length": 320,
                                            "descriptions": DESCRIPTIONS}}


def _spy(obj, name: str, calls: list):
    """Wrap obj.name so that every call's (args, result) is appended to `calls`."""
    original = getattr(obj, name)

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    setattr(obj, name, wrapped)


@pytest.fixture(scope="module")
def trained(synthcit_root):
    """Two stages (shape, then mc-color), recording the router's training data and the stage-1 routing prompts."""
    model, method, ctx = build(synthcit_root, "mr_lora", tasks=TASKS, **OPTIONS)
    router_data, prompts = [], []
    _spy(method.router, "training_samples", router_data)
    train_stage(model, method, ctx, 0)
    expert0 = adapter_tensors(model, "expert0")
    router0 = adapter_tensors(model, "router")
    _spy(method.router, "routing_sample", prompts)
    future = ctx.data.test["mc-color"][:2]  # a task whose expert does not exist yet
    groups = list(method.eval_groups(model, future))
    method.routing_report()
    return {"model": model, "method": method, "ctx": ctx, "router_data": router_data, "prompts": prompts,
            "groups": groups, "expert0": expert0, "router0": router0, "stage1_trained": False}


@pytest.fixture(scope="module")
def two_stages(trained):
    if not trained["stage1_trained"]:
        method = trained["method"]
        del method.router.routing_sample  # spy off
        train_stage(trained["model"], method, trained["ctx"], 1)
        trained["stage1_trained"] = True
    return trained


def test_router_letter_parsing():
    assert [router_letter(a, 3) for a in ("B", " (C) ", "A.", "b", "Answer: B", "D", "", "AB")] == \
        [1, 2, 0, None, None, None, None, None]


def test_the_router_sees_only_experts_trained_so_far(two_stages):
    first, second = [out for _, _, out in two_stages["router_data"]]
    # stage 1: the pool lists expert A only, even while mc-color's samples are being evaluated
    assert {s.answer for s in first} == {"A"} and len(first) == 4
    assert all("SHAPE-EXPERT" in s.question and "COLOR-EXPERT" not in s.question for s in first)
    asked = [out for _, _, out in two_stages["prompts"]]
    assert [s.task for s in asked] == ["mc-color", "mc-color"]
    assert all("A. SHAPE-EXPERT" in s.question and "COLOR-EXPERT" not in s.question and "\nB. " not in
               s.question.split("Request:")[0] for s in asked)
    assert all(s.question.endswith("Answer with the letter only.") and s.image for s in asked)
    assert [g.routes for g, _ in two_stages["groups"]][0][0].startswith("expert0")  # one expert: all go there
    # stage 2: retrained on both tasks' replay (4 each), the pool lists A and B
    by_task = {t: sorted(s.answer for s in second if s.task == t) for t in TASKS}
    assert by_task == {"shape": ["A"] * 4, "mc-color": ["B"] * 4}
    assert all("A. SHAPE-EXPERT" in s.question and "B. COLOR-EXPERT" in s.question for s in second)
    replay = two_stages["method"].state()["router"]["replay"]
    assert {s.id.split("#")[0] for s in second if s.task == "shape"} == set(replay["shape"])


def test_earlier_expert_is_bit_identical_and_the_router_is_retrained(two_stages):
    model, method = two_stages["model"], two_stages["method"]
    now = adapter_tensors(model, "expert0")
    assert now and all(torch.equal(now[k], two_stages["expert0"][k]) for k in now)
    router = adapter_tensors(model, "router")
    assert any(not torch.equal(router[k], two_stages["router0"][k]) for k in router)
    assert [h["samples"] for h in method.router_history] == [4, 8]
    assert model.active_adapter == "expert1"  # router training left the stage's expert active
    in_optimizer = {id(p) for g in method.param_groups(model, method.recipe.train) for p in g["params"]}
    assert all(".expert1." in n for n, p in model.named_parameters() if id(p) in in_optimizer)


def test_a_forced_misroute_is_answered_by_the_wrong_expert_and_scored(two_stages, tmp_path):
    model, method, ctx = two_stages["model"], two_stages["method"], two_stages["ctx"]
    samples = ctx.data.test["shape"]
    encoder, pixels = Encoder(ctx.processor, 160), PixelCache(ctx.processor)
    alone = {}
    for expert in ("expert0", "expert1"):
        with AdapterActive(model, expert):
            alone[expert] = generate(model, encoder, samples, pixels, max_new_tokens=8)
    spec = next(t for t in prepare_card(method.recipe).tasks if t.name == "shape")
    method.router.generate = lambda _m, _p, asked, *_a: ["B"] * len(asked)  # the router sends shape to mc-color
    try:
        result = evaluate_task(model, method, encoder, pixels, spec, samples, batch_size=8, max_new_tokens=8,
                               autocast=None, constrained=False, predictions_file=tmp_path / "shape.jsonl")
    finally:
        del method.router.generate
    report = method.routing_report()
    rows = [json.loads(line) for line in (tmp_path / "shape.jsonl").open()]
    assert result.n == len(rows) == len(samples)  # nothing dropped
    assert {r["route"] for r in rows} == {"expert1:mc-color"}
    assert [r["prediction"] for r in rows] == alone["expert1"] != alone["expert0"]
    assert all(r["score"] == 0.0 for r in rows) and result.score == 0.0
    assert report["accuracy"] == 0.0 and report["confusion"][0] == [0, len(samples)]
    assert report["fallbacks"] == 0 and report["routing_generations"] == len(samples)


def test_a_non_letter_router_answer_falls_back_and_is_counted(two_stages):
    model, method, ctx = two_stages["model"], two_stages["method"], two_stages["ctx"]
    samples = ctx.data.test["shape"][:2] + ctx.data.test["mc-color"][:2]
    answers = ["hello", "A", "Z", "B"]  # Z names no expert of two
    method.router.generate = lambda _m, _p, asked, *_a: answers[:len(asked)]
    try:
        groups = list(method.eval_groups(model, samples))
        list(method.eval_groups(model, samples))  # a second pass (constrained ranking) reuses the routes
        report = method.routing_report()
        again = method.route(model, samples, method.trained_experts()).argmax(1).tolist()
        method.routing_report()
    finally:
        del method.router.generate
    assert sorted(i for _, rows in groups for i in rows) == [0, 1, 2, 3]  # every sample answered
    first = [0] * 4
    for group, rows in groups:
        for i, label in zip(rows, group.routes):
            first[i] = int(label[len("expert")])
            assert ("fallback" in label) == (i in (0, 2))
    assert first == again and first[1] == 0 and first[3] == 1  # fallbacks are seeded, letters are obeyed
    assert report["fallbacks"] == 2 and report["fallbacks_by_task"] == [1, 1]
    assert [e["answer"] for e in report["fallback_examples"]] == ["hello", "Z"]
    assert report["routing_generations"] == 4 and report["routed_samples"] == 4


def test_the_routing_pass_preprocesses_each_image_once_across_rows(two_stages):
    model, method, ctx = two_stages["model"], two_stages["method"], two_stages["ctx"]
    samples = ctx.data.test["shape"][:2] + ctx.data.test["mc-color"][:2]
    images = {s.image for s in samples}
    method.router.reset()
    first = method.route(model, samples, method.trained_experts())
    pixels = method.router.pixels(ctx.processor)
    misses, hits = pixels.misses, pixels.hits
    method.router.reset()  # the next evaluation row routes again
    second = method.route(model, samples, method.trained_experts())
    method.router.reset()
    assert torch.equal(first, second)
    assert pixels.misses == misses and pixels.hits - hits == len(images)  # every image from the kept cache
    assert method.router.pixels(ctx.processor) is pixels


def test_oracle_mode_routes_trained_tasks_without_generating(two_stages):
    model, method, ctx = two_stages["model"], two_stages["method"], two_stages["ctx"]
    samples = ctx.data.test["shape"][:2] + ctx.data.test["mc-color"][:2]
    method.options.router.mode = "oracle"
    method.router.generate = lambda *_a: pytest.fail("oracle routing generated")
    try:
        weights = method.route(model, samples, method.trained_experts())
    finally:
        method.options.router.mode = "generated"
        del method.router.generate
        method.router.reset()
    assert weights.argmax(1).tolist() == [0, 0, 1, 1]


def test_a_saved_stage_routes_the_same_after_loading(two_stages, synthcit_root, tmp_path):
    model, method, ctx = two_stages["model"], two_stages["method"], two_stages["ctx"]
    samples = ctx.data.test["shape"][:3] + ctx.data.test["mc-color"][:3]
    list(method.eval_groups(model, samples))
    before = dict(method.router.answers)
    method.routing_report()
    save_stage(model, method, tmp_path / "stage", 1, "mc-color")
    fresh_model, fresh, _ = build(synthcit_root, "mr_lora", tasks=TASKS, **OPTIONS)
    for stage in range(2):  # what the runner replays on resume: structure first, then the tensors
        fresh.prepare(fresh_model, stage, [stage])
    load_stage(fresh_model, fresh, tmp_path / "stage")
    assert fresh.expert_tasks == method.expert_tasks and fresh.router.replay == method.router.replay
    list(fresh.eval_groups(fresh_model, samples))
    assert fresh.router.answers == before
    loaded, saved = adapter_tensors(fresh_model, "router"), adapter_tensors(model, "router")
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.parametrize("options, message", [
    ({"replay_per_task": 0}, r"method\.replay_per_task is 0.*router is trained only on replayed samples"),
    ({"router": {"lr": 0.0}}, r"method\.router\.lr must be > 0"),
    ({"router": {"epochs": 0}}, r"method\.router\.epochs must be >= 1"),
])
def test_option_errors(options, message):
    recipe = recipe_from_dict({"output_dir": "x", "method": {"name": "mr_lora", **options}})
    with pytest.raises(RecipeError, match=message):
        build_method(recipe)


def test_a_trained_projector_is_refused():
    recipe = recipe_from_dict({"output_dir": "x", "model": {"train_projector": True}, "method": {"name": "mr_lora"}})
    with pytest.raises(RecipeError, match="model.train_projector is true.*isolated"):
        build_method(recipe)
