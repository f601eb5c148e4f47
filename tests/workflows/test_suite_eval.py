"""`mcit eval SUITE --checkpoints RUN` as a user runs it: every stage of a run (and its base model, the reference row)
on every suite task, one results.json and a report with plots; killed with SIGKILL mid-way and re-run, it finishes
with the results.json of an uninterrupted evaluation."""

from __future__ import annotations

import json
import os
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
