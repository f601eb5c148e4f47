"""Section 3b of docs/BENCHMARKS.md and the README's matrix clause, rendered from a stored matrix part."""

from __future__ import annotations

import json

from bench import report


def _side(seconds: float, builds: int) -> dict:
    return {"seconds": seconds, "load_seconds": {"stage-01": 1.0, "stage-02": 2.0},
            "generation_seconds": {"stage-01": seconds / 2 - 1, "stage-02": seconds / 2 - 2}, "model_builds": builds}


def _run(name: str, ratio: float, identical: int) -> dict:
    return {"name": name, "run": f"runs/bench/matrix/{name}", "method": "lora_ft", "checkpoints": ["s1", "s2"],
            "tasks": ["shape", "count"], "generations_per_side": 40, "sides": {"mcitlib": _side(10 * ratio, 2),
                                                                                 "mcit": _side(10.0, 1)},
            "ratio": ratio, "identical": identical, "compared": 40, "identical_scores": 4, "cells_compared": 4,
            "differences": [] if identical == 40 else [{"checkpoint": "s2", "task": "count", "id": "7",
                                                        "mcitlib": "3", "mcit": "4"}]}


def test_the_matrix_section_states_ratio_goal_and_agreement(tmp_path):
    (tmp_path / "matrix.json").write_text(json.dumps({"runs": [_run("quickstart", 12.5, 40),
                                                               _run("synthcit-6", 4.0, 39)]}))
    text = report.write_report(tmp_path, tmp_path / "BENCHMARKS.md").read_text()
    assert "| quickstart (`runs/bench/matrix/quickstart`) | lora_ft | 2 × 2 | 40 | 125.0 (3.0 / 122.0) | 10.0 (3.0 / 7.0) | **12.5** |" in text
    assert "- quickstart: **12.5×** (goal ≥ 10×: met); the MCITlib-style side built 2 models, mcit 1." in text
    assert "- synthcit-6: **4.0×** (goal ≥ 10×: not met)" in text
    assert "| 39 / 40 | 4 / 4 |" in text and "differs at s2 / count / 7: '3' against '4'" in text
    assert "4.0× an MCITlib-style evaluation for synthcit-6 (39 / 40 identical answers)" in " ".join(
        report.headline(tmp_path))
