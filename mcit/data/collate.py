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
    """Number of placeholder tokens one image expands to in the text for a fixed-size family (LLaVA-1.5: patches,
    minus CLS when dropped); for families whose count varies with the image, the count of a 1024 px square image
    (`ImageTokens`)."""
    return ImageTokens(processor).reference_count


REFERENCE_SIZE = (1024, 1024)
"""The image size whose token count stands for "one image" where the count varies with the image (the default
`train.max_length`, the model card)."""
_PROBE_SIZES = ((96, 64), (64, 160))
"""Two images of different sizes and shapes: a processor that expands both alike expands every image alike."""


_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})


@dataclass(frozen=True)
class ProcessorProfile:
    """What a processor's own output says about its family, asked once with one blank image."""

    image_keys: frozenset[str] | None
    """The image inputs the model takes (what the processor returns besides the text's; an image processor's
    bookkeeping such as InternVL's `num_patches`, which the processor drops, is not among them); None: every tensor
    the image processor returns (an object holding only an image processor, as in tests and benchmarks)."""
    token_types: bool
    """The processor marks image tokens in `mm_token_type_ids` (Qwen2-VL's multimodal RoPE needs them)."""
    image_token_id: int


def processor_profile(processor) -> ProcessorProfile:
    if not callable(processor):  # only an image processor (no text side): pixels only, nothing to mark
        return ProcessorProfile(None, False, -1)
    cached = getattr(processor, "_mcit_profile", None)
    if cached is None:
        image_token = getattr(processor, "image_token", None) or IMAGE_TOKEN
        out = processor(text=[image_token], images=[Image.new("RGB", _PROBE_SIZES[0], (127, 127, 127))])
        cached = ProcessorProfile(frozenset(out) - _TEXT_KEYS, "mm_token_type_ids" in out,
                                  processor.tokenizer.convert_tokens_to_ids(image_token))
        processor._mcit_profile = cached
    return cached


