"""Batched generation and candidate likelihoods on the random-init tiny LLaVA and a small SynthCIT."""

from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mcit.data.collate import Encoder, PixelCache, collate
from mcit.data.formats import load_split
from mcit.data.records import Sample
from mcit.errors import EvalError
from mcit.evaluation.generate import candidate_logprobs, constrained_predictions, generate
from mcit.models.tiny import create_init

SHORT = Sample("short", "text", None, [("Hi?", "")])
LONG = Sample("long", "text", None, [
    ("Describe a scene with three shapes of different colours in a grid.", "a red circle is at the top left."),
    ("Now list every colour you used, then every shape, then say where each one is.", ""),
])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, synthcit_root):
    path = create_init(tmp_path_factory.mktemp("generate") / "tiny-init", seed=0)
    processor = AutoProcessor.from_pretrained(path)
    samples = []
    for task, count in (("shape", 2), ("mc-color", 2), ("caption", 2)):
        samples += load_split(synthcit_root / task / "test.json", image_root=synthcit_root, task=task)[:count]
    return SimpleNamespace(path=path, model=LlavaForConditionalGeneration.from_pretrained(path),
                           encoder=Encoder(processor, max_length=256), pixels=PixelCache(processor),
                           tokenizer=processor.tokenizer, samples=[*samples, SHORT, LONG])


@contextlib.contextmanager
def spy_generate(model):
    """Record every model.generate call's inputs and output ids."""
    calls = []
    original = model.generate

    def spy(**kwargs):
        out = original(**kwargs)
        calls.append((kwargs, out))
        return out

    model.generate = spy
    try:
        yield calls
    finally:
        del model.generate


def new_tokens(calls) -> list[list[int]]:
    return [row for kwargs, out in calls for row in out[:, kwargs["input_ids"].shape[1]:].tolist()]


def test_batched_generation_matches_one_at_a_time(tiny):
    lengths = [len(tiny.encoder.prompt_ids(s)) for s in tiny.samples]
    assert max(lengths) - min(lengths) > 30  # the batches really mix prompt lengths
    batched = generate(tiny.model, tiny.encoder, tiny.samples, tiny.pixels, batch_size=8, max_new_tokens=4)
    single = generate(tiny.model, tiny.encoder, tiny.samples, tiny.pixels, batch_size=1, max_new_tokens=4)
    assert batched == single
    assert len(set(batched)) > 3  # outputs depend on the prompt, so a mix-up of the order would show


def test_short_prompt_is_left_padded_in_a_long_batch(tiny):
    pair = [LONG, SHORT]
    alone = [generate(tiny.model, tiny.encoder, [s], tiny.pixels, max_new_tokens=5)[0] for s in pair]
    with spy_generate(tiny.model) as calls:
        together = generate(tiny.model, tiny.encoder, pair, tiny.pixels, batch_size=64, max_new_tokens=5)
    assert together == alone
    (kwargs, _), = calls
    mask = kwargs["attention_mask"]
    short_row = int(mask.sum(1).argmin())
    assert mask[short_row, 0] == 0 and mask[short_row, -1] == 1
    assert kwargs["input_ids"][short_row, 0] == tiny.tokenizer.pad_token_id
    assert "pixel_values" not in kwargs  # text-only batch


def test_mixed_image_and_text_samples_never_share_a_batch(tiny):
    with spy_generate(tiny.model) as calls:
        generate(tiny.model, tiny.encoder, tiny.samples, tiny.pixels, batch_size=64, max_new_tokens=1)
    image_token = tiny.tokenizer.convert_tokens_to_ids("<image>")
    assert len(calls) == 2
    for kwargs, _ in calls:
        has_images = (kwargs["input_ids"] == image_token).any(1)
        assert has_images.all() == ("pixel_values" in kwargs) and (has_images.all() or not has_images.any())


def test_generation_stops_at_max_new_tokens(tiny):
    with spy_generate(tiny.model) as calls:
        answers = generate(tiny.model, tiny.encoder, tiny.samples[:4], tiny.pixels, max_new_tokens=3)
    rows = new_tokens(calls)
    assert [len(row) for row in rows] == [3] * 4
    assert all(tiny.tokenizer.eos_token_id not in row for row in rows)  # random model: no early stop here
    assert sorted(answers) == sorted(tiny.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows)


@pytest.fixture(scope="module")
def pretrained(tiny):
    """The shipped base: its answers vary from token to token (a random init repeats one token forever)."""
    from mcit.models.tiny import resolve_builtin

    path = resolve_builtin("builtin:tiny-llava")
    processor = AutoProcessor.from_pretrained(path)
    return SimpleNamespace(model=LlavaForConditionalGeneration.from_pretrained(path),
                           encoder=Encoder(processor, max_length=256), pixels=PixelCache(processor),
                           tokenizer=processor.tokenizer, samples=tiny.samples)


