"""Batched greedy generation and candidate likelihoods: the two ways evaluation asks a model for an answer.

Both take prompts from `Encoder`, so evaluation sees exactly the tokens training saw. Batches are built here rather
than with `collate` because generation needs LEFT padding (every row's next token is at the same column) and the
position ids of a left-padded row must start at its first real token, as `model.generate` computes them from the
attention mask. Samples are sorted by prompt length so a batch carries little padding, and image and text-only samples
never share a batch (a LLaVA forward takes either pixel values for every image placeholder or none at all).
Candidate scoring runs each prompt once and its candidates on top of the prompt's KV cache in chunks of bounded size,
so its memory does not grow with the number of candidates.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
from transformers import DynamicCache

from mcit.data.collate import Encoder, PixelCache, token_types
from mcit.data.records import Sample
from mcit.errors import EvalError
from mcit.methods.experts.rows import follow_rows
from mcit.runtime.precision import autocast as autocast_for
from mcit.runtime.precision import eval_mode


@contextlib.contextmanager
def _inference(model) -> Iterator[None]:
    """eval() + inference_mode for the body; every submodule's train/eval flag is restored afterwards (a frozen
    vision tower may sit in eval mode inside a model that trains)."""
    with eval_mode(model), torch.inference_mode():
        yield


def _batches(samples: Sequence[Sample], lengths: Sequence[int], sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Indices sorted by (has image, length) and cut into batches whose summed `sizes` stay within `budget` (a batch
    holds at least one sample); a batch never mixes image and text-only samples."""
    order = sorted(range(len(samples)), key=lambda i: (samples[i].image is None, lengths[i]))
    batches: list[list[int]] = []
    used = 0
    for i in order:
        same_kind = batches and (samples[i].image is None) == (samples[batches[-1][0]].image is None)
        if same_kind and used + sizes[i] <= budget:
            batches[-1].append(i)
            used += sizes[i]
        else:
            batches.append([i])
            used = sizes[i]
    return batches


def _progress(batches: list[list[int]], description: str | None):
    if description is None:
        return batches
    from tqdm import tqdm

    return tqdm(batches, desc=description, unit="batch")


def _padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, side: str) -> dict[str, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        where = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[r, where] = torch.tensor(row, dtype=torch.long)
        attention[r, where] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}


def _images(samples: Sequence[Sample], batch: list[int], pixels: PixelCache, device: torch.device) -> dict:
    paths = [samples[i].image for i in batch]
    if paths[0] is None:
        return {}
    return {key: value.to(device) for key, value in pixels.inputs(paths).items()}


def _serving(model, samples: Sequence[Sample], batch: list[int], pixels: PixelCache):
    """The pixel cache's vision features serve the images of `batch` (one row of `pixel_values` each) while the
    model runs on it; nothing when the cache is off or the batch has no images."""
    features = getattr(pixels, "features", None)
    if features is None or samples[batch[0]].image is None:
        return contextlib.nullcontext()
    return features.serving(model, [samples[i].image for i in batch])


def _pad_id(encoder: Encoder) -> int:
    tokenizer = encoder.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise EvalError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token; set pad_token")
    return pad


