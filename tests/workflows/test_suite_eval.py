"""`mcit eval SUITE --checkpoints RUN` as a user runs it: every stage of a run (and its base model, the reference row)
on every suite task, one results.json and a report with plots; killed with SIGKILL mid-way and re-run, it finishes
with the results.json of an uninterrupted evaluation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.recipes import write_recipe

pytestmark = pytest.mark.slow


def _mcit(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mcit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def run_and_suite(tmp_path_factory, synthcit_root):
    folder = tmp_path_factory.mktemp("suite-run")
    recipe = write_recipe(folder / "r.yaml", synthcit_root, output_dir=folder / "run",
                          benchmark={"max_train": 32, "max_test": 8}, train={"max_steps": 2, "save_steps": 0},
                          eval={"zero_shot": False})
    proc = _mcit("train", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    suite = folder / "suite.yaml"
    suite.write_text("name: mini-heldout\ndescription: two tasks the run never trained\n"
                     "generation: {max_new_tokens: 8, batch_size: 16}\n"
                     "tasks:\n  - {card: synthcit-mini, task: count}\n  - {card: synthcit-mini, task: mc-shape}\n")
    return folder / "run", suite, {"MCIT_SYNTHCIT_ROOT": str(synthcit_root)}


def test_every_stage_and_the_base_on_every_task_with_a_report(run_and_suite, tmp_path):
    run, suite, env = run_and_suite
    out = tmp_path / "out"
    proc = _mcit("eval", str(suite), "--checkpoints", str(run), "--output", str(out), "--max-test", "6",
                 env_extra=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoints"] == ["run/base", "run/stage-01-shape", "run/stage-02-mc-color"]
    assert results["tasks"] == ["count", "mc-shape"] and results["n"] == {"count": 6, "mc-shape": 6}
    for column in ("score", "format", "superficial", "essential", "constrained"):
        assert len(results[column]) == 3 and all(len(row) == 2 for row in results[column])
    retention = results["retention"]["run"]
    assert retention["base"] == "run/base"
    for label, drops in retention["per_task"].items():  # stage score minus base score, computed from the grid
        k = results["checkpoints"].index(label)
        assert drops == pytest.approx([results["score"][k][j] - results["score"][0][j] for j in range(2)])
    for name in ("report.html", "report.md", "suite_heatmap.png", "suite_curves_run.png"):
        assert (out / name).is_file()
    assert len((out / "predictions" / "run_stage-01-shape" / "count.jsonl").read_text().splitlines()) == 6


def test_a_killed_evaluation_resumes_to_the_same_results(run_and_suite, tmp_path):
    run, suite, env = run_and_suite
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["eval", str(suite), "--checkpoints", str(run), "--max-test", "6"]
    assert _mcit(*args, "--output", str(whole), env_extra=env).returncode == 0
    proc = _mcit(*args, "--output", str(killed), env_extra={**env, "MCIT_FAILPOINT": "suite.cell:3"})
    assert proc.returncode == -9  # SIGKILL after the third cell
    assert len(list((killed / "cells").rglob("*.json"))) == 3 and not (killed / "results.json").exists()
    proc = _mcit(*args, "--output", str(killed), env_extra=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run/base: every task already evaluated" in proc.stderr
    assert (killed / "results.json").read_text() == (whole / "results.json").read_text()


def test_a_damaged_cell_is_named(run_and_suite, tmp_path):
    run, suite, env = run_and_suite
    out = tmp_path / "out"
    cell = out / "cells" / "run_base" / "count.json"
    cell.parent.mkdir(parents=True)
    cell.write_text('{"task": "count", "sco')
    proc = _mcit("eval", str(suite), "--checkpoints", str(run), "--output", str(out), env_extra=env)
    assert proc.returncode != 0
    assert "count.json: an unreadable result cell" in proc.stderr and "delete it" in proc.stderr


def test_suite_and_single_checkpoint_arguments_do_not_mix(tmp_path):
    proc = _mcit("eval", "synthcit-heldout", "--checkpoint", "x", "--benchmark", "y")
    assert proc.returncode != 0 and "not a mix" in proc.stderr


def test_an_output_folder_of_another_evaluation_is_refused(run_and_suite, tmp_path):
    run, suite, env = run_and_suite
    out = tmp_path / "out"
    args = ["eval", str(suite), "--checkpoints", str(run), "--output", str(out)]
    assert _mcit(*args, "--max-test", "4", env_extra={**env, "MCIT_FAILPOINT": "suite.cell:1"}).returncode == -9
    proc = _mcit(*args, "--max-test", "6", env_extra=env)  # the kept cell scored 4 samples, not 6
    assert proc.returncode != 0
    assert "run_base/count.json: this output folder holds a cell of a different evaluation (task changed" in proc.stderr
    assert "pass another --output" in proc.stderr


def test_the_run_files_the_suite_and_its_report_shows_the_retention(run_and_suite, tmp_path):
    run, suite, env = run_and_suite
    out = tmp_path / "out"
    assert _mcit("eval", str(suite), "--checkpoints", str(run), "--output", str(out), "--max-test", "6",
                 env_extra=env).returncode == 0
    results = json.loads((out / "results.json").read_text())
    filed = json.loads((run / "suites" / "mini-heldout.json").read_text())
    assert filed["checkpoints"] == ["base", "stage-01-shape", "stage-02-mc-color"]
    assert filed["score"] == results["score"] and filed["retention"] == results["retention"]["run"]
    assert filed["evaluation"] == str(out.resolve())
    proc = _mcit("report", str(run), "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Suite mini-heldout" in report and "Δ count" in report
    last = results["retention"]["run"]["mean"]["run/stage-02-mc-color"]
    assert f"| stage-02-mc-color | {_fmt(results['retention']['run']['per_task']['run/stage-02-mc-color'][0])}" in report
    assert _fmt(last) in report
    assert (tmp_path / "report" / "suite_mini-heldout.png").is_file()


def _fmt(value):
    from mcit.report.render import fmt

    return fmt(value)


@pytest.mark.distributed
def test_a_launched_evaluation_splits_the_samples_and_gives_the_same_results(run_and_suite, tmp_path):
    """`mcit launch --cpu eval SUITE --checkpoints RUN`: two gloo ranks under the deepspeed launcher, each generating
    its share of every cell, write the results.json of one process, byte for byte."""
    run, suite, env = run_and_suite
    args = ["eval", str(suite), "--checkpoints", str(run), "--max-test", "5"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert _mcit(*args, "--output", str(one), env_extra=env).returncode == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    proc = _mcit("launch", "--cpu", "--nproc", "2", "--master-port", port, *args, "--output", str(two),
                 env_extra={**env, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "--module mcit eval" in proc.stderr
    assert (two / "results.json").read_text() == (one / "results.json").read_text()
    for path in (one / "predictions").rglob("*.jsonl"):
        assert (two / path.relative_to(one)).read_text() == path.read_text()


def test_exported_expert_sets_and_adapters_are_rows_like_the_stage_they_came_from(run_and_suite, tmp_path):
    """Every checkpoint kind in one evaluation: the expert set and the PEFT adapter exported from the last stage score
    what that stage scores (the same weights), next to a bare base model."""
    run, suite, env = run_and_suite
    assert _mcit("export", str(run), "--out", str(tmp_path / "experts"), "--experts").returncode == 0
    assert _mcit("export", str(run), "--out", str(tmp_path / "adapter")).returncode == 0
    out = tmp_path / "out"
    proc = _mcit("eval", str(suite), "--checkpoints", str(run), str(tmp_path / "experts"), str(tmp_path / "adapter"),
                 "builtin:tiny-llava", "--output", str(out), "--max-test", "6", env_extra=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    labels = results["checkpoints"]
    assert labels[3:] == ["experts", "adapter", "builtin:tiny-llava"]
    row = {label: results["score"][k] for k, label in enumerate(labels)}
    assert row["experts"] == row["run/stage-02-mc-color"]
    assert row["adapter"] == row["run/stage-02-mc-color"]
    assert row["builtin:tiny-llava"] == row["run/base"]
    assert set(results["retention"]) == {"run"}  # only a run's rows have a base to be measured against


def test_the_general_suite_on_its_release_shaped_fixtures(tmp_path):
    """`mcit eval general` as a user runs it, on data laid out as LLaVA's playground/data/eval: every benchmark is
    read from its official files and scored by its own metric (MME's perception/cognition sums, MMBench's circular
    questions, POPE's confusion counts)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "fixtures" / "releases" / "general"
    out = tmp_path / "out"
    proc = _mcit("eval", "general", "--checkpoints", "builtin:tiny-llava", "--output", str(out), "--max-test", "4",
                 env_extra={"MCIT_GENERAL_ROOT": str(root), "MCIT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["MME", "MMBench", "POPE-random", "POPE-popular", "POPE-adversarial", "SEED-Bench",
                                "ScienceQA-IMG", "TextVQA", "GQA"]
    details = results["details"]["builtin:tiny-llava"]
    assert details["MME"]["total"] == details["MME"]["perception"] + details["MME"]["cognition"]
    assert details["MMBench"]["copies_per_question"] and details["MMBench"]["questions"] >= 1
    pope = details["POPE-random"]
    assert pope["TP"] + pope["FP"] + pope["TN"] + pope["FN"] == results["n"]["POPE-random"] == 4
    precision, recall = pope["TP"] / max(pope["TP"] + pope["FP"], 1), pope["TP"] / max(pope["TP"] + pope["FN"], 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    assert results["score"][0][2] == pytest.approx(100 * f1) == pytest.approx(pope["f1"])
    assert list((tmp_path / "cache" / "mmbench").rglob("manifest.json"))  # the TSV's images, decoded once
