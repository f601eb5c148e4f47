"""Sequential LoRA (`lora_ft`): one adapter named 'default', only LoRA weights train, and the same adapter carries
over from stage to stage (continued, not re-created or reset)."""

from __future__ import annotations

import pytest
import torch

from mcit.methods.lora_ft import ADAPTER, SequentialLoRA
from tests.methods.harness import adapter_tensors, build, train_stage

TASKS = ["shape", "mc-color"]


def _trainable(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


@pytest.fixture(scope="module")
def two_stages(synthcit_root):
    """(model, method, ctx, adapter after stage 1, adapter after stage 2, trainable names at each stage)."""
    model, method, ctx = build(synthcit_root, "lora_ft", tasks=TASKS)
    initial = adapter_tensors(model, ADAPTER)
    trainable = []
    snapshots = []
    for stage in range(2):
        method.prepare(model, stage, [stage])
        trainable.append(_trainable(model))
        if stage == 1:  # prepare of the next stage keeps the trained weights as they are
            assert all(torch.equal(v, snapshots[0][k]) for k, v in adapter_tensors(model, ADAPTER).items())
        train_stage(model, method, ctx, stage)
        snapshots.append(adapter_tensors(model, ADAPTER))
    return model, method, initial, snapshots, trainable


def test_the_method_is_registered_under_its_recipe_name(two_stages):
    _, method, *_ = two_stages
    assert isinstance(method, SequentialLoRA) and method.name == "lora_ft"


def test_one_adapter_named_default(two_stages):
    model, *_ = two_stages
    assert list(model.peft_config) == [ADAPTER] == ["default"]
    assert model.active_adapter == ADAPTER
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all(f".{ADAPTER}." in n for n in lora_names)


def test_only_lora_weights_train(two_stages):
    model, method, _, _, trainable = two_stages
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    for names in trainable:
        assert set(names) == lora  # every LoRA weight, and nothing of the base model (no projector by default)
    grouped = {id(p) for g in method.param_groups(model, method.recipe.train) for p in g["params"]}
    assert grouped == {id(p) for n, p in model.named_parameters() if n in lora}


def test_the_same_adapter_carries_over_and_keeps_learning(two_stages):
    model, _, initial, (after_1, after_2), _ = two_stages
    assert after_1.keys() == after_2.keys() == initial.keys()
    b_weights = [k for k in initial if "lora_B" in k]
    assert all(not initial[k].any() for k in b_weights)  # PEFT's zero init ...
    assert any(after_1[k].any() for k in b_weights)  # ... trained by stage 1 ...
    assert any(not torch.equal(after_1[k], after_2[k]) for k in after_1)  # ... and changed again by stage 2
    assert list(model.peft_config) == [ADAPTER]  # no second adapter appeared


def test_checkpoint_tensors_are_the_adapter(two_stages):
    model, method, *_ = two_stages
    saved = method.state_tensors(model)
    assert saved and all("lora_" in k for k in saved)
    assert {k for k in saved} == {k for k in model.state_dict() if "lora_" in k}
