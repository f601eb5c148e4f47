"""Answer Style Diversification: right fractions, right styles, never the task's own style, deterministic; the
template and LLM rewriters; the stats file and its report table."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from mcit.config import recipe_from_dict
from mcit.data.asd import (
    SKIP_EMPTY_REWRITE,
    SKIP_NO_TEXT,
    WORD_BANDS,
    LLMRewriter,
    TemplateRewriter,
    _answer_text,
    append_rewrites,
    build_rewriter,
    diversify,
    diversify_with_stats,
    read_rewrite_cache,
)
from mcit.data.records import Sample
from mcit.errors import DataError, RecipeError
from mcit.report.render import write_report
from mcit.runs.folder import RunFolder
from mcit.workflows.load import load_task_data, prepare_card

TINY_TOKENIZER = Path(__file__).resolve().parents[2] / "mcit" / "assets" / "tiny-llava"

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def color_samples(n=40, with_texts=True):
    samples = []
    for i in range(n):
        meta = {"style": "word"}
        if with_texts and i % 2 == 0:
            meta.update(brief=f"The object is {COLORS[i % 6]}, a plain colour on a grey background.",
                        detailed=f"The single object in the picture is {COLORS[i % 6]} with a long description.")
        samples.append(Sample(id=f"c{i}", task="color", image=f"/img/{i}.png",
                              turns=[("<image>\nWhat colour is the object?", COLORS[i % 6])], meta=meta))
    return samples


def mc_samples(n=30):
    samples = []
    for i in range(n):
        choices = ["circle", "square", "triangle", "star"]
        answer = "ABCD"[i % 4]
        samples.append(Sample(id=f"m{i}", task="shape", image=f"/img/m{i}.png",
                              turns=[("<image>\nWhich shape?\nA. circle\nB. square\nC. triangle\nD. star", answer)],
                              meta={"style": "letter", "choices": choices, "stem": "Which shape?"}))
    return samples


def test_fraction_per_task_and_equal_style_shares():
    samples = color_samples(40) + mc_samples(30)
    out, stats = diversify_with_stats(samples, 0.4, seed=3, answer_pool=None)
    assert [s.id for s in out] == [s.id for s in samples]
    color_styles = [s.meta.get("asd_style") for s in out if s.task == "color"]
    shape_styles = [s.meta.get("asd_style") for s in out if s.task == "shape"]
    # colour (word style): 16 chosen, 4 per style; the 8 brief/detailed picks without texts are skipped
    assert stats.per_task["color"]["yesno"] == 4 and stats.per_task["color"]["mc"] == 4
    # 16 colour + 12 shape picks; every pick is either converted or skipped (kept in its original style)
    assert sum(stats.converted.values()) + sum(stats.skipped.values()) == 28
    assert stats.skipped["brief"] >= 4 and stats.skipped["detailed"] >= 4  # shape samples carry no brief texts
    assert color_styles.count(None) == 40 - sum(stats.per_task["color"].values())
    # shape is a multiple-choice task: never converted into multiple choice
    assert "mc" not in shape_styles and stats.per_task["shape"]["mc"] == 0
    assert stats.per_task["shape"]["yesno"] == 4  # 12 chosen over yesno/brief/detailed
    assert stats.kept == 70 - sum(stats.converted.values())


def test_yes_no_conversion_uses_truth_or_a_distractor():
    out, _ = diversify_with_stats(color_samples(200), 1.0, styles=("yesno",), seed=0)
    answers = [s.answer for s in out]
    assert 60 < answers.count("yes") < 140 and answers.count("yes") + answers.count("no") == 200
    for before, after in zip(color_samples(200), out):
        candidate = after.question.split('Is the answer "')[1].split('"')[0]
        assert (candidate == before.answer) == (after.answer == "yes")
        assert candidate in COLORS
        assert after.turns[0][0].startswith("<image>\nWhat colour is the object?\n")
        assert after.meta["style"] == "yesno" and after.meta["candidates"] == ["yes", "no"]
        assert after.meta["asd_original_answer"] == before.answer


def test_multiple_choice_has_four_distinct_options_and_the_right_letter():
    out, stats = diversify_with_stats(color_samples(50), 1.0, styles=("mc",), seed=1)
    assert stats.converted["mc"] == 50
    letters = set()
    for before, after in zip(color_samples(50), out):
        options = after.meta["choices"]
        assert len(set(options)) == 4 and before.answer in options
        assert options[" ABCD".index(after.answer) - 1] == before.answer
        assert after.meta["style"] == "letter"
        letters.add(after.answer)
    assert letters == set("ABCD")  # the right answer is not always in the same slot


def test_letter_tasks_convert_the_option_text_not_the_letter():
    out, _ = diversify_with_stats(mc_samples(20), 1.0, styles=("yesno",), seed=0)
    for before, after in zip(mc_samples(20), out):
        truth = before.meta["choices"]["ABCD".index(before.answer)]
        candidate = after.question.split('Is the answer "')[1].split('"')[0]
        assert candidate in before.meta["choices"]
        assert (candidate == truth) == (after.answer == "yes")
        assert after.question.startswith("Which shape?\n")  # the stem, without the old option list
        assert "choices" not in after.meta


def test_brief_and_detailed_come_from_meta_else_rewriter_else_skipped():
    out, stats = diversify_with_stats(color_samples(20), 1.0, styles=("brief", "detailed"), seed=0)
    converted = [s for s in out if "asd_style" in s.meta]
    assert len(converted) == 10 and stats.skipped["brief"] + stats.skipped["detailed"] == 10
    assert stats.per_task_skipped["color"] == {SKIP_NO_TEXT: 10}  # the reason is recorded, per style and per task
    assert sum(sum(r.values()) for r in stats.skip_reasons.values()) == 10
    for s in converted:
        assert s.answer == s.meta[s.meta["asd_style"]]

    def rewriter(sample, style):
        return f"{style} rewrite of {sample.answer}"

    out, stats = diversify_with_stats(color_samples(20, with_texts=False), 1.0, styles=("brief", "detailed"),
                                      rewriter=rewriter)
    assert stats.skipped == {"yesno": 0, "mc": 0, "brief": 0, "detailed": 0}
    assert {s.answer.split(" ")[0] for s in out} == {"brief", "detailed"}


def test_deterministic_by_seed():
    samples = color_samples(60)
    first = [s.to_dict() for s in diversify(samples, 0.5, seed=7)]
    assert first == [s.to_dict() for s in diversify(samples, 0.5, seed=7)]
    assert first != [s.to_dict() for s in diversify(samples, 0.5, seed=8)]
    assert all("asd_style" not in s.meta for s in samples)  # inputs untouched


def test_explicit_answer_pool_and_degenerate_inputs():
    samples = color_samples(10)
    out, stats = diversify_with_stats(samples, 1.0, styles=("mc",), answer_pool={"color": ["red", "x1", "x2", "x3"]})
    pool = {"red", "x1", "x2", "x3"}
    for before, after in zip(samples, out):
        assert before.answer in after.meta["choices"]
        assert set(after.meta["choices"]) - {before.answer} <= pool  # distractors only from the given pool
    assert diversify(samples, 0.0) == samples
    tiny = [Sample(id="t", task="t", image=None, turns=[("q", "only")], meta={})]
    _, stats = diversify_with_stats(tiny, 1.0, styles=("mc",))
    assert stats.skipped["mc"] == 1  # no distractors to draw from
    with pytest.raises(DataError, match="fraction"):
        diversify(samples, 1.5)
    with pytest.raises(DataError, match="unknown ASD styles"):
        diversify(samples, 0.5, styles=("haiku",))


# --- rewriter: template ------------------------------------------------------------------------------------------


def word_samples(n=200, task="animal"):
    """A word-answer task without any brief/detailed meta, like UCIT's ImageNet-R."""
    names = ["goldfish", "great white shark", "hammerhead", "stingray", "cock", "hen", "ostrich"]
    return [Sample(id=f"{task}{i}", task=task, image=f"/img/{task}{i}.png",
                   turns=[("<image>\nWhat is the object in the image?\nAnswer the question using a single word or "
                           "phrase.", names[i % len(names)])], meta={"style": "word"}) for i in range(n)]


