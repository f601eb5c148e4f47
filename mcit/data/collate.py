"""From `Sample`s to model batches: chat template, label masking, image tokens, length-grouped batching.

The processor's chat template renders the conversation; labels are kept only on assistant replies (and the end of turn
token that closes them), found by character spans of the rendered text and mapped to tokens with the fast tokenizer's
offsets. That works for any chat template whose rendering of a conversation prefix is a prefix of the rendering of the
whole conversation, which holds for LLaVA-1.5's and Qwen2-VL's templates.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mcit.data.images import decode_image
from mcit.data.records import IMAGE_PREFIX, IMAGE_TOKEN, Sample
from mcit.errors import DataError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenized training example; `labels` is IGNORE_INDEX outside assistant replies."""

    input_ids: list[int]
    labels: list[int]
    image: str | None
    index: int

    def __len__(self) -> int:
        return len(self.input_ids)


def image_seq_length(processor) -> int:
    """Number of placeholder tokens one image expands to in the text (LLaVA: patches, minus CLS when dropped)."""
    value = getattr(processor, "num_image_tokens", None) or getattr(processor, "image_seq_length", None)
    if value:
        return int(value)
    image_processor = processor.image_processor
    size = image_processor.crop_size["height"] if getattr(image_processor, "do_center_crop", False) else \
        image_processor.size.get("height") or image_processor.size["shortest_edge"]
    count = (size // processor.patch_size) ** 2 + processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        count -= 1
    return count


def _messages(turns: Sequence[tuple[str, str]], upto: int, with_answer: bool) -> list[dict]:
    messages = []
    for i, (user, assistant) in enumerate(turns[:upto + 1]):
        content: list[dict] = []
        text = user
        if i == 0 and text.startswith(IMAGE_PREFIX):
            content.append({"type": "image"})
            text = text[len(IMAGE_PREFIX):]
        content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
        if i < upto or with_answer:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return messages


class Encoder:
    """Tokenizes samples with a processor's chat template; shared by training and evaluation."""

    def __init__(self, processor, max_length: int = 512):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError("label masking needs a fast tokenizer (offset mapping); this tokenizer is "
                            f"{type(self.tokenizer).__name__}")
        self.max_length = max_length
        self.image_tokens = image_seq_length(processor)
        self.image_token = getattr(processor, "image_token", IMAGE_TOKEN)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return text.replace(self.image_token, self.image_token * self.image_tokens)

    def prompt(self, sample: Sample) -> str:
        """The rendered prompt for generation: all turns but the last answer, plus the assistant prefix."""
        return self._render(_messages(sample.turns, len(sample.turns) - 1, with_answer=False), True)

    def prompt_ids(self, sample: Sample) -> list[int]:
        return self.tokenizer(self.prompt(sample), add_special_tokens=False)["input_ids"]

    def encode(self, sample: Sample, index: int = 0) -> Encoded:
        if not sample.turns:
            raise DataError(f"sample {sample.id!r} of task {sample.task!r} has no conversation turns")
        spans = []
        for turn in range(len(sample.turns)):
            start = len(self._render(_messages(sample.turns, turn, with_answer=False), True))
            end = len(self._render(_messages(sample.turns, turn, with_answer=True), False))
            spans.append((start, end))
        full = self._render(_messages(sample.turns, len(sample.turns) - 1, with_answer=True), False)
        encoding = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        for j, (begin, finish) in enumerate(offsets):
            if finish > begin and any(s <= begin < e for s, e in spans):
                labels[j] = ids[j]
        if len(ids) > self.max_length:
            image_end = max((j for j, t in enumerate(ids) if t == self._image_token_id), default=-1)
            if image_end >= self.max_length:
                raise DataError(f"sample {sample.id!r}: max_length {self.max_length} cuts through the image tokens")
            ids, labels = ids[:self.max_length], labels[:self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"sample {sample.id!r} of task {sample.task!r}: no answer tokens survive "
                            f"(empty answer or max_length {self.max_length} too small)")
        return Encoded(ids, labels, sample.image, index)

    @property
    def _image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)


class PixelCache:
    """Preprocessed pixel tensors by image path. Small images (SynthCIT) are kept after the first use, which
    removes the image processor from the training loop; large ones are processed per batch."""

    def __init__(self, processor, keep: bool = True):
        self.processor = processor
        self.keep = keep
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, paths: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(paths) if p not in self._cache]
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            images = []
            for path in missing:
                images.append(decode_image(path))  # DataError for bombs and unreadable files
            pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            fresh = dict(zip(missing, pixels, strict=True))
            if self.keep:
                self._cache.update(fresh)
        return torch.stack([self._cache.get(p, fresh.get(p)) for p in paths])


def collate(items: Sequence[Encoded], pad_id: int, pixels: PixelCache, padding_side: str = "right") -> dict:
    """Pad a list of encoded examples into a batch (right padding for training, left for generation)."""
    width = max(len(item) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item)
        where = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, where] = torch.tensor(item.input_ids)
        labels[row, where] = torch.tensor(item.labels)
        attention[row, where] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    images = [item.image for item in items if item.image]
    if images:
        batch["pixel_values"] = pixels(images)
    return batch


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, *, group: bool = True,
                           megabatch: int = 50, drop_last: bool = False) -> list[list[int]]:
    """Shuffled batches of indices; with `group`, each batch holds examples of similar length (less padding).

    Indices are shuffled, cut into megabatches of `megabatch * batch_size`, sorted by length inside each, and the
    resulting batches shuffled again, as in LLaVA's length-grouped sampler. Deterministic for a seed.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group:
        size = megabatch * batch_size
        order = [i for k in range(0, len(order), size)
                 for i in sorted(order[k:k + size], key=lambda j: -lengths[j])]
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group:
        rng.shuffle(batches)
    return batches


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches; every rank gets the same count (ZeRO collectives need equal step counts)."""
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epochs: int, *, group: bool = True,
                  rank: int = 0, world_size: int = 1) -> Iterator[list[int]]:
    """All batches of `epochs` passes, each pass reshuffled with its own seed."""
    for epoch in range(epochs):
        yield from shard_batches(length_grouped_batches(lengths, batch_size, seed * 1000 + epoch, group=group),
                                 rank, world_size)
