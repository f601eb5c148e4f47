"""Hostile input: whatever a recipe, a data card, an annotation file or a model's output holds, mcit either loads it or
raises its own error type (mcit/errors.py) with a message — never another exception, never a hang.

Property-based (hypothesis): structures built from the real key names (so the fuzzing reaches deep into the
validators) mixed with arbitrary values, keys and raw text. The deadline turns a hang into a failure.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcit.config import Recipe, load_recipe, recipe_from_dict
from mcit.data.cards import DataCard, card_from_dict, load_card
from mcit.data.formats import load_split, read_split
from mcit.data.records import Sample
from mcit.errors import DataError, EvalError, RecipeError
from mcit.evaluation.scorers import ScoreResult, get_scorer, scorer_names

# MCIT_FUZZ_EXAMPLES=5000 for a long hunt; the default keeps this file near 15 s. No example database on disk.
EXAMPLES = int(os.environ.get("MCIT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SCORER_FUZZ = settings(max_examples=max(1, EXAMPLES // 2), deadline=5000, database=None,
                       suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))


def json_like():
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=25)


def with_keys(names: list[str], values):
    """Mappings whose keys are mostly real names (plus the odd unknown one)."""
    return st.dictionaries(st.sampled_from(names) | st.text(max_size=8), values, max_size=len(names) + 1)


def expect(error_type, fn, *args, **kwargs):
    """Call fn; pass if it returns, or raises `error_type` with a message; anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except error_type as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return None


# --- recipes --------------------------------------------------------------------------------------------------------

SECTION_KEYS = {
    "model": ["name_or_path", "revision", "dtype", "autocast", "attn_implementation", "load_in_4bit",
              "trust_remote_code", "train_projector", "gradient_checkpointing"],
    "benchmark": ["card", "tasks", "root", "max_train", "max_test", "skip_invalid", "asd"],
    "method": ["name", "lora", "options", "expand_layers"],
    "train": ["epochs", "max_steps", "batch_size", "grad_accum", "lr", "warmup_ratio", "max_length", "save_steps",
              "deepspeed"],
    "eval": ["batch_size", "max_new_tokens", "constrained", "zero_shot", "max_test"],
}
TOP_KEYS = ["output_dir", "name", "description", "seed", *SECTION_KEYS]
LORA_KEYS = ["r", "alpha", "dropout", "target_modules"]
value = json_like()
section = st.one_of(*[with_keys(keys, value | with_keys(LORA_KEYS, value)) for keys in SECTION_KEYS.values()]) | value
recipes = with_keys(TOP_KEYS, section) | json_like()


@FUZZ
@given(data=recipes)
def test_recipe_from_any_mapping_loads_or_raises_recipe_error(data) -> None:
    recipe = expect(RecipeError, recipe_from_dict, data)
    if recipe is not None:
        assert isinstance(recipe, Recipe) and recipe.train.lr > 0 and recipe.train.batch_size >= 1


@FUZZ
@given(text=st.text(max_size=300) | recipes.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
       overrides=st.lists(st.text(max_size=30), max_size=3))
def test_recipe_file_with_any_text_and_overrides_loads_or_raises_recipe_error(tmp_path_factory, text, overrides):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    expect(RecipeError, load_recipe, path, overrides)


# --- data cards -----------------------------------------------------------------------------------------------------

TASK_KEYS = ["name", "train", "test", "image_root", "format", "answer_style", "scorer", "scorer_options",
             "candidates", "max_train", "max_test", "instruction_suffix"]
CARD_KEYS = ["name", "tasks", "description", "root", "citation", "generator"]
task_value = value | st.sampled_from(["llava", "jsonl", "auto", "word", "letter", "exact_match", "iou", "auto"])
tasks = st.lists(with_keys(TASK_KEYS, task_value) | value, max_size=4)
cards = with_keys(CARD_KEYS, value | tasks) | json_like()


@FUZZ
@given(data=cards)
def test_card_from_any_mapping_loads_or_raises_data_error(data) -> None:
    card = expect(DataError, card_from_dict, data)
    if card is not None:
        assert isinstance(card, DataCard) and card.tasks


@FUZZ
@given(text=st.text(max_size=300) | cards.map(lambda d: yaml.safe_dump(d, allow_unicode=True)))
def test_card_file_with_any_text_loads_or_raises_data_error(tmp_path_factory, text) -> None:
    path = tmp_path_factory.mktemp("card") / "card.yaml"
    path.write_text(text, encoding="utf-8")
    card = expect(DataError, load_card, path)
    if card is not None:  # a loadable card's root and tasks can be used without another exception type
        for task in card.tasks:
            expect(DataError, card.load_task, task.name, "train" if task.train else "test")


