"""Evaluation split over 2 ranks (torchrun, gloo on CPU) gives exactly what one process gives, and each rank
computes only its share."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
SCRIPT = Path(__file__).with_name("eval_shard.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], out: Path) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "results.json").read_text())
    result["predictions"] = {p.stem: p.read_text().splitlines() for p in sorted((out / "predictions").glob("*.jsonl"))}
    return result


def test_two_ranks_evaluate_like_one_process(tmp_path, synthcit_root):
    one = _run([sys.executable, str(SCRIPT), str(synthcit_root), str(tmp_path / "one")], tmp_path / "one")
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_port()), str(SCRIPT), str(synthcit_root), str(tmp_path / "two")], tmp_path / "two")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["results"] == one["results"]
    assert two["predictions"] == one["predictions"]
    assert [r["n"] for r in two["results"]] == [13, 13]
    assert one["results"][1]["constrained"] is not None  # mc-color was ranked too
    shares = [json.loads((tmp_path / "two" / f"generated-rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(len(s) for s in shares) == [12, 14]  # 7 + 6 samples of each task: each rank its own share
    assert not set(shares[0]) & set(shares[1])