def varied_samples():
    """One sample of every answer form the template handles."""
    q = "<image>\nWhich trend does the plot show?\nA. It rises\nB. It falls then levels off\nC. Flat\nD. Noisy"
    return [
        *word_samples(3),
        Sample(id="n", task="count", image="/i.png", turns=[("<image>\nSubtract all cubes. How many are left?", "3")],
               meta={"style": "number"}),
        Sample(id="l", task="arxiv", image="/i.png", turns=[(q, "B")], meta={"style": "letter"}),
        *mc_samples(2),
        Sample(id="y", task="yes", image="/i.png", turns=[("<image>\nIs there a cat?", "yes")], meta={"style": "yesno"}),
        Sample(id="t", task="text", image=None, turns=[("What is two plus two?", "4")], meta={"style": "number"}),
    ]


def test_template_converts_every_asked_sample():
    # fraction 0.2 of 200 samples of a word task (no brief/detailed meta) -> 40 picks, 10 per style, none skipped
    rewriter = build_rewriter("template", seed=0)
    out, stats = diversify_with_stats(word_samples(200), 0.2, seed=0, rewriter=rewriter)
    assert stats.per_task["animal"] == {"yesno": 10, "mc": 10, "brief": 10, "detailed": 10}
    assert sum(stats.skipped.values()) == 0 and stats.kept == 160
    assert sum("asd_style" in s.meta for s in out) == 40
    # the meta rewriter (the default) converts only the yes/no and multiple-choice picks of the same data
    _, meta_stats = diversify_with_stats(word_samples(200), 0.2, seed=0)
    assert sum(meta_stats.converted.values()) == 20 and meta_stats.skip_reasons["brief"] == {SKIP_NO_TEXT: 10}


