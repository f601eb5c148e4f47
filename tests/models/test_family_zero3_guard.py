"""The ZeRO-3 guard for every family: a micro-batch without images gets the family's own inert image (its tokens as
the processor expands a blank image, its image inputs), and the loss and every gradient stay those of the text-only
batch while the vision tower and projector run (so every rank joins their all-gathers)."""

from __future__ import annotations

import pytest
import torch

from mcit.config import ModelConfig
from mcit.data.collate import Encoder, PixelCache, collate
from mcit.data.records import Sample
from mcit.models.families import family_of
from mcit.models.loading import load_base
from mcit.models.tiny_families import FAMILY_BUILDERS, create_family_init
from mcit.train import deepspeed as ds


@pytest.mark.parametrize("model_type", ["llava", *FAMILY_BUILDERS])
def test_the_inert_image_changes_no_loss_and_no_gradient(model_type, tmp_path):
    name = "builtin:tiny-llava" if model_type == "llava" else str(create_family_init(model_type, tmp_path / "m"))
    model, processor = load_base(ModelConfig(name_or_path=name))
    model.requires_grad_(True)
    encoder = Encoder(processor)
    texts = [Sample("a", "t", None, [("How many shapes?", "three")]), Sample("b", "t", None, [("Colour?", "red")])]
    batch = collate([encoder.encode(s, i) for i, s in enumerate(texts)], processor.tokenizer.pad_token_id,
                    PixelCache(processor))
    assert "pixel_values" not in batch
    ids, inputs = encoder.images.dummy()
    guarded = ds.ensure_vision_forward(batch, image_ids=ids, image_inputs=inputs, pad_token_id=0,
                                       image_token_id=processor.tokenizer.convert_tokens_to_ids(encoder.image_token))
    family = family_of(model)
    vision = {n for n, _ in model.named_parameters() if family.contains(n, "vision_tower")
              or family.contains(n, "projector")}
    grads = []
    for inputs_ in (batch, guarded):
        model.zero_grad(set_to_none=True)
        loss = model(**inputs_).loss
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain), (guarded_loss, guard) = grads
    assert guarded_loss == pytest.approx(plain_loss, abs=1e-5)
    for name_, grad in plain.items():
        torch.testing.assert_close(guard[name_], grad, atol=1e-5, rtol=1e-4)  # a longer row: other float rounding
    reached = {n for n in guard if n in vision}
    assert reached, "the inert image did not run the vision tower"
    assert all(float(guard[n].abs().max()) == 0.0 for n in reached)
