"""DISCO: slots per task or per cluster (cosine reuse), frozen slots, every layer routed, structure rebuilt from saved
state, and a run through the runner where tasks share one slot."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mcit.config import load_recipe, recipe_from_dict
from mcit.errors import RecipeError
from mcit.methods.base import build_method
from mcit.workflows.train import ContinualRunner
from tests.methods.harness import TASKS, adapter_tensors, batch_of, build, train_stage
from tests.recipes import write_recipe


def test_distinct_tasks_get_their_own_frozen_slots(synthcit_root):
    model, disco, ctx = build(synthcit_root, "disco")
    for stage in range(3):
        train_stage(model, disco, ctx, stage)
        if stage == 0:
            slot0 = adapter_tensors(model, "slot0")
    assert disco.stage_slot == {"0": "slot0", "1": "slot1", "2": "slot2"}
    cosines = [a["best_cosine"] for a in disco.assignments]
    assert cosines[0] is None and all(c < 0.9 for c in cosines[1:])  # SynthCIT's instructions differ
    now = adapter_tensors(model, "slot0")
    assert all(torch.equal(now[k], slot0[k]) for k in now)
    assert disco._fused_layers(model) == set()  # subspace selective activation in every layer
    samples = [s for t in TASKS for s in ctx.data.test[t][:3]]
    w = disco.route(model, samples, disco.trained_experts())
    assert w.argmax(1).tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert bool((w.max(1).values > 0.99).all())  # tau = 0.05 on text features: nearly one-hot


def test_similar_tasks_share_a_slot_and_its_prototype_merges_them(synthcit_root):
    model, disco, ctx = build(synthcit_root, "disco", reuse_threshold=-1.0)
    for stage in range(3):
        train_stage(model, disco, ctx, stage)
    assert set(disco.stage_slot.values()) == {"slot0"} and disco.trained_experts() == ["slot0"]
    assert disco.expert_tasks["slot0"] == TASKS
    assert [n for n in model.peft_config] == ["slot0"]
    merged = disco.expert_prototypes(["slot0"])
    counts = disco.task_prototypes.text_count
    expected = (disco.task_prototypes.text_mean * counts[:, None]).sum(0) / counts.sum()
    torch.testing.assert_close(merged.text_mean[0], expected)
    samples = [s for t in TASKS for s in ctx.data.test[t][:2]]
    list(disco.eval_groups(model, samples))
    assert disco.routing_report()["accuracy"] == 100.0  # every task is held by the one slot


def test_max_slots_sends_new_tasks_to_the_nearest_slot(synthcit_root):
    model, disco, ctx = build(synthcit_root, "disco", max_slots=2)
    for stage in range(3):
        train_stage(model, disco, ctx, stage)
    assert disco.trained_experts() == ["slot0", "slot1"]
    assert disco.assignments[2]["slot"] in ("slot0", "slot1")


def test_load_state_rebuilds_the_slots(synthcit_root):
    model, disco, ctx = build(synthcit_root, "disco", reuse_threshold=None)
    for stage in range(2):
        train_stage(model, disco, ctx, stage)
    state, tensors = json.loads(json.dumps(disco.state())), disco.method_tensors()
    weights = disco.state_tensors(model)
    fresh_model, fresh, _ = build(synthcit_root, "disco", reuse_threshold=None)
    for stage in range(2):
        fresh.prepare(fresh_model, stage, [stage])  # no data: the slots are unknown here
    assert list(fresh_model.peft_config) == ["slot0"]
    fresh.load_state(state, tensors)
    assert list(fresh_model.peft_config) == ["slot0", "slot1"]
    fresh_model.load_state_dict(weights, strict=False)
    samples = ctx.data.test["mc-color"][:3]
    outs = []
    for m, meth in ((model, disco), (fresh_model, fresh)):
        for context, _ in meth.eval_groups(m, samples):
            with context, torch.no_grad():
                outs.append(m(**batch_of(ctx, samples)).logits)
    torch.testing.assert_close(outs[0], outs[1])


def test_option_errors():
    for options, message in (({"reuse_threshold": 1.5}, "cosine"), ({"max_slots": 0}, "max_slots")):
        with pytest.raises(RecipeError, match=message):
            build_method(recipe_from_dict({"output_dir": "x", "method": {"name": "disco", **options}}))


@pytest.mark.slow
def test_runner_with_a_shared_slot(synthcit_root, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", synthcit_root,
                        method={"name": "disco", "lora": {"r": 4, "alpha": 8}, "reuse_threshold": -1.0},
                        train={"batch_size": 16, "lr": 1e-3, "max_steps": 2, "save_steps": 0, "max_length": 160},
                        benchmark={"card": "synthcit-mini", "root": str(synthcit_root), "tasks": ["shape", "mc-color"],
                                   "max_train": 32, "max_test": 8})
    out = ContinualRunner(load_recipe(path)).run().parent
    results = json.loads((out / "results.json").read_text())
    assert results["router"]["accuracy"][1:] == [100.0, 100.0]
    stages = sorted((out / "checkpoints").glob("stage-*"))
    state = json.loads((stages[-1] / "method.json").read_text())["state"]
    assert state["stage_slot"] == {"0": "slot0", "1": "slot0"}
    first, last = load_file(stages[0] / "model.safetensors"), load_file(stages[1] / "model.safetensors")
    assert not any(".slot1." in k for k in last)
    assert any(not torch.equal(first[k], last[k]) for k in first if ".slot0." in k)  # the shared slot kept training


@pytest.mark.slow
def test_resume_after_a_lost_stage_reproduces_the_run(synthcit_root, tmp_path):
    """Resume replays prepare without knowing the slots; load_state rebuilds them and the next stage decides anew."""
    import shutil

    path = write_recipe(tmp_path / "r.yaml", synthcit_root, method={"name": "disco", "lora": {"r": 4, "alpha": 8}},
                        train={"batch_size": 16, "lr": 1e-3, "max_steps": 2, "save_steps": 0, "max_length": 160},
                        benchmark={"card": "synthcit-mini", "root": str(synthcit_root),
                                   "tasks": ["shape", "mc-color", "count"], "max_train": 32, "max_test": 8})
    out = ContinualRunner(load_recipe(path)).run().parent
    full = json.loads((out / "results.json").read_text())
    shutil.rmtree(sorted((out / "checkpoints").glob("stage-*"))[-1])
    partial = dict(full, matrix=full["matrix"][:3] + [None])
    (out / "results.json").write_text(json.dumps(partial))
    ContinualRunner(load_recipe(path)).run()
    again = json.loads((out / "results.json").read_text())
    assert again["matrix"] == full["matrix"]
    assert again["router"]["accuracy"][-1] == full["router"]["accuracy"][-1] == 100.0
