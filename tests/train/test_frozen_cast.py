"""Frozen fp32 linear weights held in the autocast dtype while training: bitwise the same step, restored after."""

from __future__ import annotations

import torch

from mcit.train.frozen_cast import FrozenLinearCast
from tests.methods.harness import batch_of, build


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_cast_step_is_bitwise_identical_and_restore_gives_back_the_fp32_tensors(synthcit_root):
    model, method, ctx = build(synthcit_root, "lora_ft", tasks=["shape"])
    model.train()
    batch = batch_of(ctx, ctx.data.train["shape"][:4])
    before = {k: (p.data, p.data.clone()) for k, p in model.named_parameters()}
    ref_loss, ref_grads = _loss_and_grads(model, batch)

    cast = FrozenLinearCast(model, torch.bfloat16)
    cast_names = {k for k, p in model.named_parameters() if any(p is w for w in cast._weights)}
    assert len(cast) > 0 and not any("lora_" in k for k in cast_names)
    assert any("vision_tower" in k for k in cast_names) and any("language_model" in k for k in cast_names)
    cast.apply()
    assert {k for k, p in model.named_parameters() if p.dtype == torch.bfloat16} == cast_names
    loss, grads = _loss_and_grads(model, batch)
    cast.restore()

    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    for k, p in model.named_parameters():
        original, copy = before[k]
        assert p.data is original or p.data.data_ptr() == original.data_ptr(), k
        assert p.dtype == torch.float32 and torch.equal(p.data, copy), k


def test_tied_and_trainable_weights_are_never_cast(synthcit_root):
    model, _, _ = build(synthcit_root, "lora_ft", tasks=["shape"])
    shared = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head.weight = shared  # tie them, as many LLMs do
    cast = FrozenLinearCast(model, torch.bfloat16)
    assert not any(w is shared for w in cast._weights)
    assert all(not w.requires_grad for w in cast._weights)
    assert len(FrozenLinearCast(model, None)) == 0
