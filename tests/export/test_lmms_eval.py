"""lmms-eval interoperability (mcit/export/lmms_eval.py): a stage of a run, exported, answers and scores the same in
lmms-eval as in `mcit eval`.

What is protected, without lmms-eval: the written tasks hold exactly the test samples `mcit eval` scores and score them
with the card's scorer; a `--full` export loaded the way lmms-eval's `llava_hf` loads it (Auto classes, the processor's
chat template, greedy `generate`) gives mcit's answers; the `mcit` model's answering core reproduces `mcit eval` on a
routed expert set. With lmms-eval importable (a separate environment: docs/EXPORT.md), its own command line is run
offline on both exports and must give mcit's answers and scores sample by sample.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mcit.config import load_recipe
from mcit.data.cards import load_card
from mcit.data.images import decode_image
from mcit.errors import McitError
from mcit.evaluation.scorers import get_scorer
from mcit.export import lmms_eval as lm
from tests.recipes import write_recipe

TASKS = ["shape", "mc-color", "count"]
"""Evaluated tasks: the run trains the first two; count, never trained, is answered as the tiny base learned it, so
the scores compared are not all zero."""
MAX_TEST = 6
MAX_NEW_TOKENS = 8
ROOT = Path(__file__).resolve().parents[2]


def _lmms_eval_or_skip() -> None:
    """Skip where lmms-eval is not installed, except where the environment must have it (scripts/test_lmms.sh sets
    MCIT_REQUIRE_LMMS_EVAL=1: there a missing lmms-eval is a failure, not a silent skip)."""
    if os.environ.get("MCIT_REQUIRE_LMMS_EVAL") == "1":
        import lmms_eval  # noqa: F401
    else:
        pytest.importorskip("lmms_eval")


def write_suite(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "lmms-check",
        "generation": {"max_new_tokens": MAX_NEW_TOKENS, "batch_size": 16, "constrained": False},
        "tasks": [{"card": "synthcit-mini", "task": task} for task in TASKS],
    }))
    return path


class _TaskLoader(yaml.SafeLoader):
    """Reads lmms-eval task YAML: `!function a.b.c` comes back as the string "!function a.b.c"."""


_TaskLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def read_docs(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture
def synthcit_env(synthcit_root, monkeypatch):
    monkeypatch.setenv("MCIT_SYNTHCIT_ROOT", str(synthcit_root))
    return synthcit_root


# --- tasks (no model) -------------------------------------------------------------------------------------------------


def test_written_tasks_hold_the_samples_mcit_eval_scores_and_use_the_cards_scorer(synthcit_env, tmp_path):
    out = tmp_path / "tasks"
    names = lm.write_lmms_tasks(write_suite(tmp_path / "suite.yaml"), out, max_test=MAX_TEST)
    assert names == ["mcit_lmms_check_shape", "mcit_lmms_check_mc_color", "mcit_lmms_check_count"]
    card = load_card("synthcit-mini")
    for name, task in zip(names, TASKS):
        config = yaml.load((out / f"{name}.yaml").read_text(), Loader=_TaskLoader)
        assert (config["task"], config["tag"], config["test_split"]) == (name, ["mcit_lmms_check"], "test")
        assert config["dataset_path"] == "json" and config["dataset_kwargs"]["data_files"] == {"test": f"{name}.jsonl"}
        assert config["process_results"] == "!function mcit.export.lmms_eval.process_results"
        assert config["metric_list"][0]["aggregation"] == "!function mcit.export.lmms_eval.aggregate_score"
        assert config["generation_kwargs"]["max_new_tokens"] == MAX_NEW_TOKENS
        assert config["generation_kwargs"]["do_sample"] is False

        spec = card.task(task)
        spec.max_test = MAX_TEST
        samples = card.load_task(task, "test", seed=0)  # what mcit eval loads for a seed-0 checkpoint
        docs = read_docs(out, name)
        assert [(d["id"], d["image"], d["question"], d["answer"]) for d in docs] == \
            [(s.id, s.image, s.question, s.answer) for s in samples]
        assert len(docs) == MAX_TEST and all(Path(d["image"]).is_file() for d in docs)
        doc = docs[0]
        (image,) = lm.doc_to_visual(doc)
        assert image.mode == "RGB" and image.tobytes() == decode_image(samples[0].image).tobytes()
        assert lm.doc_to_text(doc) == samples[0].question

        # scoring: the card's scorer over the task, whatever the answers are
        references = [d["answer"] for d in docs]
        answers = [references[0], "no idea", *references[2:], " " + references[1] + " "]
        items = [lm.process_results(d, [a])[lm.METRIC] for d, a in zip(docs, answers[:len(docs)])]
        expected = get_scorer(spec.scorer, **spec.scorer_options)(
            [a.strip() for a in answers[:len(docs)]], references, [s.meta for s in samples]).score
        assert lm.aggregate_score(items) == pytest.approx(expected)
        assert 0 < expected < 100  # one answer is wrong, the others right
        perfect = [lm.process_results(d, [d["answer"]])[lm.METRIC] for d in docs]
        assert lm.aggregate_score(perfect) == 100.0

    with pytest.raises(McitError, match="not empty.*--force"):
        lm.write_lmms_tasks(tmp_path / "suite.yaml", out)
    assert lm.write_lmms_tasks(tmp_path / "suite.yaml", out, max_test=2, force=True) == names
    assert len(read_docs(out, names[0])) == 2


def test_the_lmms_eval_glue_says_how_to_install_it_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # import lmms_eval -> ImportError
    with pytest.raises(McitError, match="lmms-eval is not importable.*pip install"):
        lm.register(lambda path: ())
    with pytest.raises(McitError, match="lmms-eval is not importable"):
        lm.McitModel  # noqa: B018 - the lazily built lmms-eval class


def test_answers_are_cut_at_lmms_evals_stop_strings():
    assert lm._cut(" A red circle.\nUSER: more", ["\n", "USER:"]) == "A red circle."
    assert lm._cut("circle", None) == "circle"
    assert lm._cut("3 objects", "objects") == "3"


# --- a routed run, exported (models) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(synthcit_root, tmp_path_factory):
    """A two-task DISCO run (routed experts) in fp32, exported as an expert set and as a full model (`--merge cat`),
    with the written tasks and `mcit eval`'s own predictions and scores for both exports."""
    from mcit.workflows.evaluate import evaluate_checkpoint
    from mcit.workflows.export import export_run
    from mcit.workflows.train import ContinualRunner

    tmp = tmp_path_factory.mktemp("lmms")
    old = os.environ.get("MCIT_SYNTHCIT_ROOT")
    os.environ["MCIT_SYNTHCIT_ROOT"] = str(synthcit_root)
    try:
        recipe = write_recipe(tmp / "r.yaml", synthcit_root, model={"autocast": None},
                              method={"name": "disco", "lora": {"r": 4, "alpha": 8}},
                              train={"batch_size": 16, "lr": 1e-3, "max_steps": 3, "save_steps": 0,
                                     "max_length": 160},
                              eval={"batch_size": 32, "max_new_tokens": MAX_NEW_TOKENS, "zero_shot": False})
        run = ContinualRunner(load_recipe(recipe)).run().parent
        experts, full = tmp / "experts", tmp / "full"
        export_run(run, experts, experts=True)
        export_run(run, full, full=True, merge="cat", dtype="fp32")
        settings = write_recipe(tmp / "settings.yaml", synthcit_root, model={"autocast": None},
                                eval={"max_new_tokens": MAX_NEW_TOKENS})  # mcit eval of the full export in fp32
        mcit = {}
        for name, folder, recipe_path in (("experts", experts, None), ("full", full, settings)):
            results = evaluate_checkpoint(str(folder), "synthcit-mini", tasks=TASKS, max_test=MAX_TEST,
                                          output_dir=str(tmp / f"eval-{name}"), constrained=False,
                                          recipe_path=str(recipe_path) if recipe_path else None)
            rows = json.loads(results.read_text())
            predictions = {task: [json.loads(line) for line in
                                  (tmp / f"eval-{name}" / "predictions" / f"{task}.jsonl").read_text().splitlines()]
                           for task in TASKS}
            mcit[name] = {"results": rows, "predictions": predictions}
        tasks = tmp / "tasks"
        names = lm.write_lmms_tasks(write_suite(tmp / "suite.yaml"), tasks, max_test=MAX_TEST)
    finally:
        if old is None:
            os.environ.pop("MCIT_SYNTHCIT_ROOT", None)
        else:
            os.environ["MCIT_SYNTHCIT_ROOT"] = old
    return {"run": run, "experts": experts, "full": full, "mcit": mcit, "tasks": tasks,
            "names": dict(zip(TASKS, names)), "tmp": tmp}