# --- annotation files (LLaVA JSON, JSONL, sharegpt) -----------------------------------------------------------------

RECORD_KEYS = ["id", "question_id", "image", "images", "conversations", "messages", "text", "answer", "answer_bbox"]
MESSAGE_KEYS = ["from", "value", "role", "content"]
roles = st.sampled_from(["human", "gpt", "user", "assistant", "system", "tool"])
message = with_keys(MESSAGE_KEYS, roles | st.text(max_size=20) | st.just("<image>\nWhat?") | value)
record_value = value | st.lists(message, max_size=5) | st.sampled_from(["a.png", "../../etc/passwd", "/etc/hosts"])
records = st.lists(with_keys(RECORD_KEYS, record_value) | value, max_size=5)


def _as_file(kind: str, items) -> str:
    if kind == "json":
        return json.dumps(items)
    return "\n".join(json.dumps(item) for item in items)


@FUZZ
@given(items=records, kind=st.sampled_from(["json", "jsonl"]), fmt=st.sampled_from(["auto", "llava", "jsonl",
                                                                                     "sharegpt"]))
def test_annotation_records_load_or_raise_data_error(tmp_path_factory, items, kind, fmt) -> None:
    path = tmp_path_factory.mktemp("ann") / f"a.{kind}"
    path.write_text(_as_file(kind, items), encoding="utf-8")
    samples = expect(DataError, load_split, path, fmt=fmt)
    for sample in samples or []:
        assert isinstance(sample, Sample) and sample.turns
        assert all(isinstance(u, str) and isinstance(a, str) for u, a in sample.turns)
    samples, errors = read_split(path, fmt=fmt)  # the validator's path: collects instead of raising
    assert all(isinstance(e, DataError) and str(e) for e in errors)


@FUZZ
@given(raw=st.binary(max_size=400) | st.text(max_size=400).map(str.encode)
       | st.sampled_from([b"[" * 50000, b"{" * 50000, b"[1" + b"0" * 5000 + b"]", b"\xff\xfe[]", b"[\"\\ud800\"]"]),
       suffix=st.sampled_from([".json", ".jsonl"]))
def test_annotation_files_with_any_bytes_load_or_raise_data_error(tmp_path_factory, raw, suffix) -> None:
    path = tmp_path_factory.mktemp("raw") / f"a{suffix}"
    path.write_bytes(raw)
    expect(DataError, load_split, path)
    expect(DataError, load_split, path, skip_malformed=True)


# --- scorers --------------------------------------------------------------------------------------------------------

answers = st.text(max_size=40) | st.sampled_from(
    ["A", "(B)", "yes", "No.", "3", "three hundred and five", "1,000", "3/0", "1e999", "[0.1, 0.2, 0.5, 0.9]",
     "[1, 1, 0, 0]", "scene: small red circle at top left; text pen", "", " ", "9" * 400])
metas = st.none() | with_keys(["choices", "references", "candidates", "style"],
                              value | st.lists(answers, max_size=5))
scorer_options = st.dictionaries(st.sampled_from(["rel_tol", "abs_tol", "pick", "threshold", "report", "meteor",
                                                  "accept_choice_text", "lowercase", "normalizer", "rule", "bogus"]),
                                 value | st.sampled_from(["first", "last", "only", "mean", "CIDEr", "strict", "ai2d",
                                                          "pvqa", "sci", "finvis"]),
                                 max_size=2)


@SCORER_FUZZ
@given(name=st.sampled_from(sorted(scorer_names())), options=scorer_options,
       rows=st.lists(st.tuples(answers, answers, metas), min_size=0, max_size=5))
def test_scorers_score_or_raise_eval_error(name, options, rows) -> None:
    if name.startswith("caption"):
        options = {**options, "meteor": False}  # METEOR's java start-up (seconds) would blow the example deadline
    scorer = expect(EvalError, get_scorer, name, **options)
    if scorer is None:
        return
    predictions, references, row_metas = (list(col) for col in zip(*rows)) if rows else ([], [], [])
    result = expect(EvalError, scorer, predictions, references, row_metas)
    if result is not None:
        assert isinstance(result, ScoreResult) and len(result.per_sample) == len(rows)
        assert all(0.0 <= s <= 1.0 for s in result.per_sample)
        assert math.isfinite(result.score) and result.score >= 0


@SCORER_FUZZ
@given(name=st.sampled_from(sorted(scorer_names())),
       predictions=st.lists(scalars, min_size=1, max_size=3).filter(lambda xs: any(not isinstance(x, str) for x in xs)))