def generate(model, encoder: Encoder, samples: Sequence[Sample], pixels: PixelCache, *, batch_size: int = 64,
             max_new_tokens: int = 48, autocast: torch.dtype | str | None = None, progress: str | None = None) -> list[str]:
    """Greedy answers (KV cache, stop at EOS or `max_new_tokens`), decoded without special tokens and stripped, in
    the order of `samples`.

    EOS comes from the model's generation config (chat models may list several end-of-turn ids there), falling back
    to the tokenizer's. Each answer is cut at its first EOS explicitly: an end-of-turn id need not be a special token
    that decoding drops, and finished rows are filled with padding after it. Batching does not change the answers:
    left padding plus mask-derived position ids make each row compute what it would alone, up to float rounding.
    """
    prompts = [encoder.prompt_ids(sample) for sample in samples]
    pad_id = _pad_id(encoder)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else encoder.tokenizer.eos_token_id
    stops = set(eos) if isinstance(eos, list | tuple) else {eos}
    device = next(model.parameters()).device
    answers = [""] * len(samples)
    batches = _batches(samples, [len(p) for p in prompts], [1] * len(samples), batch_size)
    with _inference(model):
        for batch in _progress(batches, progress):
            inputs = _padded([prompts[i] for i in batch], pad_id, device, "left")
            inputs.update(token_types(pixels.processor, inputs["input_ids"]))
            with autocast_for(autocast, device), _serving(model, samples, batch, pixels):
                out = model.generate(**inputs, **_images(samples, batch, pixels, device), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos)
            for i, row in zip(batch, out[:, inputs["input_ids"].shape[1]:].tolist(), strict=True):
                end = next((k for k, token in enumerate(row) if token in stops), len(row))
                answers[i] = encoder.tokenizer.decode(row[:end], skip_special_tokens=True).strip()
    return answers


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _split(encoder: Encoder, sample: Sample, candidates: Sequence[str],
           index: int) -> tuple[list[int], list[list[int]]]:
    """The shared context and each candidate's continuation tokens.

    A candidate is scored as training would tokenize it: the whole conversation is rendered with the candidate as the
    last answer (so the end-of-turn token follows), tokenized once, and the continuation is everything after the
    longest prefix shared with the generation prompt. Tokenizing the candidate alone would differ where sentencepiece
    merges across the prompt/answer boundary.
    """
    if not candidates:
        raise EvalError(f"sample {index} ({sample.id!r}): empty candidate list")
    if not sample.turns:
        raise EvalError(f"sample {index} ({sample.id!r}): no conversation turns to score candidates against")
    prompt = encoder.prompt_ids(sample)
    fulls = []
    for candidate in candidates:
        answered = dataclasses.replace(sample, turns=[*sample.turns[:-1], (sample.turns[-1][0], candidate)])
        ids = encoder.encode(answered).input_ids
        if len(ids) >= encoder.max_length:
            raise EvalError(f"sample {index} ({sample.id!r}), candidate {candidate!r}: prompt + answer reaches "
                            f"max_length {encoder.max_length}; raise train.max_length so the candidate is not cut")
        fulls.append(ids)
    shared = min(_common_prefix(prompt, ids) for ids in fulls)
    if shared == 0:
        raise EvalError(f"sample {index} ({sample.id!r}): the prompt shares no tokens with its answered conversation; "
                        "the chat template does not render the prompt as a prefix of the conversation")
    return prompt[:shared], [ids[shared:] for ids in fulls]


def candidate_logprobs(model, encoder: Encoder, samples: Sequence[Sample], candidates: Sequence[Sequence[str]],
                       pixels: PixelCache, *, batch_size: int = 64, chunk: int | None = None,
                       autocast: torch.dtype | str | None = None, progress: str | None = None) -> list[list[float]]:
    """Summed log-probability of each candidate answer (its tokens and the end-of-turn token) given the prompt.

    The prompt (image included) runs once per batch of samples, so K candidates cost one prompt pass, not K. Its KV
    cache is then shared by the candidates, which run on top of it at most `chunk` rows (sample x candidate pairs)
    at a time: each chunk gets a fresh cache holding copies of the prompt rows it continues, and drops it before the
    next, so memory grows with `chunk`, not with the number of candidates (1000 ImageNet classes on a 7B model would
    otherwise copy a 600-token prompt cache 1000 times). `batch_size` counts sample x candidate pairs: samples are
    batched until their candidates reach it (a sample with more runs alone); `chunk` defaults to `batch_size`.
    Scores do not depend on `batch_size` or `chunk`, up to float rounding.
    """
    if len(candidates) != len(samples):
        raise EvalError(f"candidate_logprobs: {len(samples)} samples but {len(candidates)} candidate lists")
    chunk = batch_size if chunk is None else chunk
    if chunk < 1:
        raise EvalError(f"candidate_logprobs: chunk (default: batch_size) must be at least 1 candidate row, got {chunk}")
    split = [_split(encoder, s, c, i) for i, (s, c) in enumerate(zip(samples, candidates))]
    pad_id = _pad_id(encoder)
    device = next(model.parameters()).device
    scores: list[list[float]] = [[0.0] * len(c) for c in candidates]
    batches = _batches(samples, [len(context) for context, _ in split], [len(c) for c in candidates], batch_size)
    with _inference(model), autocast_for(autocast, device):
        for batch in _progress(batches, progress):
            inputs = _padded([split[i][0] for i in batch], pad_id, device, "left")
            inputs.update(_images(samples, batch, pixels, device))
            inputs.update(token_types(pixels.processor, inputs["input_ids"]))
            with _serving(model, samples, batch, pixels):
                prompt = _run_prompt(model, inputs)
            # (prompt row, candidate) pairs, shortest continuation first, so a chunk carries little padding
            pairs = sorted(((r, k) for r, i in enumerate(batch) for k in range(len(split[i][1]))),
                           key=lambda pair: len(split[batch[pair[0]]][1][pair[1]]))
            for start in range(0, len(pairs), chunk):
                part = pairs[start:start + chunk]
                answers = _padded([split[batch[r]][1][k] for r, k in part], pad_id, device, "right")
                rows = torch.tensor([r for r, _ in part], device=device)
                values = _continuation_logprobs(model, prompt, answers, rows).tolist()
                for (r, k), value in zip(part, values, strict=True):
                    scores[batch[r]][k] = value
    return scores