def mcit_answers(exported, kind: str, task: str) -> dict[str, str]:
    return {p["id"]: p["prediction"] for p in exported["mcit"][kind]["predictions"][task]}


def mcit_score(exported, kind: str, task: str) -> float:
    results = exported["mcit"][kind]["results"]
    return dict(zip(results["tasks"], results["matrix"][-1]))[task]


@pytest.mark.slow
def test_full_export_loaded_as_llava_hf_loads_it_generates_mcits_answers(exported):
    """What lmms-eval's llava_hf (chat) does with a folder: AutoConfig, LlavaForConditionalGeneration in the saved
    dtype, AutoProcessor, the processor's chat template over [image, text] content, greedy generate with the
    tokenizer's EOS, decoded without special tokens."""
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    folder = exported["full"]
    assert AutoConfig.from_pretrained(folder).model_type == "llava"
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    eos = processor.tokenizer.eos_token_id
    for task in TASKS:
        answers = {}
        for doc in read_docs(exported["tasks"], exported["names"][task]):
            images = lm.doc_to_visual(doc)
            messages = [{"role": "user", "content": [*({"type": "image", "url": im} for im in images),
                                                     {"type": "text", "text": lm.doc_to_text(doc)}]}]
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = processor(images=images, text=text, return_tensors="pt").to("cpu", model.dtype)
            with torch.no_grad():
                out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                                     pad_token_id=eos, eos_token_id=eos)
            answers[doc["id"]] = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                                  skip_special_tokens=True)[0].strip()
        assert answers == mcit_answers(exported, "full", task), task
        assert any(answers.values())  # the model says something: equal empty answers would prove nothing