def test_generation_stops_at_the_generation_config_eos(pretrained):
    """Any id the generation config names ends an answer, even one decoding would not drop; other rows run on."""
    tiny = pretrained
    first = tiny.samples[0]
    for other in tiny.samples[1:]:  # a partner whose answer differs, so that a token of `first` is unique to it
        with spy_generate(tiny.model) as calls:
            generate(tiny.model, tiny.encoder, [first, other], tiny.pixels, max_new_tokens=5)
        if len(calls) != 1:  # (a text-only partner is generated in its own batch)
            continue
        (kwargs, _), = calls
        lengths = kwargs["attention_mask"].sum(1).tolist()
        if lengths[0] == lengths[1]:
            continue
        at = lengths.index(len(tiny.encoder.prompt_ids(first)))  # batch is length-sorted
        row, other_row = new_tokens(calls)[at], new_tokens(calls)[1 - at]
        cut = next((k for k in range(1, 5) if row[k] not in row[:k] and row[k] not in other_row), None)
        if cut is not None:
            break
    else:
        pytest.fail("no test sample pair gives the first sample a token the other row never generates")
    config = tiny.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = row[cut]
    try:
        answers = generate(tiny.model, tiny.encoder, [first, other], tiny.pixels, max_new_tokens=5)
    finally:
        config.eos_token_id = saved
    assert answers[0] == tiny.tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
    assert answers[0] != tiny.tokenizer.decode(row, skip_special_tokens=True).strip()
    assert answers[1] == tiny.tokenizer.decode(other_row, skip_special_tokens=True).strip()


def direct_logprob(tiny, sample: Sample, candidate: str) -> float:
    """One unpadded forward over prompt + candidate + EOS, summing log-softmax at the candidate positions."""
    answered = dataclasses.replace(sample, turns=[*sample.turns[:-1], (sample.turns[-1][0], candidate)])
    full = tiny.encoder.encode(answered).input_ids
    prompt = tiny.encoder.prompt_ids(sample)
    assert full[:len(prompt)] == prompt and full[-1] == tiny.tokenizer.eos_token_id
    extra = {"pixel_values": tiny.pixels([sample.image])} if sample.image else {}
    with torch.no_grad():
        logp = tiny.model(input_ids=torch.tensor([full]), **extra).logits[0].float().log_softmax(-1)
    return sum(logp[k - 1, full[k]].item() for k in range(len(prompt), len(full)))


def test_candidate_logprobs_match_a_direct_forward_and_ignore_batching(tiny):
    samples = [tiny.samples[0], tiny.samples[4], SHORT, LONG]
    candidates = [["circle", "a small red square", "7"], ["there is one object.", "B"], ["yes", "no", "hello there"],
                  ["red, blue and green", "circle"]]
    expected = [[direct_logprob(tiny, s, c) for c in cands] for s, cands in zip(samples, candidates)]
    for batch_size in (1, 3, 64):
        got = candidate_logprobs(tiny.model, tiny.encoder, samples, candidates, tiny.pixels, batch_size=batch_size)
        assert [len(row) for row in got] == [len(c) for c in candidates]
        for row, want in zip(got, expected):
            assert row == pytest.approx(want, abs=1e-4)


def test_inference_restores_train_and_eval_modes(tiny):
    model = tiny.model
    model.train()
    model.model.vision_tower.eval()
    try:
        candidate_logprobs(model, tiny.encoder, [SHORT], [["yes"]], tiny.pixels)
        generate(model, tiny.encoder, [SHORT], tiny.pixels, max_new_tokens=1, autocast=torch.bfloat16,
                 progress="generate")
        assert model.training and model.lm_head.training and not model.model.vision_tower.training
    finally:
        model.eval()


def test_bad_candidate_inputs_are_named():
    with pytest.raises(EvalError, match="2 samples but 1 candidate lists"):
        candidate_logprobs(None, None, [SHORT, LONG], [["a"]], None)
    with pytest.raises(EvalError, match="sample 0.*1 scores for 2 candidates"):
        constrained_predictions([[0.0]], [["a", "b"]])


def test_constrained_predictions_take_the_argmax_and_break_ties_to_the_first():
    logprobs = [[-3.0, -1.0, -2.0], [-1.0, -1.0, -5.0], [-0.5]]
    assert constrained_predictions(logprobs, [["a", "b", "c"], ["x", "y", "z"], ["only"]]) == ["b", "x", "only"]


def test_a_trained_answer_ranks_first_and_ends_at_eos(tiny):
    """A few steps teaching "triangle" (output layer only, to stay fast): generation says it and stops at the real
    EOS, and the constrained choice picks it over the other shapes wherever it is listed."""
    model = LlavaForConditionalGeneration.from_pretrained(tiny.path)
    question = Sample("q", "text", None, [("Name a shape.", "triangle")])
    batch = collate([tiny.encoder.encode(question)], tiny.tokenizer.pad_token_id, tiny.pixels)
    for param in model.parameters():
        param.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW([model.lm_head.weight], lr=1e-2)
    model.train()
    for _ in range(8):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with spy_generate(model) as calls:
        assert generate(model, tiny.encoder, [question], tiny.pixels, max_new_tokens=8) == ["triangle"]
    row = new_tokens(calls)[0]
    end = row.index(tiny.tokenizer.eos_token_id)
    assert end < 7 and all(token == tiny.tokenizer.pad_token_id for token in row[end + 1:])
    candidates = [["square", "circle", "triangle", "cross"], ["triangle", "circle"]]
    scores = candidate_logprobs(model, tiny.encoder, [question, question], candidates, tiny.pixels)
    assert constrained_predictions(scores, candidates) == ["triangle", "triangle"]