def token_types(processor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """`mm_token_type_ids` (1 on image tokens) for a family whose processor gives them, else nothing."""
    profile = processor_profile(processor)
    if not profile.token_types:
        return {}
    return {"mm_token_type_ids": (input_ids == profile.image_token_id).long()}


class ImageTokens:
    """How the model's own processor turns one image into text tokens, for any family.

    The processor is asked once per image size: `processor(text=image_token, images=[blank image of that size])`.
    The ids it returns (its special prefix removed) are the image's text: LLaVA-1.5's 576 `<image>`, Qwen2-VL's
    `<|image_pad|>` x (grid / merge^2), InternVL's `<img>...</img>`, Idefics3's tiles with their row/column tokens. The
    Encoder puts that text where the chat template wrote the placeholder, so training and generation text are exactly
    what the processor builds at inference, and the count always matches the pixels the model gets. A processor
    that expands every image alike is asked once (`fixed`); otherwise the size is read from the image's header.
    """

    def __init__(self, processor, *, pad_to_square: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", None) or IMAGE_TOKEN
        self.pad_to_square = pad_to_square
        self._prefix = special_prefix(self.tokenizer)
        self._by_size: dict[tuple[int, int], tuple[str, int]] = {}
        first, second = (self.for_size(size) for size in _PROBE_SIZES)
        self.fixed: str | None = first[0] if first == second else None
        """The text of every image, when it does not depend on the image (else None)."""
        self.reference_count = first[1] if self.fixed is not None else self.for_size(REFERENCE_SIZE)[1]

    def for_size(self, size: tuple[int, int]) -> tuple[str, int]:
        """(text, number of tokens) of an image of `size` (width, height)."""
        if size not in self._by_size:
            blank = Image.new("RGB", size, (127, 127, 127))
            if self.pad_to_square:
                blank = pad_to_square(blank, self.processor)
            ids = list(self.processor(text=[self.image_token], images=[blank])["input_ids"][0])
            if ids[:len(self._prefix)] == self._prefix:
                ids = ids[len(self._prefix):]
            text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if self.tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
                raise DataError(f"{type(self.processor).__name__}: the text one image expands to does not tokenize "
                                f"back to the same ids; the image's tokens cannot be placed in a training text")
            self._by_size[size] = (text, len(ids))
        return self._by_size[size]

    def text(self, image: str) -> str:
        """The text the image at path `image` becomes."""
        if self.fixed is not None:
            return self.fixed
        with Image.open(image) as opened:  # the header only; the data were validated when loaded
            size = opened.size
        if self.pad_to_square:
            size = (max(size), max(size))
        return self.for_size(size)[0]

    def dummy(self) -> tuple[list[int], dict[str, torch.Tensor]]:
        """(token ids, model image inputs) of a small blank image: what a micro-batch without images carries under
        ZeRO-3 so every rank runs the vision tower (mcit.train.deepspeed.ensure_vision_forward)."""
        size = _PROBE_SIZES[0]
        text, _ = self.for_size(size)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        blank = Image.new("RGB", size, (127, 127, 127))
        return ids, image_inputs(self.processor, [pad_to_square(blank, self.processor) if self.pad_to_square
                                                  else blank])[0]


def image_inputs(processor, images: Sequence[Image.Image]) -> list[dict[str, torch.Tensor]]:
    """The model inputs of each image alone (`pixel_values` and whatever the family adds: `image_grid_thw`,
    `image_sizes`, `pixel_attention_mask`), each with the leading dimension the processor gives one image."""
    keys = processor_profile(processor).image_keys
    out = []
    for image in images:
        feature = processor.image_processor(images=[image], return_tensors="pt")
        out.append({key: value for key, value in feature.items()
                    if (keys is None or key in keys) and isinstance(value, torch.Tensor)})
    return out


def batch_image_inputs(per_image: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of image inputs from per-image ones: concatenated along dim 0 (LLaVA's images, Qwen2-VL's patch rows
    and grids, InternVL's tiles), or, where images have different numbers of tiles in dim 1 (OneVision's anyres
    patches, Idefics3's splits), zero-padded to the most tiles first; the models skip all-zero tiles or unpad them by
    `image_sizes`."""
    if not per_image:
        return {}
    batch = {}
    for key in per_image[0]:
        tensors = [inputs[key] for inputs in per_image]
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) > 1:
            if len({tuple(t.shape[2:]) for t in tensors}) > 1 or tensors[0].dim() < 3:
                raise DataError(f"image input {key!r}: shapes {sorted(shapes)} cannot be batched")
            most = max(t.shape[1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, most - t.shape[1])) for t in tensors]
        batch[key] = torch.cat(tensors, dim=0)
    return batch


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

    def __init__(self, processor, max_length: int | None = None, *, pad_to_square: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError("label masking needs a fast tokenizer (offset mapping); this tokenizer is "
                            f"{type(self.tokenizer).__name__}")
        self.images = ImageTokens(processor, pad_to_square=pad_to_square)
        self.image_tokens = self.images.reference_count
        """Tokens of one image (where it varies with the image: of a 1024 px square one)."""
        self.max_length = max_length if max_length is not None else self.image_tokens + TEXT_TOKENS
        if self.images.fixed is not None and self.max_length < self.image_tokens + 16:
            raise DataError(f"train.max_length {self.max_length} leaves no room for text after the model's "
                            f"{self.image_tokens} image tokens; raise it or leave it unset (default: image tokens + "
                            f"{TEXT_TOKENS})")
        self.image_token = self.images.image_token
        self.eos_token = self.tokenizer.eos_token
        if self.eos_token is None or \
                self.tokenizer(self.eos_token, add_special_tokens=False)["input_ids"] != [self.tokenizer.eos_token_id]:
            raise DataError(f"tokenizer {type(self.tokenizer).__name__}: eos_token {self.eos_token!r} is not one "
                            "special token in text; answers need an EOS to end with (set the tokenizer's eos_token)")
        self.prefix_ids = special_prefix(self.tokenizer)
        self.prefix_text = "".join(self.tokenizer.convert_ids_to_tokens(self.prefix_ids))

    @classmethod
    def from_recipe(cls, processor, recipe: Recipe) -> Encoder:
        """The Encoder of a run: `train.max_length`, and images padded to a square where `benchmark.pad_to_square`
        (their token count follows the padded size)."""
        return cls(processor, recipe.train.max_length, pad_to_square=recipe.benchmark.pad_to_square)

    def _render(self, messages: list[dict], generation_prompt: bool, image_text: str | None) -> str:
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return text.replace(self.image_token, image_text) if image_text is not None else text

    def _conversation(self, sample: Sample, with_answer: bool, expand: bool = True) -> tuple[str, list[tuple[int, int]]]:
        """The text of the whole conversation (`with_answer`) or of the prompt for its last answer, every answer in it
        closed by EOS, and each answer's character span (from the end of the generation prompt through its EOS)."""
        image_text = self.images.text(sample.image) if expand and sample.image else None
        turns, last = sample.turns, len(sample.turns) - 1
        final = self._render(_messages(turns, last, with_answer), not with_answer, image_text)
        text, spans, cursor = "", [], 0
        for turn in range(last + 1 if with_answer else last):
            asked = self._render(_messages(turns, turn, with_answer=False), True, image_text)
            answered = self._render(_messages(turns, turn, with_answer=True), False, image_text)
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
                 decode: Callable[[str], Image.Image] = decode_image, pad_to_square: bool = False,
                 features=None):
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
        self.features = features
        """The vision tower's features of these images (a `mcit.models.vision_cache.VisionFeatureCache`, which the
        evaluation workflows attach: `mcit.workflows.load.eval_pixels`), kept across checkpoints; None: off. Keyed by
        path like the pixels, so one feature cache belongs to one pixel cache (one processor and padding)."""
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
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
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for inputs in self._cache.values() for t in inputs.values()}
        return sum(storages.values())

    def __call__(self, paths: Sequence[str]) -> torch.Tensor:
        """The `pixel_values` of `paths`, batched (the router and thumbnails of fixed-size families)."""
        return self.inputs(paths)["pixel_values"]

    def inputs(self, paths: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's image inputs for `paths` in order, batched (`pixel_values` and the family's extras)."""
        wanted = list(dict.fromkeys(paths))  # a path repeated in one call is processed once
        found: dict[str, dict[str, torch.Tensor]] = {}
        for path in wanted:
            if path in self._cache:
                self._cache.move_to_end(path)
                found[path] = self._cache[path]
        missing = [p for p in wanted if p not in found]
        self.hits += len(found)
        self.misses += len(missing)
        images = [self.decode(path) for path in missing]  # DataError for bombs and unreadable files, before any work
        if self.pad_to_square:
            images = [pad_to_square(image, self.processor) for image in images]
        for path, inputs in zip(missing, image_inputs(self.processor, images), strict=True):
            found[path] = inputs
            self._keep(path, inputs)
        return batch_image_inputs([found[p] for p in paths])

    def _keep(self, path: str, inputs: dict[str, torch.Tensor]) -> None:
        size = sum(t.nbytes for t in inputs.values())
        if size > self.max_bytes:
            return
        while self.bytes_used + size > self.max_bytes:
            _, old = self._cache.popitem(last=False)
            self.bytes_used -= sum(t.nbytes for t in old.values())
            self.evictions += 1
        # A row of a processor's batch can be a view keeping a whole batch's storage alive: own copies only.
        self._cache[path] = {key: t.clone() for key, t in inputs.items()}
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
        batch.update(pixels.inputs(images))
    if pixels is not None:
        batch.update(token_types(pixels.processor, input_ids))
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
