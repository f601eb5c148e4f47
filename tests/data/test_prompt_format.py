"""The base model's own prompt format: training and generation build what the model's processor builds at inference.

LLaVA-1.5 was trained on "<s>USER: <image>\\n{q} ASSISTANT: {a}</s>"; llava-hf/llava-1.5-7b-hf's chat template renders
neither BOS nor EOS (its tokenizer adds BOS, nothing adds EOS). The Encoder must therefore put the tokenizer's BOS
first, close every answer with a labelled EOS (so generation learns to stop), and keep the generation prompt equal to
`processor(text=processor.apply_chat_template(...), images=...)`. The template here is the real one
(tests/fixtures/llava-1.5-7b-hf); the tokenizer is a tiny LLaMA-style sentencepiece model (BOS 1, EOS 2) trained
in the test, wrapped with a CLIP image processor into a `LlavaProcessor` as mcit/models/tiny.py does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessorPil, LlamaTokenizer, LlavaProcessor

from mcit.data.collate import IGNORE_INDEX, Encoder, PixelCache, collate
from mcit.data.records import IMAGE_PREFIX, Sample
from mcit.evaluation.generate import _split, generate
from mcit.models.tiny import ASSET_DIR, TinyLlavaSpec, build_model, train_tokenizer

TEMPLATE = Path(__file__).resolve().parents[1] / "fixtures" / "llava-1.5-7b-hf" / "chat_template.json"
# 16 px images: 4 image tokens keep the training below short on a shared CPU
SPEC = TinyLlavaSpec(text_hidden=64, text_layers=2, text_heads=2, text_intermediate=128, vision_hidden=32,
                     vision_layers=1, vision_heads=2, vision_intermediate=64, image_size=16)
QA = [
    ((200, 30, 30), "What colour is the shape?", "red"),
    ((30, 30, 200), "Which colour fills the image?", "a deep blue"),
    ((30, 180, 30), "Name the colour of this picture.", "green, mostly"),
    ((220, 220, 40), "Say what colour you see.", "yellow"),
]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava-format")
    corpus = [text for _, q, a in QA for text in (q, a)] + ["USER: ASSISTANT: What colour shape is it?"] * 4
    train_tokenizer(folder, 300, corpus)
    tokenizer = LlamaTokenizer.from_pretrained(folder, pad_token="<pad>", add_bos_token=True, add_eos_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": SPEC.image_size}, crop_size={"height": SPEC.image_size, "width": SPEC.image_size},
        do_center_crop=True, do_resize=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=SPEC.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=json.loads(TEMPLATE.read_text())["chat_template"])
    samples = []
    for i, (colour, question, answer) in enumerate(QA):
        path = folder / f"image{i}.png"
        Image.new("RGB", (SPEC.image_size, SPEC.image_size), colour).save(path)
        samples.append(Sample(f"s{i}", "colour", str(path), [(IMAGE_PREFIX + question, answer)]))
    return SimpleNamespace(processor=processor, tokenizer=tokenizer, encoder=Encoder(processor, max_length=128),
                           samples=samples, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                           image=tokenizer.convert_tokens_to_ids("<image>"))


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """The maximal runs of labelled (not IGNORE_INDEX) tokens, in order."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def test_the_stand_in_tokenizer_adds_bos_like_llama(llava):
    assert llava.bos is not None and llava.eos is not None and llava.bos != llava.eos
    with_special = llava.tokenizer("hi")["input_ids"]
    assert with_special == [llava.bos, *llava.tokenizer("hi", add_special_tokens=False)["input_ids"]]
    text = llava.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "q"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "a"}]}], tokenize=False)
    assert text == "USER: q ASSISTANT: a "  # the real template: no BOS, no EOS


def test_training_example_starts_with_bos_and_ends_with_a_labelled_eos(llava):
    for sample in llava.samples:
        encoded = llava.encoder.encode(sample)
        ids, labels = encoded.input_ids, encoded.labels
        assert ids[0] == llava.bos and ids.count(llava.bos) == 1
        assert ids[-1] == llava.eos and ids.count(llava.eos) == 1  # the answer ends with EOS, once
        assert labels[-1] == llava.eos  # ... and the model is taught to produce it
        prompt = llava.encoder.prompt_ids(sample)
        assert ids[:len(prompt)] == prompt
        assert all(label == IGNORE_INDEX for label in labels[:len(prompt)])  # BOS, image, question: no loss
        (answer,) = labelled_runs(labels)
        assert llava.tokenizer.decode(answer[:-1]).strip() == sample.answer


