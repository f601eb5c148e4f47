"""HiDe-LLaVA: one expert per task with flat training cost, frozen experts stay unchanged, task-specific layers from a
list or from CKA (file or in-run), and a full run through the runner records routing and the chosen layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mcit.analysis.cka import CKAResult
from mcit.config import load_recipe, recipe_from_dict
from mcit.errors import RecipeError
from mcit.methods.base import build_method
from mcit.methods.lora import lora_layers
from mcit.workflows.train import ContinualRunner
from tests.methods.harness import adapter_tensors, batch_of, build, train_stage
from tests.recipes import write_recipe


def test_each_task_trains_only_its_expert_at_flat_cost(synthcit_root):
    model, hide, ctx = build(synthcit_root, "hide")
    sizes, snapshots = [], []
    for stage in range(3):
        train_stage(model, hide, ctx, stage)
        in_optimizer = {id(p) for g in hide.param_groups(model, hide.recipe.train) for p in g["params"]}
        named = dict(model.named_parameters())
        sizes.append(sum(named[n].numel() for n in named if id(named[n]) in in_optimizer))
        assert all(f".expert{stage}." in n for n in named if id(named[n]) in in_optimizer)
        assert model.base_model.active_adapters == [f"expert{stage}"]  # the forward runs one adapter
        snapshots.append(adapter_tensors(model, f"expert{stage}"))
    assert sizes[0] == sizes[1] == sizes[2] > 0
    for stage in range(2):  # earlier experts are bit-identical after later tasks trained
        now = adapter_tensors(model, f"expert{stage}")
        assert all(torch.equal(now[k], snapshots[stage][k]) for k in now)
    assert any(float(v.abs().sum()) > 0 for k, v in snapshots[0].items() if "lora_B" in k)
    assert hide.state()["expert_parameters"] == {f"expert{i}": sizes[0] for i in range(3)}


def _cka_file(path, means: dict[int, float]) -> str:
    result = CKAResult(tasks=["a", "b"], layers=sorted(means), kind="rbf", n_samples=10,
                       matrices={k: [[1.0, v], [v, 1.0]] for k, v in means.items()}, mean_cross_task=means)
    path.write_text(result.to_json())
    return str(path)


def test_expand_layers_from_a_list_or_a_cka_file(synthcit_root, tmp_path):
    model, hide, _ = build(synthcit_root, "hide", expand_layers=[-1, 0])
    assert hide.expand_layers(model) == [0, 3]
    assert hide._fused_layers(model) == {1, 2}
    cka = _cka_file(tmp_path / "cka.json", {0: 0.9, 1: 0.2, 2: 0.5, 3: 0.4})
    model, hide, _ = build(synthcit_root, "hide", expand_layers="auto", cka_path=cka)
    assert hide.expand_layers(model) == [1]
    assert hide.state()["expand_source"] == f"cka:{cka}"
    model, hide, _ = build(synthcit_root, "hide", expand_layers="auto", cka_path=cka, expand_count=2)
    assert hide.expand_layers(model) == [1, 3]
    model, hide, _ = build(synthcit_root, "hide", expand_layers="auto", cka_path=cka, expand_threshold=0.45)
    assert hide.expand_layers(model) == [1, 3]
    model, hide, _ = build(synthcit_root, "hide", expand_layers=[7])
    with pytest.raises(RecipeError, match="layer 7 does not exist"):
        hide.expand_layers(model)


@pytest.mark.parametrize("options, message", [
    ({"expand_layers": "top"}, "expand_layers"),
    ({"expand_layers": "auto", "expand_count": 1, "expand_threshold": 0.5}, "exclude each other"),
    ({"expand_layers": "auto", "cka_path": "/nonexistent/cka.json"}, "not found"),
    ({"fusion": "mean"}, "fusion"),
])
def test_option_errors(options, message):
    recipe = recipe_from_dict({"output_dir": "x", "method": {"name": "hide", **options}})
    with pytest.raises(RecipeError, match=message):
        build_method(recipe)


def test_fixed_layers_override_a_recipe_written_for_auto(caplog):
    """`method.expand_layers=[-1]` on a recipe with CKA keys (recipes/synthcit/hide.yaml): the paper's layout runs,
    the CKA keys are dropped with a warning naming them."""
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "synthcit" / "hide.yaml", overrides=["method.expand_layers=[-1]"])
    with caplog.at_level("WARNING"):
        hide = build_method(recipe)
    assert hide.options.expand_layers == [-1] and hide.options.expand_threshold is None
    assert "expand_threshold" in caplog.text and "ignored" in caplog.text


def test_auto_measures_cka_in_run_between_the_experts(synthcit_root, tmp_path):
    model, hide, ctx = build(synthcit_root, "hide", expand_layers="auto", cka_samples=6)
    ctx.output_dir = tmp_path
    train_stage(model, hide, ctx, 0)
    assert hide.expand_layers(model) == [] and hide.expand_history == {}  # one expert: nothing to compare
    train_stage(model, hide, ctx, 1)
    chosen = hide.expand_history["2"]
    assert len(chosen) == 1 and chosen == hide.expand_layers(model)
    written = CKAResult.from_json((tmp_path / "analysis" / "hide-cka-stage-02.json").read_text())
    assert written.tasks == ["shape", "mc-color"] and written.n_samples == 12
    assert chosen == [min(written.layers, key=lambda k: (written.mean_cross_task[k], -k))]
    assert model.base_model.active_adapters == ["expert1"]  # the measurement left the stage's expert active
    assert hide.state()["cka_mean_cross_task"]


def test_train_on_fused_sees_what_inference_computes(synthcit_root):
    """With sum_ba, the newest expert trains under exactly the delta routed inference adds for its own task."""
    model, hide, ctx = build(synthcit_root, "hide", fusion="sum_ba", train_on_fused=True, router={"mode": "oracle"})
    train_stage(model, hide, ctx, 0)
    train_stage(model, hide, ctx, 1)
    assert not any(r.module._forward_hooks for r in lora_layers(model))  # training hooks gone after the task
    samples = ctx.data.test["mc-color"][:4]
    batch = batch_of(ctx, samples)
    handles = hide._fused_training_hooks(model, ["expert0"])  # the stage-2 training forward, rebuilt
    try:
        with torch.no_grad():
            training_view = model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        (context, indices), = list(hide.eval_groups(model, samples))
        with context:
            routed = model(**batch).logits
        alone = model(**batch).logits  # expert1 alone on the base: what train_on_fused=False would have trained
    torch.testing.assert_close(routed, training_view, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(alone, training_view, atol=1e-3)


@pytest.mark.slow
def test_runner_end_to_end(synthcit_root, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", synthcit_root, method={"name": "hide", "lora": {"r": 4, "alpha": 8}},
                        train={"batch_size": 16, "lr": 1e-3, "max_steps": 2, "save_steps": 0, "max_length": 160},
                        benchmark={"card": "synthcit-mini", "root": str(synthcit_root), "tasks": ["shape", "mc-color"],
                                   "max_train": 32, "max_test": 8})
    out = ContinualRunner(load_recipe(path)).run().parent
    results = json.loads((out / "results.json").read_text())
    assert results["router"]["accuracy"][0] is None and results["router"]["accuracy"][2] == 100.0
    stages = sorted((out / "checkpoints").glob("stage-*"))
    state = json.loads((stages[-1] / "method.json").read_text())["state"]
    assert state["expand_layers"] == [3] and state["expert_tasks"] == {"expert0": ["shape"],
                                                                       "expert1": ["mc-color"]}
    first, last = load_file(stages[0] / "model.safetensors"), load_file(stages[1] / "model.safetensors")
    expert0 = [k for k in first if ".expert0." in k]
    assert expert0 and all(torch.equal(first[k], last[k]) for k in expert0)
    routes = {json.loads(line)["route"] for line in (out / "predictions" / "stage-02" / "shape.jsonl").open()}
    assert routes == {"expert0:shape"}
    assert (load_file(stages[1] / "method.safetensors")["router.text_count"] > 0).all()
