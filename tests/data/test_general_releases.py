"""The `general` card against a tree that mirrors LLaVA's playground/data/eval/ with each benchmark's official files
(tests/fixtures/releases/general): the layout is found from MCIT_GENERAL_ROOT alone, every reader turns its official
file into the questions LLaVA-1.5 asks, each task scores as its official evaluation through the scorer registry, and
a broken file is an error naming the file, the record and the line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mcit.data.cards import load_card
from mcit.data.formats import RecordError, load_split
from mcit.data.releases import MME_SUBTASKS, cache_dir
from mcit.data.validate import validate_card
from mcit.errors import DataError
from mcit.evaluation import get_scorer
from mcit.evaluation.general import MME_COGNITION, MME_PERCEPTION
from mcit.evaluation.suites import load_suite

GENERAL = Path(__file__).resolve().parents[1] / "fixtures" / "releases" / "general"
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path):
    """Every test decodes MMBench's images into its own cache, never into the user's."""
    monkeypatch.setenv("MCIT_CACHE", str(tmp_path / "cache"))


def _card(monkeypatch, root: Path = GENERAL):
    monkeypatch.setenv("MCIT_GENERAL_ROOT", str(root))
    return load_card("general")


def _copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(GENERAL, tmp_path / "eval"))


def _score(card, task: str, predictions: list[str] | None = None):
    """The task's samples scored by the scorer its card names, configured as the card configures it (what
    mcit.evaluation.evaluate does); perfect predictions by default."""
    spec = card.task(task)
    samples = card.load_task(task, "test")
    predictions = [s.answer for s in samples] if predictions is None else predictions
    scorer = get_scorer(spec.scorer, **spec.scorer_options)
    return samples, scorer(predictions, [s.answer for s in samples], [s.meta for s in samples])


def test_the_card_finds_the_llava_tree_from_its_variable_and_validates(monkeypatch):
    card = _card(monkeypatch)
    assert card.layout_in_use().name == "llava-eval"
    report = validate_card(card, splits=("test",))
    assert report.ok, report.format()
    seed = json.loads((GENERAL / "seed_bench" / "SEED-Bench.json").read_text())["questions"]
    problems = json.loads((GENERAL / "scienceqa" / "problems.json").read_text())
    test_pids = json.loads((GENERAL / "scienceqa" / "pid_splits.json").read_text())["test"]
    expected = {
        "SEED-Bench": sum(q["data_type"] == "image" for q in seed),
        "ScienceQA-IMG": sum(problems[p]["image"] is not None for p in test_pids),
        "MMBench": len((GENERAL / "mmbench" / "mmbench_dev_20230712.tsv").read_text().splitlines()) - 1,
        "MME": 2 * len(list((GENERAL / "MME").rglob("*.txt"))),
    }
    for task, n in expected.items():
        assert report.counts[f"{task}/test"] == n, task
    for task in card.task_names:
        suffix = LETTER if card.task(task).answer_style == "letter" else SHORT
        for sample in card.load_task(task, "test"):
            assert sample.turns[0][0].startswith("<image>\n") and Path(sample.image).is_file(), (task, sample.id)
            assert sample.question.endswith("\n" + suffix), (task, sample.question)


def test_every_task_scores_100_for_perfect_answers_and_mme_200_per_subtask(monkeypatch):
    card = _card(monkeypatch)
    for task in card.task_names:
        _, result = _score(card, task)
        assert result.score == pytest.approx(100.0), task
    _, mme = _score(card, "MME")
    subtasks = mme.details["subtasks"]
    assert set(subtasks) == {"existence", "code_reasoning", "artwork", "scene"}  # both sub-layouts read
    assert all(s["score"] == 200.0 for s in subtasks.values())
    assert (mme.details["perception"], mme.details["cognition"]) == (600.0, 200.0)


def test_mme_questions_are_llava_15s_and_acc_plus_pairs_an_images_two_questions(monkeypatch):
    card = _card(monkeypatch)
    samples = card.load_task("MME", "test")
    first = samples[0]
    assert first.meta["source"]["question"].endswith("Please answer yes or no.")
    assert "Please answer" not in first.question  # replaced by the short-answer instruction, as LLaVA-1.5 does
    artwork = [s for s in samples if s.meta["category"] == "artwork"]
    assert [Path(s.image).parent.name for s in artwork] == ["images"] * 4
    predictions = [("No" if s is artwork[0] else s.answer) for s in samples]  # one wrong answer on one image
    _, result = _score(card, "MME", predictions)
    assert result.details["subtasks"]["artwork"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert result.details["perception"] == 600.0 - 75.0


def test_mme_subtasks_nested_under_mme_benchmark_and_any_subtask_in_either_arrangement(monkeypatch, tmp_path):
    root = _copy(tmp_path)
    release = root / "MME" / "MME_Benchmark_release_version"
    nested = release / "MME_Benchmark"
    nested.mkdir()
    for sub in [p for p in release.iterdir() if p.name != "MME_Benchmark"]:
        sub.rename(nested / sub.name)
    code = nested / "code_reasoning"  # a cognition subtask rearranged as images/ + questions_answers_YN/
    (code / "images").mkdir()
    (code / "questions_answers_YN").mkdir()
    for path in list(code.iterdir()):
        if path.is_file():
            path.rename(code / ("questions_answers_YN" if path.suffix == ".txt" else "images") / path.name)
    moved = {s.id: (s.question, s.answer) for s in _card(monkeypatch, root).load_task("MME", "test")}
    assert moved == {s.id: (s.question, s.answer) for s in _card(monkeypatch).load_task("MME", "test")}


def test_mmbench_rows_are_read_as_published_and_one_wrong_rotation_fails_its_question(monkeypatch):
    card = _card(monkeypatch)
    samples = card.load_task("MMBench", "test")
    copies = [s for s in samples if s.meta["index"] % 1_000_000 == 7]
    assert [s.meta["index"] for s in copies] == [7, 1_000_007, 2_000_007, 3_000_007]
    assert copies[1].meta["choices"] == copies[0].meta["choices"][1:] + copies[0].meta["choices"][:1]
    right = {s.meta["choices"]["ABCD".index(s.answer)] for s in copies}
    assert right == {"red"}  # every copy's answer letter points at the same option text
    hinted = next(s for s in samples if s.meta["index"] == 12)
    assert hinted.question.startswith("The picture shows a plate on a table.\nWhich word")
    assert '"round"' in hinted.question  # a quoted TSV field read as pandas reads it

    base_letter = copies[0].answer
    predictions = [base_letter if s is copies[2] else s.answer for s in samples]  # the base copy's letter, rotated
    _, result = _score(card, "MMBench", predictions)
    questions = result.details["questions"]
    assert questions == len({s.meta["index"] % 1_000_000 for s in samples})
    assert result.score == pytest.approx(100.0 * (questions - 1) / questions)
    assert result.details["vanilla"] == pytest.approx(100.0 * (len(samples) - 1) / len(samples))
    assert [result.per_sample[samples.index(s)] for s in copies] == [0.0] * 4


def test_mmbench_images_are_decoded_once_into_a_content_addressed_cache(monkeypatch):
    card = _card(monkeypatch)
    samples = card.load_task("MMBench", "test")
    folders = [p for p in (cache_dir() / "mmbench").iterdir()]
    assert len(folders) == 1 and (folders[0] / "manifest.json").is_file()  # no temporary folder left behind
    images = sorted(p.name for p in folders[0].iterdir() if p.name != "manifest.json")
    assert len(images) == len({s.meta["index"] % 1_000_000 for s in samples})  # rotated copies share one image
    assert {Path(s.image).name for s in samples} == set(images)
    assert card.image_root("MMBench") in Path(samples[0].image).parents  # validation confines images there
    stamps = {p: p.stat().st_mtime_ns for p in folders[0].iterdir()}

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache holds the images")

    monkeypatch.setattr("mcit.data.releases._decode_mmbench_image", no_decoding)
    again = card.load_task("MMBench", "test")
    assert [s.image for s in again] == [s.image for s in samples]
    assert {p: p.stat().st_mtime_ns for p in folders[0].iterdir()} == stamps


def test_a_sample_limit_keeps_an_mme_image_and_an_mmbench_question_whole(monkeypatch):
    card = _card(monkeypatch)
    for spec in card.tasks:
        spec.max_test = 5
    mme = card.load_task("MME", "test")
    mmbench = card.load_task("MMBench", "test")
    assert 0 < len(mme) <= 5 and 0 < len(mmbench) <= 5
    for samples, key in ((mme, lambda s: s.meta["image_id"]), (mmbench, lambda s: s.meta["index"] % 1_000_000)):
        kept = {key(s) for s in samples}
        whole = [s for s in _card(monkeypatch).load_task(samples[0].task, "test") if key(s) in kept]
        assert [s.id for s in samples] == [s.id for s in whole], samples[0].task
    assert _score(card, "MME")[1].score == pytest.approx(100.0)  # every kept image still has both questions


def test_pope_is_three_tasks_scored_by_f1_from_the_confusion_matrix(monkeypatch):
    card = _card(monkeypatch)
    for task in ("POPE-random", "POPE-popular", "POPE-adversarial"):
        assert {s.meta["category"] for s in card.load_task(task, "test")} == {task.split("-")[1]}
    samples = card.load_task("POPE-adversarial", "test")
    assert [s.answer for s in samples] == ["yes", "no", "yes", "no"]
    predictions = ["Yes, there is a snowboard.", "There is a skis in the image.", "Yes", "No, there is not."]
    _, result = _score(card, "POPE-adversarial", predictions)
    d = result.details
    assert (d["TP"], d["FP"], d["TN"], d["FN"]) == (2, 1, 1, 0)  # the second answer has no "no" word: a yes
    precision, recall = 2 / 3, 1.0
    assert result.score == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    assert d["accuracy"] == pytest.approx(75.0) and d["yes_ratio"] == pytest.approx(75.0)


def test_seed_scienceqa_textvqa_gqa_records_and_their_scoring(monkeypatch):
    card = _card(monkeypatch)
    seed = card.load_task("SEED-Bench", "test")
    assert "v1738" not in {s.id for s in seed}  # the video question is left out
    assert all(s.meta["choices"] == ["One", "Two", "Three", "Four"] and 1 <= s.meta["question_type_id"] <= 9
               for s in seed)
    _, result = _score(card, "SEED-Bench", ["A", "B", "D"])
    assert result.per_sample == [float(s.answer == p) for s, p in zip(seed, ["A", "B", "D"])]

    science = {s.id: s for s in card.load_task("ScienceQA-IMG", "test")}
    assert set(science) == {"7", "12"}  # "15" has no image, "3" is a training problem
    assert science["7"].question.startswith("Context: The map shows four states.\nWhich of these")
    assert science["12"].question.startswith("Which property") and "\nC. opaque\n" in science["12"].question
    assert (science["7"].answer, science["12"].answer) == ("A", "C")
    assert science["12"].image.endswith("images/test/12/image.png")

    textvqa = card.load_task("TextVQA", "test")
    assert [len(s.meta["references"]) for s in textvqa] == [10, 10, 10]
    assert textvqa[0].question.startswith("What is the brand")  # capitalised as LLaVA's question file
    _, result = _score(card, "TextVQA", ["Dakota Digital", "stop sign", "twenty three"])
    # 3, 4 and 1 of the ten humans gave these answers; VQA accuracy = mean over leave-one-out of min(1, matches / 3)
    assert result.per_sample == pytest.approx([(3 * 2 / 3 + 7) / 10, 1.0, (9 * 1 / 3) / 10])

    _, result = _score(card, "GQA", ["Yes.", "White", "The fence is on the left."])
    assert result.per_sample == [1.0, 1.0, 0.0]  # GQA: lower-cased, trailing periods dropped, then exact


def test_a_missing_file_names_the_task_file_and_partial_downloads_run(monkeypatch, tmp_path):
    root = _copy(tmp_path)
    (root / "pope" / "coco" / "coco_pope_random.json").unlink()
    shutil.rmtree(root / "MME")
    card = _card(monkeypatch, root)
    with pytest.raises(DataError) as err:
        card.load_task("GQA", "test")
    message = str(err.value)
    assert "missing MME/MME_Benchmark_release_version, pope/coco/coco_pope_random.json" in message
    assert "the root holds:" in message
    assert len(_card(monkeypatch, root).select(["GQA", "POPE-popular"]).load_task("GQA", "test")) == 3
    with pytest.raises(RecordError, match=r"coco_pope_random.json: annotation file not found"):
        load_split(root / "pope" / "coco" / "coco_pope_random.json", fmt="pope")


def test_a_broken_tsv_row_is_named_by_file_row_and_line(monkeypatch, tmp_path):
    root = _copy(tmp_path)
    tsv = root / "mmbench" / "mmbench_dev_20230712.tsv"
    lines = tsv.read_text().splitlines()
    lines[3] = "\t".join(lines[3].split("\t")[:-2])  # data row 2 loses its last two fields
    fields = lines[5].split("\t")
    fields[9] = "not base64!"
    lines[5] = "\t".join(fields)  # data row 4: the image cell is not base64
    tsv.write_text("\n".join(lines) + "\n")
    card = _card(monkeypatch, root)
    with pytest.raises(RecordError, match=r"mmbench_dev_20230712.tsv: sample 2 \(line 4\): 12 tab-separated fields, "
                                          r"the header has 14 \(and 1 more problems"):
        card.load_task("MMBench", "test")
    report = validate_card(card.select(["MMBench"]), splits=("test",))
    assert [(p.index, p.line, p.kind) for p in report.problems] == [(2, 4, "malformed"), (4, 6, "unreadable_image")]
    assert "'image' is not base64" in report.problems[1].message


def test_an_mme_line_without_a_tab_is_named_by_file_and_line(monkeypatch, tmp_path):
    root = _copy(tmp_path)
    txt = root / "MME" / "MME_Benchmark_release_version" / "existence" / "000000006471.txt"
    first, second = txt.read_text().splitlines()
    txt.write_text(first + "\n" + second.replace("\t", " ") + "\n")
    with pytest.raises(RecordError, match=r"existence/000000006471.txt: sample 1 \(line 2\): no tab in the line; MME "
                                          r"question files hold `question<TAB>Yes\|No`"):
        _card(monkeypatch, root).load_task("MME", "test")


def test_other_malformed_release_records_name_the_record_and_key(monkeypatch, tmp_path):
    root = _copy(tmp_path)
    seed_path = root / "seed_bench" / "SEED-Bench.json"
    seed = json.loads(seed_path.read_text())
    del seed["questions"][1]["data_id"]
    seed_path.write_text(json.dumps(seed))
    pope = root / "pope" / "coco" / "coco_pope_popular.json"
    lines = pope.read_text().splitlines()
    lines[2] = lines[2].replace('"label": "yes"', '"label": "maybe"')
    pope.write_text("\n".join(lines) + "\n")
    card = _card(monkeypatch, root)
    with pytest.raises(RecordError, match=r"SEED-Bench.json: sample 1: questions\[1\]: an image question needs .*"
                                          r"\(missing or empty: data_id\)"):
        card.load_task("SEED-Bench", "test")
    with pytest.raises(RecordError, match=r"coco_pope_popular.json: sample 2 \(line 3\): \"label\" must be \"yes\" "
                                          r"or \"no\", got 'maybe'"):
        card.load_task("POPE-popular", "test")


def test_the_general_suite_loads_and_resolves_to_every_card_task(monkeypatch):
    suite = load_suite(Path(__file__).resolve().parents[2] / "eval" / "general.yaml")
    card = _card(monkeypatch)
    resolved = suite.resolve()
    assert [task for _, task in resolved] == card.task_names == suite.task_names()
    one, task = resolved[1]
    assert (one.name, task, one.task(task).scorer) == ("general", "MMBench", "mmbench")
    assert len(one.load_task(task, "test")) == len(card.load_task("MMBench", "test"))


def test_mme_subtask_names_are_the_scorers():
    assert MME_SUBTASKS == MME_PERCEPTION + MME_COGNITION
