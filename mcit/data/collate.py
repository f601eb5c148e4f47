"""From `Sample`s to model batches: chat template, label masking, image tokens, length-grouped batching.

The processor's chat template renders the conversation; labels are kept only on assistant replies (and the end of turn
token that closes them), found by character spans of the rendered text and mapped to tokens with the fast tokenizer's
offsets. That works for any chat template whose rendering of a conversation prefix is a prefix of the rendering of the
whole conversation, which holds for LLaVA-1.5's and Qwen2-VL's templates.

The text is the model's own prompt format, as its processor builds it at inference: the special tokens the tokenizer
puts first (LLaMA's BOS; read from the tokenizer, never assumed per family) start every sequence, and every answer ends
with the tokenizer's EOS, labelled, so the model learns to stop. llava-hf/llava-1.5-7b-hf's template writes no EOS
(it ends a turn with a space); there the space becomes EOS, which gives LLaVA-1.5's training text
"<s>USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ...". A template that closes turns with EOS itself (the tiny base's,
Qwen2-VL's <|im_end|>) gets nothing added.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from mcit.config import BenchmarkConfig, Recipe
from mcit.data.images import decode_image
from mcit.data.records import IMAGE_PREFIX, IMAGE_TOKEN, Sample
from mcit.errors import DataError, RecipeError

IGNORE_INDEX = -100
TEXT_TOKENS = 512
"""Text tokens per sample on top of the image placeholders when `train.max_length` is not set."""
MIB = 2**20


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


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when it adds its special tokens (LLaMA: [BOS]; Qwen2: none).

    Read from the tokenizer itself: `tokenizer("x")` against `tokenizer("x", add_special_tokens=False)`. What it
    appends is left out on purpose: a generation prompt must not end with EOS; the Encoder closes answers itself.
    """
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    raise DataError(f"tokenizer {type(tokenizer).__name__}: tokenizing with special tokens changes the text's own "
                    f"tokens ({full} vs {plain} for 'x'); cannot tell which special tokens it adds")


