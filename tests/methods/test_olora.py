"""O-LoRA: one adapter per task, only the newest trains, the orthogonality loss, and the resume rebuild."""

from __future__ import annotations

import json

import pytest
import torch

from mcit.config import recipe_from_dict
from mcit.errors import RecipeError
from mcit.methods.base import build_method
from mcit.methods.olora import orthogonality_loss
from mcit.models.loading import load_base
from tests.recipes import write_recipe


def _recipe(**method):
    return recipe_from_dict({"output_dir": "unused", "seed": 0,
                             "method": {"name": "olora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **method}})


def _model_and_method(**method):
    recipe = _recipe(**method)
    olora = build_method(recipe)
    model, _ = load_base(recipe.model)
    return olora.attach(model, None), olora


def _batch(seed: int = 0) -> dict:
    ids = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _train(model, method, steps: int = 3, lr: float = 1e-2) -> None:
    """A few optimizer steps the way the loop takes them: CE + extra_loss, AdamW over param_groups."""
    groups = method.param_groups(model, method.recipe.train)
    optimizer = torch.optim.AdamW([{**g, "lr": lr} for g in groups])
    model.train()
    for step in range(steps):
        out = model(**_batch(step))
        extra = method.extra_loss(model, {}, out)
        (out.loss + (extra if extra is not None else 0)).backward()
        optimizer.step()
        optimizer.zero_grad()


def _adapter(model, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if f".{name}." in k}


def test_orthogonality_loss_is_the_l1_norm_of_cross_products():
    g = torch.Generator().manual_seed(0)
    new = [torch.randn(2, 5, generator=g), torch.randn(2, 3, generator=g)]
    old = [torch.randn(4, 5, generator=g), None]  # second layer: no earlier task
    torch.testing.assert_close(orthogonality_loss(new, old), (new[0] @ old[0].t()).abs().sum())
    q = torch.linalg.qr(torch.randn(5, 5, generator=g)).Q
    assert float(orthogonality_loss([q[:2]], [q[2:]])) < 1e-5  # orthogonal subspaces cost nothing


def test_only_the_newest_adapter_trains_and_earlier_ones_stay_unchanged():
    model, olora = _model_and_method(lambda_orth=0.05)
    olora.prepare(model, 0, [0])
    _train(model, olora)
    task0 = _adapter(model, "task0")
    assert any(float(v.abs().sum()) > 0 for k, v in task0.items() if "lora_B" in k)  # task 0 did train

    olora.prepare(model, 1, [1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task1." in n for n in trainable)
    in_groups = {id(p) for g in olora.param_groups(model, olora.recipe.train) for p in g["params"]}
    assert all(id(p) not in in_groups for n, p in model.named_parameters() if ".task0." in n)  # no optimizer state
    assert list(model.base_model.active_adapters) == ["task0", "task1"]  # both summed in the forward pass
    extra = olora.extra_loss(model, {}, None)
    assert extra is not None and float(extra.detach()) > 0  # fresh random A_1 is not orthogonal to A_0 yet
    _train(model, olora)
    after = _adapter(model, "task0")
    assert task0.keys() == after.keys() and all(torch.equal(task0[k], after[k]) for k in task0)
    assert any(float(v.abs().sum()) > 0 for k, v in _adapter(model, "task1").items() if "lora_B" in k)


def test_orthogonality_loss_decreases_when_trained_on_alone():
    model, olora = _model_and_method(lambda_orth=1.0)
    olora.prepare(model, 0, [0])
    olora.prepare(model, 1, [1])
    optimizer = torch.optim.Adam([p for g in olora.param_groups(model, olora.recipe.train) for p in g["params"]], lr=0.01)
    first = float(olora.extra_loss(model, {}, None).detach())
    for _ in range(30):
        loss = olora.extra_loss(model, {}, None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(olora.extra_loss(model, {}, None).detach()) < 0.5 * first


def test_l2_term_is_added_on_the_new_adapter_only():
    model, olora = _model_and_method(lambda_orth=0.0, lambda_l2=0.5)
    olora.prepare(model, 0, [0])
    olora.prepare(model, 1, [1])
    expected = 0.5 * sum(p.detach().pow(2).sum() for n, p in model.named_parameters() if ".task1." in n)
    torch.testing.assert_close(olora.extra_loss(model, {}, None).detach(), expected)


def test_resume_rebuild_reproduces_the_model():
    model, olora = _model_and_method()
    for stage in range(2):
        torch.manual_seed(1000 * stage)  # the runner seeds before every prepare, so adapter inits are replayable
        olora.prepare(model, stage, [stage])
        _train(model, olora, steps=2)
    tensors, state = olora.state_tensors(model), json.loads(json.dumps(olora.state()))
    assert any(".task0." in k for k in tensors) and any(".task1." in k for k in tensors)

    fresh, again = _model_and_method()
    for stage in range(2):  # the runner replays prepare for every finished stage, then loads the last one
        torch.manual_seed(1000 * stage)
        again.prepare(fresh, stage, [stage])
    again.load_state(state, again.method_tensors())
    fresh.load_state_dict(tensors, strict=False)
    for m, method in ((model, olora), (fresh, again)):
        torch.manual_seed(2000)
        method.prepare(m, 2, [2])
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**_batch()).logits, fresh(**_batch()).logits, rtol=0, atol=0)
    torch.testing.assert_close(olora.extra_loss(model, {}, None), again.extra_loss(fresh, {}, None))


def test_zero3_is_refused_with_a_pointer_to_zero2():
    with pytest.raises(RecipeError, match="zero2"):
        build_method(recipe_from_dict({"output_dir": "x", "method": {"name": "olora"},
                                       "train": {"deepspeed": "zero3"}}))


@pytest.mark.slow
def test_runner_keeps_the_first_adapter_of_a_finished_stage(tmp_path, synthcit_root):
    from safetensors.torch import load_file

    from mcit.config import load_recipe
    from mcit.workflows.train import ContinualRunner

    path = write_recipe(tmp_path / "r.yaml", synthcit_root, method={"name": "olora", "lora": {"r": 4, "alpha": 8}},
                        benchmark={"max_train": 32, "max_test": 8}, eval={"constrained": False})
    out = ContinualRunner(load_recipe(path)).run().parent
    first = load_file(str(out / "checkpoints" / "stage-01-shape" / "model.safetensors"))
    second = load_file(str(out / "checkpoints" / "stage-02-mc-color" / "model.safetensors"))
    task0 = [k for k in first if ".task0." in k]
    assert task0 and all(torch.equal(first[k], second[k]) for k in task0)
    assert any(".task1." in k for k in second)