def test_scorers_refuse_non_text_with_eval_error(name, predictions) -> None:
    """Any non-text prediction is refused with an EvalError naming its index and type (never scored as text)."""
    first = next(i for i, x in enumerate(predictions) if not isinstance(x, str))
    with pytest.raises(EvalError, match=rf"at index {first} is {type(predictions[first]).__name__}, expected str"):
        get_scorer(name)(predictions, ["A"] * len(predictions))


# --- YAML is parsed safely ------------------------------------------------------------------------------------------

PAYLOAD = "!!python/object/apply:os.system ['touch {marker}']"


@pytest.mark.parametrize("kind", ["recipe", "card"])
def test_yaml_python_tags_are_refused_not_executed(tmp_path, kind) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"{kind}.yaml"
    path.write_text(f"name: x\noutput_dir: {tmp_path}\ndescription: {PAYLOAD.format(marker=marker)}\n")
    loader, error = (load_recipe, RecipeError) if kind == "recipe" else (load_card, DataError)
    with pytest.raises(error, match=r"line 3.*python/object/apply" if kind == "recipe" else "python/object/apply"):
        loader(path)
    assert not marker.exists()


def test_python_tag_in_an_override_stays_a_string(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "r.yaml"
    path.write_text(f"output_dir: {tmp_path}\n")
    recipe = load_recipe(path, [f"description={PAYLOAD.format(marker=marker)}"])
    assert recipe.description.startswith("!!python/object") and not marker.exists()


# --- images: confined to the image root, bombs refused --------------------------------------------------------------


def _card_with_images(tmp_path, images: list[str]):
    from PIL import Image

    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "img" / "ok.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    (root / "img" / "link.png").symlink_to(tmp_path / "secret.png")
    records = [{"id": str(i), "image": image, "text": "What?", "answer": "x"} for i, image in enumerate(images)]
    (root / "test.json").write_text(json.dumps(records))
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump({"name": "hostile", "root": str(root),
                                    "tasks": [{"name": "t", "test": "test.json", "image_root": "img"}]}))
    return load_card(card)


@pytest.mark.parametrize("image", ["../../secret.png", "{tmp}/secret.png", "link.png"],
                         ids=["dot-dot", "absolute", "symlink"])
def test_image_paths_outside_the_image_root_are_refused_before_pixels_are_read(tmp_path, image) -> None:
    """`mcit train` and `mcit eval` validate the card before reading pixels: an escaping path is refused (or, with
    benchmark.skip_invalid, the sample is dropped), naming the annotation file and the sample index."""
    from mcit.data.validate import filter_valid, validate_card

    card = _card_with_images(tmp_path, ["ok.png", image.format(tmp=tmp_path)])
    report = validate_card(card)
    assert [(p.index, p.kind) for p in report.problems] == [(1, "image_escape")]
    assert "test.json" in report.format() and "outside the image root" in report.format()
    kept, dropped = filter_valid(card.load_task("t", "test"), report)
    assert [s.id for s in kept] == ["0"] and dropped == 1


def test_mcit_eval_refuses_a_card_with_an_escaping_image(tmp_path, capsys) -> None:
    from mcit.cli import main

    _card_with_images(tmp_path, ["ok.png", "../../secret.png"])
    code = main(["eval", "--checkpoint", "builtin:tiny-llava", "--benchmark", str(tmp_path / "card.yaml"),
                 "--output", str(tmp_path / "eval")])
    assert code == 2 and not (tmp_path / "eval" / "results.json").exists()
    assert "image_escape" in capsys.readouterr().err


def test_decompression_bombs_are_refused_wherever_pixels_are_read(tmp_path) -> None:
    from PIL import Image

    from mcit.data.collate import PixelCache
    from mcit.data.validate import validate_card

    card = _card_with_images(tmp_path, ["ok.png", "bomb.png"])
    bomb = tmp_path / "data" / "img" / "bomb.png"
    Image.new("1", (8125, 8000)).save(bomb)  # 65 MP in a few KB, above the 64 MP bound
    assert bomb.stat().st_size < 100_000
    problems = validate_card(card).problems  # `mcit train` validates the card before it reads any pixel
    assert [(p.index, p.kind) for p in problems] == [(1, "unreadable_image")]
    assert "decompression bomb" in problems[0].message
    samples = card.load_task("t", "test")
    with pytest.raises(DataError, match=r"bomb\.png: refused as a decompression bomb"):
        PixelCache(processor=None)([s.image for s in samples])  # `mcit eval` reads pixels without validating
