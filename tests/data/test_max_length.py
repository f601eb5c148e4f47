"""The token budget of a sample follows the model's image tokens: LLaVA-1.5 at 336 px spends 576 on the image, so a
fixed default of 512 would cut every image sample."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor

from mcit.data.collate import TEXT_TOKENS, Encoder
from mcit.errors import DataError
from mcit.models.tiny import resolve_builtin


@pytest.fixture(scope="module")
def llava_336_processor():
    """The tiny tokenizer and template behind LLaVA-1.5's image geometry (336 px, patch 14: 576 tokens)."""
    tiny = AutoProcessor.from_pretrained(resolve_builtin("builtin:tiny-llava"))
    image = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(image_processor=image, tokenizer=tiny.tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=tiny.chat_template)


def test_default_leaves_the_text_budget_after_the_image(llava_336_processor):
    encoder = Encoder(llava_336_processor)
    assert encoder.image_tokens == 576
    assert encoder.max_length == 576 + TEXT_TOKENS


def test_a_limit_inside_the_image_is_refused(llava_336_processor):
    with pytest.raises(DataError, match=r"train.max_length 512 .* 576 image tokens"):
        Encoder(llava_336_processor, 512)
    assert Encoder(llava_336_processor, 700).max_length == 700