def test_generation_prompt_is_what_the_processor_builds(llava):
    for sample in llava.samples:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
        text = llava.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expected = llava.processor(text=text, images=[Image.open(sample.image)])["input_ids"][0]
        expected = expected.tolist() if hasattr(expected, "tolist") else list(expected)
        assert expected[0] == llava.bos and expected.count(llava.image) == SPEC.image_tokens  # BOS, image expanded
        assert llava.encoder.prompt_ids(sample) == expected


def test_every_turn_of_a_conversation_ends_with_a_labelled_eos(llava):
    first = llava.samples[0]
    sample = dataclasses.replace(first, turns=[*first.turns, ("And the second answer?", "blue")])
    encoded = llava.encoder.encode(sample)
    ids, labels = encoded.input_ids, encoded.labels
    assert ids[0] == llava.bos and ids.count(llava.bos) == 1
    runs = labelled_runs(labels)
    assert [run[-1] for run in runs] == [llava.eos, llava.eos] and ids.count(llava.eos) == 2
    assert [llava.tokenizer.decode(run[:-1]).strip() for run in runs] == ["red", "blue"]
    # the prompt of the last turn holds the first answer closed by EOS, and is a token prefix of the conversation
    prompt = llava.encoder.prompt_ids(sample)
    assert prompt.count(llava.eos) == 1 and ids[:len(prompt)] == prompt
    # candidate ranking continues the same prompt; each continuation ends with the EOS training taught
    context, continuations = _split(llava.encoder, sample, ["blue", "red"], 0)
    assert context == prompt
    assert all(cont[-1] == llava.eos and cont.count(llava.eos) == 1 for cont in continuations)


def test_generation_stops_at_eos_after_training_on_the_format(llava):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs many times slower with threads fighting over a busy CPU
    try:
        torch.manual_seed(0)
        model = build_model(SPEC, llava.tokenizer, seed=0)
        pixels = PixelCache(llava.processor)
        batch = collate([llava.encoder.encode(s) for s in llava.samples], llava.tokenizer.pad_token_id, pixels)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(80):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        calls = []
        original = model.generate

        def spy(**kwargs):
            out = original(**kwargs)
            calls.append((kwargs["input_ids"], kwargs["attention_mask"], out[:, kwargs["input_ids"].shape[1]:]))
            return out

        model.generate = spy
        max_new_tokens = 40
        answers = generate(model, llava.encoder, llava.samples, pixels, max_new_tokens=max_new_tokens)
    finally:
        torch.set_num_threads(threads)
    prompts = [llava.encoder.prompt_ids(s) for s in llava.samples]
    new_tokens: list[list[int] | None] = [None] * len(prompts)
    for input_ids, mask, out in calls:
        for r in range(len(input_ids)):
            new_tokens[prompts.index(input_ids[r][mask[r] == 1].tolist())] = out[r].tolist()
    answer_tokens = [[t for t in llava.encoder.encode(s).labels if t != IGNORE_INDEX][:-1] for s in llava.samples]
    # generation stops with EOS right after the answer, well before the max_new_tokens cap
    stops = [row.index(llava.eos) if llava.eos in row else None for row in new_tokens]
    assert stops == [len(tokens) for tokens in answer_tokens]
    assert max(stops) < max_new_tokens // 2
    assert answers == [s.answer for s in llava.samples]


def test_tiny_base_format_has_no_bos_and_one_eos_per_answer():
    processor = AutoProcessor.from_pretrained(ASSET_DIR)
    tokenizer = processor.tokenizer
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]
    sample = Sample("t", "text", None, [("Hi?", "hello."), ("And now?", "now it is 3.")])
    encoder = Encoder(processor, max_length=128)
    encoded = encoder.encode(sample)
    assert tokenizer.bos_token_id not in encoded.input_ids  # pretrained without BOS, kept without
    assert encoded.input_ids.count(tokenizer.eos_token_id) == 2  # its template closes turns itself: no second EOS
    assert [run[-1] for run in labelled_runs(encoded.labels)] == [tokenizer.eos_token_id] * 2
    assert encoded.input_ids[:len(encoder.prompt_ids(sample))] == encoder.prompt_ids(sample)