def test_template_answers_fall_in_the_announced_word_bands():
    rewriter = TemplateRewriter(seed=0)
    for sample in varied_samples():
        brief, detailed = rewriter(sample, "brief"), rewriter(sample, "detailed")
        content = _answer_text(sample) if sample.meta["style"] != "letter" or sample.meta.get("choices") else \
            "It falls then levels off"
        for text, style in ((brief, "brief"), (detailed, "detailed")):
            low, high = WORD_BANDS[style]
            assert low <= len(text.split()) <= high, (style, text)
            assert content in text  # the answer is stated, as content (option text for letters)
        if sample.image is None:
            assert "image" not in (brief + detailed).lower() and "picture" not in (brief + detailed).lower()


def test_template_captions_start_from_the_caption():
    caption = Sample(id="c", task="cap", image="/i.png", meta={"style": "caption"},
                     turns=[("<image>\nDescribe the image briefly.",
                             "A brown dog is running along the wet sand of a beach at sunset. Waves roll in.")])
    rewriter = TemplateRewriter(seed=0)
    assert rewriter(caption, "brief") == "A brown dog is running along the wet sand of a beach at sunset."
    detailed = rewriter(caption, "detailed")
    assert detailed.startswith(caption.answer) and 40 <= len(detailed.split()) <= 60
    short = Sample(id="s", task="cap", image="/i.png", turns=[("<image>\nDescribe it.", "A red car.")],
                   meta={"style": "caption"})
    assert rewriter(short, "brief").endswith(": a red car.")  # a lead-in, the caption lower-cased after "A"


def test_template_is_deterministic_per_seed_and_varied():
    samples = word_samples(40)
    first = [TemplateRewriter(seed=5)(s, "detailed") for s in samples]
    assert first == [TemplateRewriter(seed=5)(s, "detailed") for s in samples]
    assert first != [TemplateRewriter(seed=6)(s, "detailed") for s in samples]
    same_answer = [TemplateRewriter(seed=5)(s, "brief") for s in samples if s.answer == "goldfish"]
    assert len(set(same_answer)) > 1  # 40k samples are not one string
    out1, _ = diversify_with_stats(samples, 0.5, seed=2, rewriter=TemplateRewriter(2))
    out2, _ = diversify_with_stats(samples, 0.5, seed=2, rewriter=TemplateRewriter(2))
    assert [s.to_dict() for s in out1] == [s.to_dict() for s in out2]


