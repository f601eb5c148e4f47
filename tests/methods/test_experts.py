"""Task experts on PEFT LoRA: the stacked per-sample mixture and the fused deltas compute what they claim, and routed
inference leaves PEFT's state as it found it."""

from __future__ import annotations

import pytest
import torch

from mcit.methods.experts import ExpertBank, fused_factors, stacked_factors
from mcit.methods.lora import lora_layers
from tests.methods.harness import batch_of, build, train_stage


@pytest.fixture(scope="module")
def three_experts(synthcit_root):
    model, method, ctx = build(synthcit_root, "hide")
    for stage in range(3):
        train_stage(model, method, ctx, stage)
    return model, method, ctx


def _layer_outputs(ref, x: torch.Tensor, adapters: list[str]) -> list[torch.Tensor]:
    """PEFT's own output of the layer with each adapter alone."""
    saved = ref.module.active_adapters
    outs = []
    for name in adapters:
        ref.module._active_adapter = [name]
        outs.append(ref.module(x))
    ref.module._active_adapter = saved
    return outs


def test_stacked_mixture_equals_weighted_sum_of_peft_adapters(three_experts):
    model, method, _ = three_experts
    experts = method.trained_experts()
    ref = lora_layers(model)[0]
    x = torch.randn(3, 5, ref.module.in_features, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4]])
    with torch.no_grad():
        base = ref.module.base_layer(x)
        singles = _layer_outputs(ref, x, experts)
        expected = base + sum(w[:, i, None, None] * (singles[i] - base) for i in range(3))
        got = base + stacked_factors(ref.module, experts).delta(x, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fusion_modes(three_experts):
    model, method, _ = three_experts
    experts = method.trained_experts()
    ref = lora_layers(model)[0]
    m = ref.module
    x = torch.randn(2, 4, m.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stacked = stacked_factors(m, experts)
        sum_ba = fused_factors(m, experts, "sum_ba").delta(x)
        torch.testing.assert_close(sum_ba, stacked.delta(x, torch.ones(2, 3)), rtol=1e-5, atol=1e-5)
        sum_a = sum(m.lora_A[e].weight for e in experts)
        sum_b = sum(m.lora_B[e].weight * m.scaling[e] for e in experts)
        reference = fused_factors(m, experts, "sum_b_sum_a").delta(x)
        torch.testing.assert_close(reference, x @ (sum_b @ sum_a).T, rtol=1e-5, atol=1e-5)
        # the reference's cross terms B_i A_j make it a different function once there are several experts
        assert not torch.allclose(reference, sum_ba, atol=1e-4)
        # one expert: every form is the same delta
        one = [experts[0]]
        single = _layer_outputs(ref, x, one)[0] - m.base_layer(x)
        for mode in ("sum_ba", "sum_b_sum_a"):
            torch.testing.assert_close(fused_factors(m, one, mode).delta(x), single, rtol=1e-5, atol=1e-5)


def test_dense_fusion_used_when_cheaper_and_equal(three_experts):
    model, method, _ = three_experts
    ref = lora_layers(model)[0]
    many = method.trained_experts() * 30  # rank 4 x 90 > what a dense 256x256 delta costs
    factors = fused_factors(ref.module, many, "sum_ba")
    assert factors.dense is not None
    x = torch.randn(1, 3, ref.module.in_features)
    a, b = stacked_factors(ref.module, many).a, stacked_factors(ref.module, many).b
    with torch.no_grad():
        torch.testing.assert_close(factors.delta(x), x @ (b @ a).T, rtol=1e-4, atol=1e-4)


def test_one_expert_fused_and_mixed_match_plain_peft(synthcit_root):
    model, method, ctx = build(synthcit_root, "hide", fusion="sum_b_sum_a")
    train_stage(model, method, ctx, 0)
    samples = ctx.data.test["shape"][:3] + ctx.data.test["mc-color"][:3]
    batch = batch_of(ctx, samples)
    with torch.no_grad():
        plain = model(**batch).logits  # PEFT path, expert0 active
        outs = []
        for context, indices in method.eval_groups(model, samples):
            assert indices == list(range(len(samples)))  # one expert: one group
            with context:
                outs.append(model(**batch).logits)
            bank = ExpertBank(model)
            with bank.routed(method.trained_experts(), None, fused_layers=set(range(4)), fusion="sum_ba"):
                outs.append(model(**batch).logits)
    for out in outs:
        torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)


def test_routed_context_restores_peft_state(three_experts):
    model, method, ctx = three_experts
    refs = lora_layers(model)
    before = [list(r.module.active_adapters) for r in refs]
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    samples = ctx.data.test["caption"][:2]
    for context, _ in method.eval_groups(model, samples):
        with context:
            assert all(r.module.active_adapters == ["__mcit_routed__"] for r in refs)
            model(**batch_of(ctx, samples))
    assert [list(r.module.active_adapters) for r in refs] == before
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(r.module._forward_hooks for r in refs)
