"""`method.lora.dropout_masks: packed`: LoRA dropout with 16-bit lanes of 64-bit draws is the same inverted Bernoulli
dropout as `nn.Dropout` (rate, scale, gradient, evaluation identity), on every adapted projection of every LoRA method
that adds its adapters through `add_lora`, and seeded runs stay reproducible."""

from __future__ import annotations

import pytest
import torch

from mcit.config import recipe_from_dict
from mcit.errors import RecipeError
from mcit.methods.lora import PackedDropout, lora_layers
from tests.methods.harness import batch_of, build


def test_the_drop_rate_is_p_in_every_lane_and_survivors_are_scaled():
    torch.manual_seed(0)
    dropout = PackedDropout(0.05).train()
    out = dropout(torch.ones(4_000_000))
    dropped = out == 0
    # 4M draws: the standard error of the rate is 1.1e-4; a biased lane (e.g. a sign bit never set) is off by 0.05
    assert abs(dropped.float().mean().item() - 0.05) < 1e-3
    for lane in range(4):  # each 16-bit lane of the 64-bit words drops at the same rate
        assert abs(dropped.view(-1, 4)[:, lane].float().mean().item() - 0.05) < 2e-3
    kept = out[~dropped]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - dropout.p)))
    assert abs(dropout.p - 0.05) < 1 / 65536


def test_gradient_is_the_mask_times_the_scale_and_eval_is_the_identity():
    torch.manual_seed(0)
    dropout = PackedDropout(0.3).train()
    x = torch.randn(7, 33, 5, requires_grad=True)  # an element count that is not a multiple of 4
    out = dropout(x)
    out.sum().backward()
    mask = (out != 0).float()
    assert torch.allclose(x.grad, mask / (1 - dropout.p))
    assert torch.allclose(out, x.detach() * mask / (1 - dropout.p))
    assert 0.2 < 1 - mask.mean().item() < 0.4
    dropout.eval()
    assert dropout(x) is x
    assert PackedDropout(0.0).train()(x) is x


def test_masks_differ_between_calls_and_repeat_under_the_same_seed():
    dropout = PackedDropout(0.5).train()
    x = torch.ones(1000)
    torch.manual_seed(3)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(3)
    assert not torch.equal(first, second) and torch.equal(first, dropout(x))


@pytest.mark.parametrize("name", ["lora_ft", "disco"])
def test_every_adapted_projection_uses_packed_masks_and_trains(synthcit_root, name):
    model, method, ctx = build(synthcit_root, name, tasks=["shape", "count"],
                               lora={"r": 4, "alpha": 8, "dropout": 0.05, "dropout_masks": "packed"})
    method.prepare(model, 0, [0])
    layers = lora_layers(model)
    assert layers and all(isinstance(d, PackedDropout) for ref in layers for d in ref.module.lora_dropout.values())
    model.train()
    batch = batch_of(ctx, ctx.data.train["shape"][:4])
    torch.manual_seed(0)
    first = model(**batch).loss
    torch.manual_seed(0)
    assert torch.equal(first, model(**batch).loss)  # seeded: the same masks
    first.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_default_keeps_pytorch_dropout(synthcit_root):
    model, _, _ = build(synthcit_root, "lora_ft", tasks=["shape"], lora={"r": 4, "alpha": 8, "dropout": 0.05})
    assert all(type(d) is torch.nn.Dropout for ref in lora_layers(model) for d in ref.module.lora_dropout.values())


def test_an_unknown_mask_kind_is_refused_naming_the_key():
    with pytest.raises(RecipeError, match=r"method\.lora\.dropout_masks: expected bernoulli or packed, got 'fast'"):
        recipe_from_dict({"output_dir": "x", "method": {"name": "lora_ft", "lora": {"dropout_masks": "fast"}}})
