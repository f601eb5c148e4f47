"""Box answers follow the pixels: padding to a square and the centre crop move every box, and the rewrite must land
exactly where the drawn object lands in the preprocessed picture."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from transformers import AutoProcessor

from mcit.data.boxes import align_box_answers, convert_box, seen_frame
from mcit.data.collate import PixelCache, pad_to_square
from mcit.data.records import Sample
from mcit.errors import DataError


class _Processor:
    def __init__(self, **attrs):
        self.image_processor = type("ImageProcessor", (), attrs)()


def _drawn(size, box_px):
    image = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(image).rectangle([box_px[0], box_px[1], box_px[2] - 1, box_px[3] - 1], fill=(255, 255, 255))
    return image


def _white_box(image):
    """The white rectangle's box, normalised by the picture's width and height."""
    left, top, right, bottom = image.convert("L").point(lambda v: 255 if v > 200 else 0).getbbox()
    return [left / image.width, top / image.height, right / image.width, bottom / image.height]


@pytest.mark.parametrize("size", [(40, 20), (20, 40), (30, 30)])
def test_the_square_frame_is_where_padding_puts_the_object(size):
    box_px = (size[0] // 4, size[1] // 5, size[0] // 2, size[1] - 2)
    image = _drawn(size, box_px)
    in_image = [box_px[0] / size[0], box_px[1] / size[1], box_px[2] / size[0], box_px[3] / size[1]]
    padded = pad_to_square(image, _Processor(image_mean=[0.0, 0.0, 0.0]))
    assert padded.width == padded.height == max(size)
    assert convert_box(in_image, size, "image", "square") == pytest.approx(_white_box(padded), abs=1 / max(size))


def test_the_crop_frame_is_where_a_centre_crop_puts_the_object():
    size = (40, 20)
    box_px = (14, 4, 26, 16)  # inside the central 20x20 square
    in_image = [box_px[0] / 40, box_px[1] / 20, box_px[2] / 40, box_px[3] / 20]
    crop = _drawn(size, box_px).crop((10, 0, 30, 20))
    assert convert_box(in_image, size, "image", "crop") == pytest.approx(_white_box(crop), abs=1 / 20)
    # what lies outside the crop is cut off at its edge
    assert convert_box([0.0, 0.0, 1.0, 1.0], size, "image", "crop") == [0.0, 0.0, 1.0, 1.0]


@settings(max_examples=60, deadline=None)
@given(w=st.integers(4, 2000), h=st.integers(4, 2000), x=st.floats(0, 0.5), y=st.floats(0, 0.5),
       bw=st.floats(0.01, 0.5), bh=st.floats(0.01, 0.5))
def test_image_and_square_frames_convert_both_ways_without_loss(w, h, x, y, bw, bh):
    box = [x, y, x + bw, y + bh]
    there = convert_box(box, (w, h), "image", "square")
    assert convert_box(there, (w, h), "square", "image") == pytest.approx(box, abs=1e-9)
    assert all(0.0 <= v <= 1.0 for v in there)


def test_unknown_frame_is_refused():
    with pytest.raises(DataError, match="unknown box frame 'padded'"):
        convert_box([0, 0, 1, 1], (4, 4), "padded", "image")


def test_seen_frame_follows_the_preprocessing():
    assert seen_frame(_Processor(do_center_crop=True), pad_to_square=False) == "crop"  # CLIP, LLaVA-1.5-hf
    assert seen_frame(_Processor(do_center_crop=True), pad_to_square=True) == "square"
    assert seen_frame(_Processor(do_pad=True), pad_to_square=False) == "square"  # LlavaImageProcessor(do_pad=True)
    assert seen_frame(_Processor(), pad_to_square=False) == "image"  # resize only (Qwen2-VL-like)


def test_align_rewrites_box_answers_and_keeps_the_original():
    samples = [Sample(id="g0", task="Grounding", image="/x.jpg", turns=[("<image>\nwhere?", "[0.1, 0.2, 0.5, 0.9]")]),
               Sample(id="g1", task="Grounding", image="/y.jpg", turns=[("<image>\nwhich?", "B")])]
    assert align_box_answers(samples, "square", "image", lambda s: (12, 8)) == 1
    assert samples[0].answer == "[0.100, 0.050, 0.500, 1.000]"
    assert samples[0].meta["box_original"] == "[0.1, 0.2, 0.5, 0.9]" and samples[1].answer == "B"


def test_pixel_cache_pads_before_the_processor(tmp_path):
    processor = AutoProcessor.from_pretrained(Path(__file__).resolve().parents[2] / "mcit" / "assets" / "tiny-llava")
    path = tmp_path / "wide.png"
    _drawn((60, 20), (40, 5, 58, 15)).save(path)
    padded = PixelCache(processor, 0, pad_to_square=True)([str(path)])[0]
    cropped = PixelCache(processor, 0)([str(path)])[0]
    image = Image.open(path).convert("RGB")
    expected = processor.image_processor(images=[pad_to_square(image, processor)], return_tensors="pt")
    assert padded.equal(expected["pixel_values"][0])
    assert not padded.equal(cropped)  # the centre crop drops the object at the right edge; padding keeps it
