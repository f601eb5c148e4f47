"""The continual runner as a user runs it: `mcit train` in a subprocess, killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.recipes import write_recipe

pytestmark = pytest.mark.slow


def _mcit(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mcit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, **kwargs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthcit_root):
    folder = tmp_path_factory.mktemp("run-a")
    recipe = write_recipe(folder / "r.yaml", synthcit_root, output_dir=folder / "out")
    proc = _mcit("train", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "out", proc


def test_results_schema_and_files(finished_run):
    out, proc = finished_run
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["shape", "mc-color"]
    assert results["stages"] == ["zero-shot", "shape", "mc-color"]
    assert len(results["matrix"]) == 3 and all(len(row) == 2 for row in results["matrix"])
    assert all(0 <= v <= 100 for row in results["matrix"] for v in row)
    assert set(results["metrics"]) >= {"MFT", "MFN", "MAA", "BWT"}
    assert results["method"] == "lora_ft" and results["recipe"] == "test"
    # the numbers are computed from the matrix, not copied: MFN is the mean of the last row
    assert results["metrics"]["MFN"] == pytest.approx(sum(results["matrix"][-1]) / 2)
    for stage in ("stage-01", "stage-02"):
        lines = (out / "predictions" / stage / "shape.jsonl").read_text().splitlines()
        assert len(lines) == 16
        assert {"id", "prediction", "reference", "label"} <= set(json.loads(lines[0]))
    assert (out / "recipe.yaml").is_file() and json.loads((out / "env.json").read_text())["world_size"] == 1
    assert (out / "report" / "report.html").is_file()
    assert "report" in proc.stdout
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert "train" in events and "eval" in events
    assert any((out / "tb").iterdir())
    timing = json.loads((out / "timing.json").read_text())
    for label, folder in (("shape", "stage-01-shape"), ("mc-color", "stage-02-mc-color")):
        files = [f for f in (out / "checkpoints" / folder).rglob("*") if f.is_file()]
        assert timing["storage"][label]["checkpoint_bytes"] == sum(f.stat().st_size for f in files)
        assert timing["storage"][label]["trainable_parameters"] > 0
        assert timing["train"][label]["peak_rss_mb"] > 100
        assert set(timing["eval"][label]) == {"shape", "mc-color"}


def test_stage_adapter_loads_with_plain_peft(finished_run):
    from peft import PeftModel
    from safetensors.torch import load_file

    from mcit.config import ModelConfig
    from mcit.models.loading import load_base

    out, _ = finished_run
    stage = out / "checkpoints" / "stage-02-mc-color"
    assert (stage / "MANIFEST.json").is_file()
    model, _ = load_base(ModelConfig())
    peft_model = PeftModel.from_pretrained(model, str(stage / "adapter"))
    saved = load_file(str(stage / "model.safetensors"))
    name = next(k for k in saved if "lora_B" in k)
    assert saved[name].abs().sum() > 0  # trained, not the zero init
    loaded = dict(peft_model.named_parameters())[name]
    assert loaded.shape == saved[name].shape and bool((loaded == saved[name]).all())


def _wait_for(path: Path, predicate, proc, timeout=300) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the kill point:\n{proc.stderr.read()[-3000:]}")
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if predicate(json.loads(line)):
                        return
                except ValueError:
                    continue
        time.sleep(0.2)
    raise AssertionError("kill point never reached")


def test_kill9_mid_task_then_resume_gives_identical_results(finished_run, tmp_path, synthcit_root):
    reference, _ = finished_run
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", synthcit_root, output_dir=out)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mcit.cli", "train", str(recipe)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # task 2 (mc-color), after its first step checkpoint (save_steps=2) and before the task ends
    _wait_for(out / "log.jsonl", lambda r: r.get("event") == "train" and r["task"] == "mc-color" and r["step"] == 3,
              proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "stage-02-mc-color").exists()
    assert (out / "checkpoints" / "last-step" / "MANIFEST.json").is_file()
    resumed = _mcit("train", str(recipe))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    timing = json.loads((out / "timing.json").read_text())
    assert timing["train"]["mc-color"]["resumed_from"] == 2
    # wall-clock numbers live in timing.json, so results.json is identical to the byte
    assert (reference / "results.json").read_bytes() == (out / "results.json").read_bytes()
    for stage in ("stage-00", "stage-01", "stage-02"):
        assert (reference / "predictions" / stage / "mc-color.jsonl").read_text() == \
            (out / "predictions" / stage / "mc-color.jsonl").read_text()


def test_half_written_checkpoint_is_never_loaded(finished_run, tmp_path, synthcit_root):
    """A kill during a checkpoint write leaves a folder without a manifest: the rerun retrains that stage."""
    import shutil

    reference, _ = finished_run
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "recipe.yaml").unlink()  # the copy lives at another output_dir
    stage = out / "checkpoints" / "stage-02-mc-color"
    (stage / "MANIFEST.json").unlink()
    (stage / "model.safetensors").write_bytes(b"garbage")
    results = json.loads((out / "results.json").read_text())
    results["matrix"][2] = None
    (out / "results.json").write_text(json.dumps(results))
    (out / "checkpoints" / ".stage-03-x.tmp-123").mkdir()  # debris of a killed writer
    recipe = write_recipe(tmp_path / "r.yaml", synthcit_root, output_dir=out)
    proc = _mcit("train", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text()) == json.loads((reference / "results.json").read_text())
    assert not (out / "checkpoints" / ".stage-03-x.tmp-123").exists()


def test_changed_recipe_refuses_the_old_run_folder(finished_run, tmp_path, synthcit_root):
    out, _ = finished_run
    recipe = write_recipe(tmp_path / "r.yaml", synthcit_root, output_dir=out, train={"lr": 5e-4})
    proc = _mcit("train", str(recipe))
    assert proc.returncode == 2
    assert "different recipe" in proc.stderr and "train.lr" in proc.stderr
