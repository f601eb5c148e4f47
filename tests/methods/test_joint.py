"""Joint training (`joint`): one stage with every task, trained on the union of the tasks' samples, with sequential
LoRA's single adapter; the run then has a zero-shot row and one 'joint' row."""

from __future__ import annotations

import pytest

from mcit.methods.joint import JointTraining
from mcit.methods.lora_ft import ADAPTER
from mcit.runs.results import empty_results
from mcit.workflows.train import stage_labels
from tests.methods.harness import build

TASKS = ["shape", "mc-color", "caption"]


@pytest.fixture(scope="module")
def joint(synthcit_root):
    return build(synthcit_root, "joint", tasks=TASKS)


def test_one_stage_with_every_task(joint):
    _, method, _ = joint
    assert isinstance(method, JointTraining) and method.name == "joint"
    assert method.schedule(3) == [[0, 1, 2]]
    assert method.schedule(5) == [[0, 1, 2, 3, 4]]
    assert method.schedule(1) == [[0]]


def test_the_stage_trains_on_the_union_of_the_tasks(joint):
    _, method, ctx = joint
    (task_ids,) = method.schedule(len(ctx.data.names))
    samples = method.train_samples(0, task_ids, ctx.data)
    expected = [(task, s.id) for task in TASKS for s in ctx.data.train[task]]
    assert all(ctx.data.train[task] for task in TASKS)
    assert [(s.task, s.id) for s in samples] == expected  # every sample of every task, once each
    assert len(samples) == sum(len(ctx.data.train[task]) for task in TASKS)


def test_one_adapter_for_all_tasks(joint):
    model, method, _ = joint
    method.prepare(model, 0, [0, 1, 2])
    assert list(model.peft_config) == [ADAPTER]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and f".{ADAPTER}." in n for n in trainable)


def test_the_run_has_a_zero_shot_row_and_a_joint_row(joint):
    _, method, ctx = joint
    schedule = method.schedule(len(ctx.data.names))
    labels = stage_labels(ctx.data.names, schedule)
    assert labels == ["joint"]
    doc = empty_results(recipe="r", method="joint", benchmark="synthcit", seed=0, tasks=ctx.data.names,
                        labels=labels, schedule=schedule)
    assert doc["stages"] == ["zero-shot", "joint"] and doc["stage_tasks"] == [[], [0, 1, 2]]
    assert len(doc["matrix"]) == 2