@pytest.mark.slow
def test_mcit_model_core_reproduces_mcit_eval_on_a_routed_expert_set(exported):
    import mcit

    answerer = lm.McitAnswerer(*mcit.load(str(exported["experts"])), batch_size=4)
    assert answerer.method.name == "disco"
    for task in TASKS:
        docs = read_docs(exported["tasks"], exported["names"][task])
        requests = [lm.Request(lm.doc_to_text(d), lm.doc_to_visual(d), {"max_new_tokens": MAX_NEW_TOKENS,
                                                                        "until": ["\n\n"]}, d["id"], d["mcit_task"])
                    for d in docs]
        answers = dict(zip([d["id"] for d in docs], answerer.answer(requests)))
        assert answers == mcit_answers(exported, "experts", task), task
        routes = [p["route"] for p in exported["mcit"]["experts"]["predictions"][task]]
        assert all(route is not None for route in routes)  # mcit eval routed these samples
    # what the stage itself predicts: the routed experts, not their merge
    assert mcit_answers(exported, "experts", "shape") != mcit_answers(exported, "full", "shape") or \
        mcit_answers(exported, "experts", "mc-color") != mcit_answers(exported, "full", "mc-color")


# --- lmms-eval itself (only where it is installed) -----------------------------------------------------------------


def run_lmms_eval(exported, command: list[str], model_args: str, name: str) -> dict:
    """lmms-eval as a user runs it, offline; returns {task: (score, {sample id: answer})}."""
    out = exported["tmp"] / f"lmms-{name}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(exported["tmp"] / "hf-home"), "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*command, "--model_args", model_args, "--tasks", "mcit_lmms_check",
                           "--include_path", str(exported["tasks"]), "--batch_size", "1",
                           "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=exported["tmp"])
    log = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, log
    results_files = list(out.rglob("*_results.json"))  # lmms-eval exits 0 after an error too: the files tell
    assert len(results_files) == 1, log
    results_file = results_files[0]
    results = json.loads(results_file.read_text())["results"]
    found = {}
    for task in TASKS:
        name_ = exported["names"][task]
        (samples_file,) = out.rglob(f"*_samples_{name_}.jsonl")
        samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
        answers = {s[lm.METRIC]["id"]: s[lm.METRIC]["prediction"] for s in samples}
        found[task] = (results[name_][f"{lm.METRIC},none"], answers)
    return found


@pytest.mark.slow
def test_lmms_eval_llava_hf_on_the_full_export_agrees_with_mcit_eval(exported):
    _lmms_eval_or_skip()
    lmms_cli = Path(sys.executable).with_name("lmms-eval")
    command = [str(lmms_cli)] if lmms_cli.is_file() else [sys.executable, "-m", "lmms_eval"]
    found = run_lmms_eval(exported, [*command, "--model", "llava_hf"],
                          f"pretrained={exported['full']},device=cpu,device_map=cpu", "llava-hf")
    for task in TASKS:
        score, answers = found[task]
        assert answers == mcit_answers(exported, "full", task), task
        assert score == pytest.approx(mcit_score(exported, "full", task)), task
    assert any(found[task][0] > 0 for task in TASKS)  # equal zeros everywhere would prove little


@pytest.mark.slow
def test_lmms_eval_mcit_model_on_the_expert_set_agrees_with_mcit_eval(exported):
    _lmms_eval_or_skip()
    found = run_lmms_eval(exported, [sys.executable, "-m", "mcit.cli", "lmms-eval", "--model", "mcit"],
                          f"pretrained={exported['experts']}", "mcit")
    for task in TASKS:
        score, answers = found[task]
        assert answers == mcit_answers(exported, "experts", task), task
        assert score == pytest.approx(mcit_score(exported, "experts", task)), task
    assert any(found[task][0] > 0 for task in TASKS)  # equal zeros everywhere would prove little
