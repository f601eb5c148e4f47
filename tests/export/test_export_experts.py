"""`mcit export --experts`: a routed expert set (every expert, the router's prototypes, the method state) that
`mcit.load` and `mcit eval` restore exactly as the run left it, in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mcit.config import load_recipe
from mcit.workflows.train import ContinualRunner
from tests.recipes import write_recipe

pytestmark = pytest.mark.slow


def _mcit(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mcit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_expert_set_export_restores_routed_inference_exactly(synthcit_root, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", synthcit_root, method={"name": "disco", "lora": {"r": 4, "alpha": 8}},
                        train={"batch_size": 16, "lr": 3e-3, "max_steps": 3, "save_steps": 0, "max_length": 160},
                        eval={"batch_size": 32, "max_new_tokens": 8, "zero_shot": False})
    run = ContinualRunner(load_recipe(path)).run().parent
    stage = sorted((run / "checkpoints").glob("stage-*"))[-1]
    out = tmp_path / "exported"
    proc = _mcit("export", str(run), "--experts", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "expert set" in proc.stdout
    copied = out / "checkpoints" / stage.name
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in stage.iterdir())
    assert {"README.md", "PROVENANCE.json", "recipe.yaml", "results.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "PROVENANCE.json").read_text())["artifact"] == "experts"
    assert str(tmp_path) not in (out / "recipe.yaml").read_text()

    env = {"MCIT_SYNTHCIT_ROOT": str(synthcit_root)}
    predictions = {}
    for name, checkpoint in (("stage", stage), ("export", out)):
        result = _mcit("eval", "--checkpoint", str(checkpoint), "--benchmark", "synthcit-mini", "--tasks",
                       "shape,mc-color", "--max-test", "16", "--output", str(tmp_path / f"eval-{name}"),
                       env_extra=env)
        assert result.returncode == 0, result.stderr[-2000:]
        predictions[name] = {task: (tmp_path / f"eval-{name}").rglob(f"{task}.jsonl").__next__().read_text()
                             for task in ("shape", "mc-color")}
        routes = [json.loads(line)["route"] for line in predictions[name]["shape"].splitlines()]
        assert all(r is not None for r in routes)  # predictions were routed
    assert predictions["export"] == predictions["stage"]
    # and both equal what the run itself predicted after its last stage
    for task in ("shape", "mc-color"):
        own = (run / "predictions" / "stage-02" / f"{task}.jsonl").read_text().splitlines()
        got = predictions["export"][task].splitlines()
        assert [json.loads(a)["prediction"] for a in own] == [json.loads(b)["prediction"] for b in got]


def test_experts_cannot_be_combined_with_a_merge(synthcit_root, tmp_path):
    proc = _mcit("export", str(tmp_path), "--experts", "--merge", "linear", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "cannot be combined with --full, --merge" in proc.stderr