def test_a_peft_wrapped_model_gives_the_bare_model_answers(tiny):
    """LoRA starts as the identity (B = 0), so the PEFT path must reproduce the bare model exactly."""
    from peft import LoraConfig, get_peft_model

    from mcit.models.loading import lora_target_regex

    base = LlavaForConditionalGeneration.from_pretrained(tiny.path)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=lora_target_regex(base, ["q_proj", "v_proj"])))
    samples, candidates = [tiny.samples[0], SHORT], [["circle", "red square"], ["yes", "no"]]
    assert generate(peft_model, tiny.encoder, samples, tiny.pixels, max_new_tokens=3) == \
        generate(tiny.model, tiny.encoder, samples, tiny.pixels, max_new_tokens=3)
    wrapped = candidate_logprobs(peft_model, tiny.encoder, samples, candidates, tiny.pixels)
    bare = candidate_logprobs(tiny.model, tiny.encoder, samples, candidates, tiny.pixels)
    for got, want in zip(wrapped, bare):
        assert got == pytest.approx(want, abs=1e-5)


def test_candidate_scores_do_not_depend_on_the_chunk_size(tiny):
    """Candidates run on a shared prompt cache `chunk` rows at a time; any chunking (one row, rows of several
    samples mixed, everything at once) gives the scores of one unpadded forward per candidate."""
    samples = [tiny.samples[0], tiny.samples[2], SHORT, LONG]  # two image samples, two text-only ones
    candidates = [["circle", "a small red square in the middle", "7", "triangle"],
                  ["B", "there are two blue objects and one green one.", "none"],
                  ["yes", "no", "hello there, how are you today?"], ["red, blue and green", "circle"]]
    expected = [[direct_logprob(tiny, s, c) for c in cands] for s, cands in zip(samples, candidates)]
    for batch_size, chunk in ((64, 1), (64, 3), (64, 1000), (5, 2), (1, None)):
        got = candidate_logprobs(tiny.model, tiny.encoder, samples, candidates, tiny.pixels, batch_size=batch_size,
                                 chunk=chunk)
        assert [len(row) for row in got] == [len(c) for c in candidates]
        for row, want in zip(got, expected):
            assert row == pytest.approx(want, abs=1e-4), (batch_size, chunk)


@contextlib.contextmanager
def spy_forward(model):
    """Record (kwargs, output) of every forward call of `model`."""
    calls = []
    original = model.forward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    model.forward = spy
    try:
        yield calls
    finally:
        del model.forward


def test_candidate_rows_per_forward_stay_within_the_chunk(tiny):
    """50 candidates, chunk 7: the prompt runs once, no forward carries more than 7 candidate rows, every candidate
    runs exactly once, each chunk gets its own cache and the prompt's cache is never appended to."""
    sample = tiny.samples[0]
    candidates = [" ".join(["red"] * (k % 4) + [f"shape {k}"]) for k in range(50)]
    with spy_forward(tiny.model) as calls:
        chunked = candidate_logprobs(tiny.model, tiny.encoder, [sample], [candidates], tiny.pixels, chunk=7)[0]
    prompt_calls = [(kw, out) for kw, out in calls if kw.get("cache") is None]
    chunk_calls = [kw for kw, _ in calls if kw.get("cache") is not None]
    assert len(prompt_calls) == 1 and "pixel_values" in prompt_calls[0][0]
    (prompt_kwargs, prompt_out), = prompt_calls
    prompt_cache = prompt_out.cache
    assert prompt_cache.get_seq_length() == prompt_kwargs["input_ids"].shape[1]  # nothing appended by the chunks
    rows = [kw["input_ids"].shape[0] for kw in chunk_calls]
    assert max(rows) <= 7 and sum(rows) == 50 and len(rows) == 8
    assert all(kw["cache"] is not prompt_cache for kw in chunk_calls)
    assert len({id(kw["cache"]) for kw in chunk_calls}) == len(chunk_calls)
    at_once = candidate_logprobs(tiny.model, tiny.encoder, [sample], [candidates], tiny.pixels, chunk=50)[0]
    assert chunked == pytest.approx(at_once, abs=1e-4)
    assert len(set(chunked)) > 40  # the scores really differ per candidate, so a mix-up of the order would show


def test_a_chunk_below_one_row_is_refused(tiny):
    with pytest.raises(EvalError, match="chunk .* must be at least 1 candidate row, got 0"):
        candidate_logprobs(tiny.model, tiny.encoder, [SHORT], [["yes"]], tiny.pixels, chunk=0)
