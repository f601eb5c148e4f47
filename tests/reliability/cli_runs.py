"""`mcit` as a user runs it, for the reliability tests: a fresh process with a hub token in its environment, the one
recipe every kill test runs, and the comparison of a run with the uninterrupted reference run (conftest.py builds
that one). A fixture module, imported by tests; it holds no tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.recipes import write_recipe

# A made-up token with the shape of a real one: every reliability run carries it in its environment, and
# test_secrets.py greps everything those runs wrote for it.
FAKE_TOKEN = "hf_fakeReliabilityToken0123456789abcdef"


def mcit(*args: str, failpoint: str | None = None, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`python -m mcit.cli ARGS` in a fresh process with the hub token set (and a failpoint, when given)."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_TOKEN": FAKE_TOKEN, **env}
    full.pop("MCIT_FAILPOINT", None)
    if failpoint:
        full["MCIT_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "mcit.cli", *args], capture_output=True, text=True, env=full,
                          timeout=timeout)


def comparable(results: Any) -> Any:
    """results.json without wall-clock fields (`timing`, any `seconds`): everything the seed determines."""
    if isinstance(results, dict):
        return {k: comparable(v) for k, v in results.items() if k not in ("timing", "seconds")}
    if isinstance(results, list):
        return [comparable(v) for v in results]
    return results


def recipe_for(folder: Path, root: Path) -> Path:
    """The one recipe every kill test runs: 2 SynthCIT tasks x 4 steps, a step checkpoint at step 2 of each."""
    return write_recipe(folder / "recipe.yaml", root, output_dir=folder / "out")


def same_run(reference: Path, out: Path) -> None:
    """Assert that `out` holds the same results and predictions as the uninterrupted `reference`."""
    a = json.loads((reference / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert comparable(b) == comparable(a)
    assert all(row is not None for row in b["matrix"])
    for stage in ("stage-00", "stage-01", "stage-02"):
        for task in ("shape", "mc-color"):
            assert (out / "predictions" / stage / f"{task}.jsonl").read_bytes() == \
                (reference / "predictions" / stage / f"{task}.jsonl").read_bytes(), (stage, task)