@dataclasses.dataclass
class _Prompt:
    """A batch of left-padded prompts after their forward pass: what every chunk of candidates on top of it needs."""

    cache: DynamicCache
    """Keys and values of every prompt row; chunks read it and never append to it."""
    mask: torch.Tensor
    """The prompts' attention mask (rows x prompt width)."""
    next_position: torch.Tensor
    """Each row's position id for the first token after its prompt."""
    first_logprobs: torch.Tensor
    """Log-probabilities (rows x vocabulary, fp32) of the first token after each prompt."""


def _run_prompt(model, inputs: dict) -> _Prompt:
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate derives, so left padding shifts nothing
    following = positions[:, -1:] + 1
    if "mm_token_type_ids" in inputs and "image_grid_thw" in inputs:
        # multimodal RoPE (Qwen2-VL): image tokens get 2-D positions and the text after an image continues from the
        # largest; the model's own index gives the prompt's, the candidates continue as text (one position per token)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        positions, _ = base.model.get_rope_index(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                                 attention_mask=mask, mm_token_type_ids=inputs["mm_token_type_ids"])
        following = positions[:, :, -1].amax(dim=0)[:, None] + 1
    out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    if not isinstance(out.cache, DynamicCache):
        raise EvalError(f"candidate scoring needs the prompt pass to return a DynamicCache, got "
                        f"{type(out.cache).__name__}")
    return _Prompt(out.cache, mask, following, out.logits[:, -1].float().log_softmax(-1))


def _cache_rows(cache: DynamicCache, rows: torch.Tensor) -> DynamicCache:
    """A new cache holding copies of `rows` of `cache` (a row may repeat): a forward on it appends to the copies,
    so `cache` stays the prompt's alone. Routing weights riding on the prompt cache follow the rows."""
    def select(states: torch.Tensor | None) -> torch.Tensor | None:
        # (None: a layer that caches nothing; layers may sit on different devices when a model is split)
        return None if states is None else states.index_select(0, rows.to(states.device))

    # a generator: the cache is filled layer by layer, so at most one layer's selection is held twice
    rows_cache = DynamicCache((select(keys), select(values), sliding) for keys, values, sliding in cache)
    follow_rows(cache, rows_cache, rows)
    return rows_cache


def _continuation_logprobs(model, prompt: _Prompt, answers: dict, rows: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the right-padded `answers` after the prompt rows they index (`rows`)."""
    tokens, valid = answers["input_ids"], answers["attention_mask"]
    total = prompt.first_logprobs[rows].gather(1, tokens[:, :1]).squeeze(1)
    if tokens.shape[1] > 1:
        steps = torch.arange(tokens.shape[1] - 1, device=tokens.device)
        logits = model(input_ids=tokens[:, :-1], attention_mask=torch.cat([prompt.mask[rows], valid[:, :-1]], dim=1),
                       position_ids=prompt.next_position[rows] + steps, cache=_cache_rows(prompt.cache, rows),
                       use_cache=False).logits
        picked = logits.float().log_softmax(-1).gather(2, tokens[:, 1:, None]).squeeze(2)
        total = total + (picked * valid[:, 1:]).sum(1)
    return total


def constrained_predictions(logprobs: Sequence[Sequence[float]], candidates: Sequence[Sequence[str]]) -> list[str]:
    """The most likely candidate per sample; ties go to the earliest candidate in the list."""
    if len(logprobs) != len(candidates):
        raise EvalError(f"constrained_predictions: {len(logprobs)} score lists but {len(candidates)} candidate lists")
    picks = []
    for index, (scores, cands) in enumerate(zip(logprobs, candidates)):
        if len(scores) != len(cands) or not cands:
            raise EvalError(f"sample {index}: {len(scores)} scores for {len(cands)} candidates")
        picks.append(cands[max(range(len(cands)), key=lambda k: (scores[k], -k))])
    return picks
