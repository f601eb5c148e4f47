"""`python -m bench --smoke matrix`, run the way a user runs it: the part trains its two runs when they are missing,
times both sides of the whole matrix in a child, keeps its results out of bench/results/, and the report renders
section 3b from them without touching the README."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.common import REPO

pytestmark = pytest.mark.slow


def test_the_matrix_part_end_to_end(tmp_path, synthcit_root):
    readme, report = (REPO / "README.md").read_bytes(), (REPO / "docs" / "BENCHMARKS.md").read_bytes()
    workdir = tmp_path / "work"
    doc = workdir / "smoke" / "BENCHMARKS.md"  # where a smoke run's report goes when no --doc is given
    env = {**os.environ, "MCIT_SYNTHCIT_ROOT": str(synthcit_root)}
    subprocess.run([sys.executable, "-m", "bench", "--smoke", "matrix", "--threads", "1", "--workdir", str(workdir)],
                   cwd=REPO, env=env, check=True, timeout=1800)
    data = json.loads((workdir / "smoke" / "matrix.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["quickstart", "synthcit-6"]
    for run in data["runs"]:
        assert run["compared"] == run["generations_per_side"] > 0
        assert run["identical"] == run["compared"]  # the same answers on both sides
        assert run["sides"]["mcit"]["model_builds"] == 1 < run["sides"]["mcitlib"]["model_builds"]
        assert "predictions" not in run["sides"]["mcit"]  # kept in the child's file only
    text = doc.read_text()
    assert "## 3b. The whole evaluation matrix" in text and "**Smoke run" in text
    assert (REPO / "README.md").read_bytes() == readme  # a smoke run never writes the README's block
    assert (REPO / "docs" / "BENCHMARKS.md").read_bytes() == report  # nor the committed report