# --- rewriter: a local causal LM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A randomly initialised 1-layer Llama with the repo's tiny tokenizer, saved like any local model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llm")
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER, local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def count_generate(monkeypatch):
    from transformers import LlamaForCausalLM

    calls = []
    original = LlamaForCausalLM.generate

    def counting(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", counting)
    return calls


def test_llm_rewriter_generates_in_batches_caches_and_reuses(tiny_llm, tmp_path, count_generate):
    cache = tmp_path / "run" / "asd" / "rewrites.jsonl"
    samples = word_samples(20)
    llm = LLMRewriter(tiny_llm, cache, batch_size=4, max_new_tokens={"brief": 4, "detailed": 6})
    out, stats = diversify_with_stats(samples, 1.0, styles=("brief", "detailed"), seed=0, rewriter=llm)
    assert count_generate and max(count_generate) == 4 and sum(count_generate) == 20  # batches of 4, all 20 asked
    assert llm.generated == 20
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(records) == 20 and {r["id"] for r in records} == {s.id for s in samples}  # one answer per pick
    assert any(r["text"] for r in records)  # gibberish from random weights, but text
    for before, after in zip(samples, out):
        if "asd_style" in after.meta:
            assert after.answer == next(r["text"] for r in records if r["id"] == before.id)
    # empty generations are cached too and counted as skipped, never as converted
    assert stats.converted["brief"] + stats.converted["detailed"] == sum(1 for r in records if r["text"])
    assert stats.skipped["brief"] + stats.skipped["detailed"] == sum(1 for r in records if not r["text"])

    count_generate.clear()
    again = LLMRewriter(tiny_llm, cache, batch_size=4)
    out2, stats2 = diversify_with_stats(samples, 1.0, styles=("brief", "detailed"), seed=0, rewriter=again)
    assert count_generate == [] and again.generated == 0 and again._model is None  # nothing loaded or generated
    assert [s.to_dict() for s in out2] == [s.to_dict() for s in out] and stats2 == stats


def test_rewrite_cache_survives_a_torn_line_and_regenerates_only_what_is_missing(tiny_llm, tmp_path,
                                                                                    count_generate):
    cache = tmp_path / "rewrites.jsonl"
    samples = word_samples(8)
    diversify_with_stats(samples, 1.0, styles=("brief",), rewriter=LLMRewriter(tiny_llm, cache,
                                                                                 max_new_tokens={"brief": 3}))
    lines = cache.read_text().splitlines()
    assert len(read_rewrite_cache(cache)) == 8
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # a kill mid-append
    assert len(read_rewrite_cache(cache)) == 7
    count_generate.clear()
    llm = LLMRewriter(tiny_llm, cache, max_new_tokens={"brief": 3})
    diversify_with_stats(samples, 1.0, styles=("brief",), rewriter=llm)
    assert llm.generated == 1 and sum(count_generate) == 1
    assert len(read_rewrite_cache(cache)) == 8  # the new record was not glued onto the torn fragment


def test_other_ranks_wait_for_the_main_ranks_answers_then_meet_at_the_barrier(tmp_path, monkeypatch):
    from mcit.data import asd

    cache = tmp_path / "rewrites.jsonl"
    samples = word_samples(3)
    records = [{"task": s.task, "id": s.id, "style": "brief", "text": f"Rewritten {s.answer}."} for s in samples]
    append_rewrites(cache, records[:2])
    barriers = []
    monkeypatch.setattr(asd.dist, "is_distributed", lambda: True)
    monkeypatch.setattr(asd.dist, "is_main", lambda: False)
    monkeypatch.setattr(asd.dist, "barrier", lambda: barriers.append(len(read_rewrite_cache(cache))))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # a rank other than the main one never loads the model
    llm = LLMRewriter(folder, cache, poll_s=0.01)
    writer = threading.Timer(0.2, append_rewrites, (cache, records[2:]))  # the main rank finishing its last batch
    writer.start()
    out, stats = diversify_with_stats(samples, 1.0, styles=("brief",), rewriter=llm)
    writer.join()
    assert barriers == [3] and llm.generated == 0  # it waited for all three answers, then met the barrier once
    assert [s.answer for s in out] == [r["text"] for r in records]
    with pytest.raises(DataError, match="cache file"):
        LLMRewriter(folder, None).rewrite_batch([(samples[0], "brief")])


def test_an_empty_rewrite_counts_as_skipped(tmp_path):
    cache = tmp_path / "rewrites.jsonl"
    samples = word_samples(2)
    append_rewrites(cache, [{"task": "animal", "id": "animal0", "style": "brief", "text": ""},
                            {"task": "animal", "id": "animal1", "style": "brief", "text": "A goldfish."}])
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # never loaded: every answer is cached
    out, stats = diversify_with_stats(samples, 1.0, styles=("brief",), rewriter=build_rewriter(str(folder),
                                                                                                 cache_file=cache))
    assert stats.converted["brief"] == 1 and stats.skip_reasons["brief"] == {SKIP_EMPTY_REWRITE: 1}
    assert out[0] is samples[0] and out[1].answer == "A goldfish."


# --- the run: stats file, report, recipe errors -------------------------------------------------------------------


def _recipe(root, output_dir, **asd):
    return recipe_from_dict({
        "output_dir": str(output_dir), "seed": 0,
        "benchmark": {"card": "synthcit", "root": str(root), "tasks": ["shape", "mc-color", "caption"],
                      "max_train": 40, "max_test": 4, "asd": {"enabled": True, "fraction": 0.2, **asd}}})


def test_stats_file_is_written_and_shown_in_the_report(synthcit_root, tmp_path):
    folder = RunFolder(tmp_path / "run")
    recipe = _recipe(synthcit_root, folder.root, rewriter="template")
    events = []
    data = load_task_data(prepare_card(recipe), recipe, events.append, run_folder=folder)
    stats = json.loads(folder.asd_stats.read_text())
    assert stats["rewriter"] == "template" and stats["fraction"] == 0.2
    assert set(stats["per_task"]) == {"shape", "mc-color", "caption"}
    for task, samples in data.train.items():
        converted = [s.meta["asd_style"] for s in samples if "asd_style" in s.meta]
        assert stats["samples"][task] == len(samples) == 40
        assert {st: converted.count(st) for st in ("yesno", "mc", "brief", "detailed")} == stats["per_task"][task]
        assert len(converted) == 8  # template: every pick (20 % of 40) converted
    assert [e["task"] for e in events if e.get("event") == "asd"] == ["shape", "mc-color", "caption"]

    tasks = ["shape", "mc-color", "caption"]
    folder.results.write_text(json.dumps({"tasks": tasks, "stages": ["zero-shot", *tasks],
                                          "stage_tasks": [[], [0], [1], [2]], "matrix": [[50.0] * 3] * 4}))
    md = write_report([folder.root]).read_text()
    section = md.split("ASD conversions", 1)[1]
    assert "rewriter: template" in section and "20 %" in section
    shape_row = next(line for line in section.splitlines() if line.startswith("| shape |"))
    cells = [c.strip() for c in shape_row.strip("|").split("|")]
    assert cells[:3] == ["shape", "40", "8"] and cells[-1] == "20.00"


def test_without_a_run_folder_nothing_is_written(synthcit_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(synthcit_root, "unused")
    load_task_data(prepare_card(recipe), recipe, lambda _e: None)
    assert not (tmp_path / "unused").exists()


def test_bad_rewriter_values_are_clear_recipe_errors(tmp_path, synthcit_root):
    with pytest.raises(RecipeError, match=r"benchmark\.asd\.rewriter: .*got 'templte'; did you mean 'template'"):
        recipe_from_dict({"output_dir": "x", "benchmark": {"asd": {"enabled": True, "rewriter": "templte"}}})
    missing = tmp_path / "no-such-model"
    with pytest.raises(RecipeError, match=r"benchmark\.asd\.rewriter: .*no such folder.*causal-LM folder"):
        build_rewriter(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="without config.json"):
        build_rewriter(str(tmp_path / "empty"))
    # the run fails before reading any data
    recipe = _recipe(synthcit_root, tmp_path / "run", rewriter=str(missing))
    with pytest.raises(RecipeError, match="no-such-model"):
        load_task_data(prepare_card(recipe), recipe, lambda _e: None)
