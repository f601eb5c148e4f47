"""KeepLoRA: the per-matrix math, the hooked weight gradient, and two tasks on the tiny model — the update stays out of
the protected subspace, A is frozen and gradient-chosen, the basis grows to 99 % of the task gradient's energy, task 2
starts from the merged model, and a stage checkpoint rebuilds the same state."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed
import torch.multiprocessing
from safetensors.torch import load_file, save_file

from mcit.config import recipe_from_dict
from mcit.errors import RecipeError
from mcit.methods.base import build_method
from mcit.methods.keeplora import (
    _broadcast_rows,
    _reduce_to,
    captured_energy,
    evenly_spaced,
    extend_basis,
    gradient_init,
    project_out,
    task_gradients,
    weight_basis,
)
from mcit.runtime.precision import eval_mode
from tests.methods import harness

TASKS = ["shape", "mc-color"]
R = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """LAPACK's SVD slows down by 10-100x when its threads compete for busy cores; one thread keeps the file quick."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()


def _same_span(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖AᵀA − BᵀB‖ for matrices with orthonormal rows: 0 when they span the same subspace."""
    return float((a.T @ a - b.T @ b).norm())


# --- the math --------------------------------------------------------------------------------------------------------

def test_weight_basis_keeps_the_directions_below_the_energy_share():
    v = _orthonormal(4, 6, 0)
    u = _orthonormal(4, 5, 1).T
    s = torch.tensor([0.4, 0.3, 0.2, 0.1]).sqrt()  # energy shares 40 / 30 / 20 / 10 %
    w = u @ torch.diag(s) @ v
    assert weight_basis(w, 0.6).shape == (1, 6)  # 40 % < 60 %, 70 % is not
    basis = weight_basis(w, 0.75)
    assert basis.shape == (2, 6)
    assert _same_span(basis, v[:2]) < 1e-5
    assert weight_basis(w, 0.3).shape == (1, 6)  # at least one direction


def test_gradient_init_is_the_top_of_the_projected_gradient_and_never_inside_the_basis():
    g = torch.randn(12, 10, generator=torch.Generator().manual_seed(2))
    p = _orthonormal(3, 10, 3)
    a = gradient_init(g, p, 2)
    assert float((a @ p.T).norm()) < 1e-5
    _, _, vh = torch.linalg.svd(project_out(g, p), full_matrices=False)
    assert _same_span(a, vh[:2]) < 1e-4
    # a gradient of rank 1 outside P: the other rows come from the SVD's null space, which contains P
    outside = project_out(torch.randn(1, 10, generator=torch.Generator().manual_seed(4)), p)
    g_low = torch.randn(12, 3, generator=torch.Generator().manual_seed(5)) @ p + torch.randn(12, 1) @ outside
    a_low = gradient_init(g_low, p, 3)
    assert float((a_low @ p.T).norm()) < 1e-5
    lowrank = gradient_init(g, p, 2, solver="lowrank")
    assert lowrank.shape == (2, 10) and float((lowrank @ p.T).norm()) < 1e-5


def test_extend_basis_reaches_the_energy_keeps_old_rows_and_adds_no_more_than_needed():
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(20, 16, generator=gen) @ torch.diag(torch.logspace(0, -2, 16)) @ _orthonormal(16, 16, 7)
    p = _orthonormal(2, 16, 8)
    grown = extend_basis(g, p, 0.99)
    assert torch.equal(grown[:2], p)
    torch.testing.assert_close(grown @ grown.T, torch.eye(grown.shape[0]), atol=1e-5, rtol=0)
    assert captured_energy(g, grown) >= 0.99
    assert captured_energy(g, grown[:-1]) < 0.99  # the last direction added was needed
    assert captured_energy(g, p) < 0.99 < captured_energy(g, grown)
    inside = torch.randn(5, 2, generator=gen) @ p
    assert torch.equal(extend_basis(inside, p, 0.99), p)  # already held: nothing added
    assert torch.equal(extend_basis(torch.zeros(5, 16), p, 0.99), p)


def test_samples_are_evenly_spaced_like_the_reference():
    assert evenly_spaced(24, 0.2) == [0, 7, 15, 23]  # int(24 · 0.2) = 4 from the first to the last
    assert evenly_spaced(3, 0.2) == [0]
    assert evenly_spaced(0, 0.2) == []


def _recipe(**overrides):
    train = overrides.pop("train", {})
    return recipe_from_dict({"output_dir": "unused", "method": {"name": "keeplora", **overrides},
                             "train": train})


def test_zero3_and_bad_options_are_refused_in_one_line(tmp_path):
    for setting in ("zero3", "zero3_offload"):
        with pytest.raises(RecipeError, match="ZeRO-3 shards; use train.deepspeed=zero2"):
            build_method(_recipe(train={"deepspeed": setting}))
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(RecipeError, match="keeplora needs every adapted weight whole"):
        build_method(_recipe(train={"deepspeed": str(custom)}))
    assert build_method(_recipe(train={"deepspeed": "zero2"})).options.grad_energy == 0.99
    with pytest.raises(RecipeError, match="method.grad_energy"):
        build_method(_recipe(grad_energy=0.0))
    with pytest.raises(RecipeError, match="method.weight_energy"):
        build_method(_recipe(weight_energy=1.5))


def _two_rank_helpers(rank: int, folder: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        mine = torch.full((2, 3), float(rank + 1))
        _reduce_to(mine, owner=1)
        if rank == 1:
            assert torch.equal(mine, torch.full((2, 3), 3.0))  # 1 + 2 on the owner
        shared = _broadcast_rows(torch.arange(10.0).reshape(5, 2) if rank == 1 else None, owner=1, width=2)
        assert torch.equal(shared, torch.arange(10.0).reshape(5, 2))  # every rank gets the owner's rows
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_reduce_to_the_owner_and_share_its_result(tmp_path):
    torch.multiprocessing.spawn(_two_rank_helpers, args=(str(tmp_path),), nprocs=2, join=True)


# --- two tasks on the tiny model -------------------------------------------------------------------------------------

def _reference_gradients(model, method, ctx, task: int) -> dict[str, torch.Tensor]:
    """dL/dW by plain autograd (weights made trainable), averaged over the 20 % evenly spaced samples one at a time."""
    samples = ctx.data.train[ctx.data.names[task]]
    chosen = [samples[i] for i in torch.linspace(0, len(samples) - 1, int(len(samples) * 0.2)).long().tolist()]
    weights = {n: layer.get_base_layer().weight for n, layer in method._layers.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    total = {n: torch.zeros_like(w) for n, w in weights.items()}
    try:
        with eval_mode(model):
            for sample in chosen:
                loss = model(**harness.batch_of(ctx, [sample])).loss
                for n, g in zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True):
                    total[n] += g
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return {n: t / len(chosen) for n, t in total.items()}


def _snapshot(method, part: str) -> dict[str, torch.Tensor]:
    if part == "W":
        return {n: layer.get_base_layer().weight.detach().clone() for n, layer in method._layers.items()}
    return {n: getattr(layer, f"lora_{part}")["default"].weight.detach().clone() for n, layer in method._layers.items()}


def _train(model, method, ctx, stage: int, steps: int = 2) -> None:
    optimizer = torch.optim.AdamW([{**g, "lr": 5e-2} for g in method.param_groups(model, method.recipe.train)])
    model.train()
    for _, batch in zip(range(steps), harness.encode(ctx, method.train_samples(stage, [stage], ctx.data))):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def run(synthcit_root):
    """Two tasks as the runner drives them, with snapshots between the hooks."""
    model, method, ctx = harness.build(synthcit_root, "keeplora", tasks=TASKS, r=R)
    s = SimpleNamespace(model=model, method=method, ctx=ctx, W0=_snapshot(method, "W"))
    method.prepare(model, 0, [0])
    method.before_task(model, 0, [0], ctx.data)
    s.bases0 = {n: b.clone() for n, b in method.bases.items()}
    s.A0, s.grad0 = _snapshot(method, "A"), _reference_gradients(model, method, ctx, 0)
    first = next(iter(method._layers))
    batches = [harness.batch_of(ctx, [ctx.data.train[TASKS[0]][i]]) for i in evenly_spaced(24, 0.2)]
    s.hooked = task_gradients(model, {first: method._layers[first]}, batches)[first] / len(batches)
    s.requires_grad_A = [layer.lora_A["default"].weight.requires_grad for layer in method._layers.values()]
    _train(model, method, ctx, 0)
    s.A0_trained, s.B0 = _snapshot(method, "A"), _snapshot(method, "B")
    s.delta0 = {n: layer.get_delta_weight("default").detach().clone() for n, layer in method._layers.items()}
    method.after_task(model, 0, [0], ctx.data)
    s.W1, s.bases1 = _snapshot(method, "W"), {n: b.clone() for n, b in method.bases.items()}
    s.B_after_merge = _snapshot(method, "B")
    s.grad0_merged = _reference_gradients(model, method, ctx, 0)
    s.saved = ({k: v.detach().clone() for k, v in method.state_tensors(model).items()},  # written at this moment
               method.method_tensors(), json.loads(json.dumps(method.state())))
    method.prepare(model, 1, [1])
    method.before_task(model, 1, [1], ctx.data)
    s.W1_start, s.A1 = _snapshot(method, "W"), _snapshot(method, "A")
    s.grad1 = _reference_gradients(model, method, ctx, 1)
    _train(model, method, ctx, 1)
    s.delta1 = {n: layer.get_delta_weight("default").detach().clone() for n, layer in method._layers.items()}
    method.after_task(model, 1, [1], ctx.data)
    s.W2 = _snapshot(method, "W")
    return s


def test_the_hooked_gradient_is_the_weight_gradient(run):
    name = next(iter(run.method._layers))
    torch.testing.assert_close(run.hooked, run.grad0[name], atol=1e-6, rtol=1e-4)


def test_the_trained_update_leaves_the_protected_subspace_alone(run):
    for deltas, bases in ((run.delta0, run.bases0), (run.delta1, run.bases1)):
        for name, delta in deltas.items():
            assert float(delta.norm()) > 0, name  # B trained
            assert float((delta @ bases[name].T).norm()) < 1e-5 * float(delta.norm()), name


def test_a_is_frozen_and_spans_the_top_of_the_projected_gradient(run):
    assert not any(run.requires_grad_A)
    assert all(torch.equal(run.A0[n], run.A0_trained[n]) for n in run.A0)  # training moved B only
    assert all(float(b.abs().sum()) > 0 for b in run.B0.values())
    for a_by_layer, grad, bases in ((run.A0, run.grad0, run.bases0), (run.A1, run.grad1, run.bases1)):
        for name, a in a_by_layer.items():
            _, _, vh = torch.linalg.svd(project_out(grad[name], bases[name]), full_matrices=False)
            assert _same_span(a, vh[:R]) < 1e-3, name


def test_the_first_basis_is_the_weights_principal_subspace_below_60_percent(run):
    for name, basis in run.bases0.items():
        held = captured_energy(run.W0[name], basis)  # ‖W Pᵀ‖² / ‖W‖²: W's energy along the protected inputs
        assert 0 < held < 0.6, name
        torch.testing.assert_close(basis @ basis.T, torch.eye(basis.shape[0]), atol=1e-5, rtol=0)


def test_the_basis_grows_after_a_task_to_hold_99_percent_of_its_gradient(run):
    grew = 0
    for name, old in run.bases0.items():
        new = run.bases1[name]
        assert torch.equal(new[:old.shape[0]], old), name  # protected directions stay protected
        assert captured_energy(run.grad0_merged[name], new) >= 0.99, name
        grew += new.shape[0] - old.shape[0]
    assert grew > 0
    assert run.method.history[-1]["directions"] == sum(b.shape[0] for b in run.bases1.values())


def test_task_two_starts_from_the_merged_model(run):
    for name in run.W0:
        torch.testing.assert_close(run.W1[name], run.W0[name] + run.delta0[name])
        assert torch.equal(run.W1_start[name], run.W1[name])  # nothing resets the weights before task 2 trains
        torch.testing.assert_close(run.W2[name], run.W1[name] + run.delta1[name])
        assert float(run.B_after_merge[name].abs().sum()) == 0  # merged model = the whole model at inference


def test_a_stage_checkpoint_rebuilds_the_merged_model_and_the_bases(run, synthcit_root, tmp_path):
    tensors, basis_tensors, state = run.saved
    save_file(tensors, str(tmp_path / "model.safetensors"))
    save_file(basis_tensors, str(tmp_path / "method.safetensors"))
    model, method, ctx = harness.build(synthcit_root, "keeplora", tasks=TASKS, r=R)
    method.prepare(model, 0, [0])
    method.load_state(state, load_file(str(tmp_path / "method.safetensors")))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in load_file(str(tmp_path / "model.safetensors")).items():
            params[key].copy_(value)
    assert method.merged_tasks == 1
    assert all(torch.equal(_snapshot(method, "W")[n], run.W1[n]) for n in run.W1)
    assert all(torch.equal(method.bases[n], run.bases1[n]) for n in run.bases1)
    method.prepare(model, 1, [1])
    method.before_task(model, 1, [1], ctx.data)  # the resumed run chooses the same A for task 2
    for name, a in _snapshot(method, "A").items():
        torch.testing.assert_close(a, run.A1[name], atol=1e-5, rtol=0)
