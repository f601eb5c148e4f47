"""The uninterrupted reference run the reliability tests compare interrupted runs with (helpers: cli_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.cli_runs import mcit, recipe_for


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, synthcit_root) -> Path:
    """The uninterrupted run (its output folder)."""
    folder = tmp_path_factory.mktemp("reference")
    proc = mcit("train", str(recipe_for(folder, synthcit_root)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder / "stdout.txt").write_text(proc.stdout + proc.stderr)
    return folder / "out"
