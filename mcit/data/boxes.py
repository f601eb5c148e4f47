"""Grounding boxes in the frame the model sees.

A box answer "[x1, y1, x2, y2]" is a position in some picture, and which picture matters: the same numbers name
different pixels in the full image normalised by its width and height (`image`), on LLaVA's padded square (`square`:
the image pasted in the centre of a max(w, h) square, each coordinate divided by that side), or in the centre square
that a resize-then-centre-crop processor keeps (`crop`: CLIP's default, which LLaVA-1.5's HF processor uses). A model
trained and scored with boxes in another frame than the pixels it is shown learns a distortion, and IoU then
measures the distortion. So the card declares the frame its release uses (`box_frame`), the run knows the frame its
preprocessing produces (`seen_frame`: `square` with `benchmark.pad_to_square`, else `crop` for a centre-cropping
processor, else `image`), and `align_box_answers` rewrites every box answer from one to the other. Boxes are kept
with 3 decimals, the precision of the released answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from mcit.data.records import Sample
from mcit.errors import DataError

BOX_FRAMES = ("image", "square", "crop")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE]-?\d+)?")


def seen_frame(processor, pad_to_square: bool) -> str:
    """The frame of the pixels a model gets from `processor` (a transformers processor or image processor)."""
    if pad_to_square:
        return "square"
    image_processor = getattr(processor, "image_processor", processor)
    if getattr(image_processor, "do_pad", False):
        return "square"
    return "crop" if getattr(image_processor, "do_center_crop", False) else "image"


def _to_pixels(box: Sequence[float], size: tuple[int, int], frame: str) -> list[float]:
    w, h = size
    if frame == "image":
        return [box[0] * w, box[1] * h, box[2] * w, box[3] * h]
    side = max(w, h) if frame == "square" else min(w, h)
    dx, dy = (w - side) / 2, (h - side) / 2  # negative on the short side of the padded square, positive for a crop
    return [box[0] * side + dx, box[1] * side + dy, box[2] * side + dx, box[3] * side + dy]


def _from_pixels(box: Sequence[float], size: tuple[int, int], frame: str) -> list[float]:
    w, h = size
    if frame == "image":
        out = [box[0] / w, box[1] / h, box[2] / w, box[3] / h]
    else:
        side = max(w, h) if frame == "square" else min(w, h)
        dx, dy = (w - side) / 2, (h - side) / 2
        out = [(box[0] - dx) / side, (box[1] - dy) / side, (box[2] - dx) / side, (box[3] - dy) / side]
    return [min(1.0, max(0.0, v)) for v in out]  # a crop cuts off what lies outside it


def convert_box(box: Sequence[float], size: tuple[int, int], source: str, target: str) -> list[float]:
    """`box` (normalised in frame `source`) of an image of `size` (w, h), normalised in frame `target`."""
    for frame in (source, target):
        if frame not in BOX_FRAMES:
            raise DataError(f"unknown box frame {frame!r}; choose one of {', '.join(BOX_FRAMES)}")
    if source == target:
        return list(box)
    return _from_pixels(_to_pixels(box, size, source), size, target)


def align_box_answers(samples: Sequence[Sample], source: str, target: str,
                      image_size: Callable[[Sample], tuple[int, int]]) -> int:
    """Rewrite the box answer of every sample (its last reply, where it is exactly one box of four numbers) from frame
    `source` to `target`, in place; returns how many were rewritten. `image_size(sample)` gives (w, h)."""
    if source == target:
        return 0
    changed = 0
    for sample in samples:
        user, reply = sample.turns[-1]
        numbers = _NUMBER.findall(reply)
        if len(numbers) != 4 or sample.image is None:
            continue
        box = convert_box([float(n) for n in numbers], image_size(sample), source, target)
        text = "[" + ", ".join(f"{v:.3f}" for v in box) + "]"
        sample.turns[-1] = (user, text)
        sample.meta.setdefault("box_original", reply)
        changed += 1
    return changed