class Encoder:
    """Tokenizes samples in the model's prompt format (module docstring); shared by training and evaluation.

    `encode` (training) and `prompt_ids` (generation, candidate ranking) build the same text, so the generation
    prompt of a sample's last turn is a token prefix of its encoded conversation.
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError("label masking needs a fast tokenizer (offset mapping); this tokenizer is "
                            f"{type(self.tokenizer).__name__}")
        self.image_tokens = image_seq_length(processor)
        self.max_length = max_length if max_length is not None else self.image_tokens + TEXT_TOKENS
        if self.max_length < self.image_tokens + 16:
            raise DataError(f"train.max_length {self.max_length} leaves no room for text after the model's "
                            f"{self.image_tokens} image tokens; raise it or leave it unset (default: image tokens + "
                            f"{TEXT_TOKENS})")
        self.image_token = getattr(processor, "image_token", IMAGE_TOKEN)
        self.eos_token = self.tokenizer.eos_token
        if self.eos_token is None or \
                self.tokenizer(self.eos_token, add_special_tokens=False)["input_ids"] != [self.tokenizer.eos_token_id]:
            raise DataError(f"tokenizer {type(self.tokenizer).__name__}: eos_token {self.eos_token!r} is not one "
                            "special token in text; answers need an EOS to end with (set the tokenizer's eos_token)")
        self.prefix_ids = special_prefix(self.tokenizer)
        self.prefix_text = "".join(self.tokenizer.convert_ids_to_tokens(self.prefix_ids))

    def _render(self, messages: list[dict], generation_prompt: bool, expand: bool = True) -> str:
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return text.replace(self.image_token, self.image_token * self.image_tokens) if expand else text

    def _conversation(self, sample: Sample, with_answer: bool, expand: bool = True) -> tuple[str, list[tuple[int, int]]]:
        """The text of the whole conversation (`with_answer`) or of the prompt for its last answer, every answer in it
        closed by EOS, and each answer's character span (from the end of the generation prompt through its EOS)."""
        turns, last = sample.turns, len(sample.turns) - 1
        final = self._render(_messages(turns, last, with_answer), not with_answer, expand)
        text, spans, cursor = "", [], 0
        for turn in range(last + 1 if with_answer else last):
            asked = self._render(_messages(turns, turn, with_answer=False), True, expand)
            answered = self._render(_messages(turns, turn, with_answer=True), False, expand)
            if not (answered.startswith(asked) and final.startswith(answered)):
                raise DataError(f"sample {sample.id!r}: the chat template does not render the start of a conversation "
                                "as a prefix of the whole; answers cannot be located for label masking")
            start, end = len(asked), len(answered)
            reply = final[start:end]
            if self.eos_token not in reply:  # the template ends the turn without EOS (LLaVA-1.5: a space)
                reply = reply.rstrip() + self.eos_token
            text += final[cursor:start]
            spans.append((len(text), len(text) + len(reply)))
            text += reply
            cursor = end
        return text + final[cursor:], spans

    def _prefix(self, text: str) -> list[int]:
        # a template that writes BOS itself gets no second one (the processor's apply_chat_template does the same)
        return [] if self.prefix_text and text.startswith(self.prefix_text) else list(self.prefix_ids)

    def prompt(self, sample: Sample) -> str:
        """The rendered prompt for generation: all turns but the last answer (each closed by EOS), plus the assistant
        prefix; image placeholders expanded, without the special tokens the tokenizer puts first."""
        return self._conversation(sample, with_answer=False)[0]

    def prompt_ids(self, sample: Sample) -> list[int]:
        """What the processor gives for `prompt(sample)`'s text at inference: BOS where the tokenizer adds one."""
        text = self.prompt(sample)
        return self._prefix(text) + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def readable(self, sample: Sample) -> tuple[str, str]:
        """(the training text, the generation prompt) of `sample` for people: the tokenizer's leading special tokens
        spelled out, one placeholder per image."""
        texts = [self._conversation(sample, with_answer, expand=False)[0] for with_answer in (True, False)]
        full, prompt = [(self.prefix_text if self._prefix(text) else "") + text for text in texts]
        return full, prompt

    def encode(self, sample: Sample, index: int = 0) -> Encoded:
        if not sample.turns:
            raise DataError(f"sample {sample.id!r} of task {sample.task!r} has no conversation turns")
        full, spans = self._conversation(sample, with_answer=True)
        encoding = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        for j, (begin, finish) in enumerate(offsets):
            if finish > begin and any(s <= begin < e for s, e in spans):
                labels[j] = ids[j]
        prefix = self._prefix(full)
        ids, labels = prefix + ids, [IGNORE_INDEX] * len(prefix) + labels
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
    """Preprocessed pixel tensors by image path, least recently used first out once `max_bytes` is reached.

    Keeping pixels removes the image processor from later epochs and evaluation rows; bounding them keeps host memory
    flat at LLaVA-1.5 scale (a 336-px image is 1.3 MiB of fp32 pixels, so 40k images would hold ~50 GiB). Bytes are
    those of the tensors held; an image larger than the whole budget is processed but not kept; `max_bytes=0` keeps
    nothing (callers that see each image once). `max_bytes=None` is the recipe default, `benchmark.image_cache_mb`.
    A cached image returns the same values as a fresh preprocessing. `decode` turns a path into an RGB image
    (default: `decode_image`, which refuses bombs and unreadable files).
    """

    def __init__(self, processor, max_bytes: int | None = None, *,
                 decode: Callable[[str], Image.Image] = decode_image, pad_to_square: bool = False):
        if max_bytes is None:
            max_bytes = BenchmarkConfig.image_cache_mb * MIB
        if max_bytes < 0:
            raise RecipeError(f"benchmark.image_cache_mb: the image cache budget must be >= 0, got {max_bytes} bytes")
        self.processor = processor
        self.max_bytes = int(max_bytes)
        self.decode = decode
        self.pad_to_square = pad_to_square
        """Paste each image in the centre of a square filled with the processor's mean colour before preprocessing
        (LLaVA-1.5's `image_aspect_ratio: pad`), so nothing is cropped away (`benchmark.pad_to_square`)."""
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes_used = 0
        """Bytes of the pixel tensors held now (each held tensor owns its storage: see `_keep`)."""
        self.hits = 0
        """Distinct paths of a call found in the cache (a path repeated within one call counts once)."""
        self.misses = 0
        """Distinct paths of a call preprocessed."""
        self.evictions = 0

    @classmethod
    def from_recipe(cls, processor, recipe: Recipe) -> PixelCache:
        """The cache of a run: `benchmark.image_cache_mb` MiB."""
        return cls(processor, recipe.benchmark.image_cache_mb * MIB, pad_to_square=recipe.benchmark.pad_to_square)

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, path: str) -> bool:
        return path in self._cache

    def paths(self) -> list[str]:
        """The paths held, least recently used first (the next to be evicted)."""
        return list(self._cache)

    def held_bytes(self) -> int:
        """Bytes of the storages behind the tensors held, measured rather than counted (checks `bytes_used`)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._cache.values()}
        return sum(storages.values())

    def __call__(self, paths: Sequence[str]) -> torch.Tensor:
        wanted = list(dict.fromkeys(paths))  # a path repeated in one call is processed once
        found: dict[str, torch.Tensor] = {}
        for path in wanted:
            if path in self._cache:
                self._cache.move_to_end(path)
                found[path] = self._cache[path]
        missing = [p for p in wanted if p not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            images = [self.decode(path) for path in missing]  # DataError for bombs and unreadable files
            if self.pad_to_square:
                images = [pad_to_square(image, self.processor) for image in images]
            pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            for path, tensor in zip(missing, pixels, strict=True):
                found[path] = tensor
                self._keep(path, tensor)
        return torch.stack([found[p] for p in paths])

    def _keep(self, path: str, tensor: torch.Tensor) -> None:
        size = tensor.nbytes
        if size > self.max_bytes:
            return
        while self.bytes_used + size > self.max_bytes:
            _, old = self._cache.popitem(last=False)
            self.bytes_used -= old.nbytes
            self.evictions += 1
        # A row of the processor's batch is a view that would keep the whole batch's storage alive: copy it.
        self._cache[path] = tensor.clone()
        self.bytes_used += size


def pad_to_square(image: Image.Image, processor) -> Image.Image:
    """`image` centred on a max(w, h) square of the processor's mean colour (LLaVA's expand2square)."""
    w, h = image.size
    if w == h:
        return image
    mean = getattr(getattr(processor, "image_processor", processor), "image_mean", None) or (0.5, 0.5, 0.5)
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), tuple(int(round(255 * m)) for m in mean[:3]))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


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
