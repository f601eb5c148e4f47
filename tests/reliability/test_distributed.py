"""Distributed failures under 2-process DeepSpeed ZeRO-3 on CPU (gloo), launched as a user launches: `mcit launch`.

An exception on one rank ends the whole job with a non-zero exit and the error message, within 60 s of the failure
(not after the process-group timeout): the failing rank exits at once (`exit_on_error`) and the launcher ends the
other one, which is waiting in a collective. (Micro-batches where one rank has no image are covered by
tests/distributed/test_deepspeed_cpu.py: at ZeRO-3 rank 1 gets an image-less micro-batch every fifth step.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.recipes import write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(recipe: Path, failpoint: str | None = None, timeout: float = 300) -> tuple[int, list[tuple[float, str]],
                                                                                         float]:
    """Run `mcit launch --cpu --nproc 2`; returns (exit code, timestamped output lines, end time)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MCIT_DIST_TIMEOUT_S": "240"}  # a hang would outlive the 60 s bound, not end the test at 10 min
    env.pop("MCIT_FAILPOINT", None)
    if failpoint:
        env["MCIT_FAILPOINT"] = failpoint
    cmd = [sys.executable, "-m", "mcit.cli", "launch", str(recipe), "--nproc", "2", "--cpu",
           "--master-port", str(_port())]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # one process group: launcher and ranks end together
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the launched job hung:\n" + "\n".join(t for _, t in lines[-40:])) from None
    ended = time.time()
    reader.join(timeout=10)
    return code, lines, ended


def test_an_exception_on_one_rank_ends_the_job_within_60_s(tmp_path, synthcit_root) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", synthcit_root, output_dir=tmp_path / "out",
                          train={"batch_size": 8, "save_steps": 0, "deepspeed": "zero3"},
                          eval={"batch_size": 32, "max_new_tokens": 8, "zero_shot": False})
    code, lines, ended = _launch(recipe, failpoint="train.step:3@rank1:raise")
    text = "\n".join(t for _, t in lines)
    assert code != 0, text[-3000:]
    failed_at = next((t for t, line in lines if "injected failure at failpoint train.step (hit 3, rank 1)" in line),
                     None)
    assert failed_at is not None, text[-3000:]
    assert "[mcit rank 1/2] fatal error" in text
    assert ended - failed_at < 60, f"the job took {ended - failed_at:.0f} s to end after rank 1 failed"
    assert not (tmp_path / "out" / "checkpoints" / "stage-01-shape").exists()


def test_sigterm_to_mcit_launch_ends_every_rank(tmp_path, synthcit_root) -> None:
    """A scheduler cancelling the job signals the wrapper only; the launcher and both ranks must end too."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", synthcit_root, output_dir=out,
                          train={"batch_size": 8, "save_steps": 0, "deepspeed": "zero2"},
                          eval={"batch_size": 32, "max_new_tokens": 8, "zero_shot": False})
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MCIT_FAILPOINT", None)
    proc = subprocess.Popen([sys.executable, "-m", "mcit.cli", "launch", str(recipe), "--nproc", "2", "--cpu",
                             "--master-port", str(_port())], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "log.jsonl").is_file():  # the ranks are up and training
        assert proc.poll() is None and time.time() < deadline, "the job ended or never started"
        time.sleep(0.5)

    def ranks() -> list[str]:
        found = subprocess.run(["pgrep", "-f", str(recipe)], capture_output=True, text=True).stdout.split()
        return [pid for pid in found if pid != str(proc.pid)]

    assert ranks(), "no launched process names the recipe"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.time() + 60
    while ranks() and time.time() < deadline:
        time.sleep(0.5)
    left = ranks()
    for pid in left:
        os.kill(int(pid), signal.SIGKILL)
    assert not left, f"processes still running 60 s after SIGTERM to mcit launch: {left}"
