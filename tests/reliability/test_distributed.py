"""Distributed failures under 2-process DeepSpeed ZeRO-3 on CPU (gloo), launched as a user launches: `mcit launch`.

An exception on one rank ends the whole job with a non-zero exit and the error message, within 60 s of the failure
(not after the process-group timeout): the failing rank exits at once (`exit_on_error`) and the launcher ends the
other one, which is waiting in a collective. (Micro-batches where one rank has no image are covered by
tests/distributed/test_deepspeed_cpu.py: at ZeRO-3 rank 1 gets an image-less micro-batch every fifth step.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mcit.runs import checkpoint as ckpt
from tests.recipes import write_recipe
from tests.reliability.cli_runs import comparable

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


# --- resume under DeepSpeed -----------------------------------------------------------------------------------------


def _ds_recipe(folder: Path, root: Path, zero: str) -> Path:
    """2 tasks x 4 optimizer steps on 2 ranks (8 samples per rank and step), a step checkpoint at step 2. The log
    lines at steps 3 and 4 average the last 3 losses: after a resume at step 2, the one at step 4 still includes the
    loss of step 2, computed before the kill."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(folder / "r.yaml", root, output_dir=folder / "out",
                        method={"name": "lora_ft", "lora": {"r": 4, "alpha": 8}},  # default dropout: RNG matters
                        train={"batch_size": 8, "save_steps": 2, "log_steps": 3, "deepspeed": zero},
                        benchmark={"card": "synthcit-mini", "root": str(root), "tasks": ["shape", "mc-color"],
                                   "max_train": 64, "max_test": 8},
                        eval={"batch_size": 32, "max_new_tokens": 8, "zero_shot": False})


def _train_events(out: Path) -> dict[tuple[int, int], dict]:
    """(stage, step) -> the last `train` log line for it (a killed run's lines come before the rerun's)."""
    events = {}
    for record in map(json.loads, (out / "log.jsonl").read_text().splitlines()):
        if record["event"] == "train":
            events[(record["stage"], record["step"])] = {k: record[k] for k in ("loss", "lr", "steps")}
    return events


def _stage_trained(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == "stage_trained"]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_killed_deepspeed_run_resumes_mid_task_with_the_uninterrupted_results(zero, tmp_path, synthcit_root):
    reference = _ds_recipe(tmp_path / "reference", synthcit_root, zero)
    code, lines, _ = _launch(reference)
    assert code == 0, "\n".join(t for _, t in lines[-60:])

    recipe = _ds_recipe(tmp_path / "killed", synthcit_root, zero)
    out = tmp_path / "killed" / "out"
    code, lines, _ = _launch(recipe, failpoint="train.step:3")  # both ranks, task 1 after its 3rd step
    assert code != 0, "\n".join(t for _, t in lines[-60:])
    step_dir = out / "checkpoints" / "last-step"
    assert not (out / "checkpoints" / "stage-01-shape").exists()
    trainer = json.loads((step_dir / "trainer.json").read_text())
    assert (trainer["stage"], trainer["step"], trainer["world_size"], trainer["deepspeed"]) == (0, 2, 2, True)
    assert trainer["zero_stage"] == int(zero[-1])
    listed = ckpt.manifest_files(step_dir)  # sizes and SHA-256 of every file, both ranks' included
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors", "method.safetensors", "trainer.json"} <= set(listed)
    shards = [name for name in listed if name.startswith("deepspeed/step/") and name.endswith("optim_states.pt")]
    assert len(shards) == 2, listed  # one ZeRO optimizer shard per rank

    code, lines, _ = _launch(recipe)
    text = "\n".join(t for _, t in lines)
    assert code == 0, text[-4000:]
    first, second = _stage_trained(out)
    assert (first["stage"], first["resumed_from"], second["resumed_from"]) == (1, 2, 0), (first, second)
    assert not step_dir.exists()  # superseded by the finished stage
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]

    expected = json.loads((tmp_path / "reference" / "out" / "results.json").read_text())
    got = json.loads((out / "results.json").read_text())
    assert comparable(got) == comparable(expected)
    assert all(row is not None for row in got["matrix"][1:])
    # the loss curve and the learning rate continue exactly where the killed run stopped, and the trained weights are
    # bitwise those of the uninterrupted run (4 steps leave the tiny model's scores near 0: the matrix alone would not
    # notice a resume that lost the Adam moments, the RNG state or the loss window; these checks do)
    reference_events = _train_events(tmp_path / "reference" / "out")
    assert _train_events(out) == reference_events and len(reference_events) == 4
    for stage in ("stage-01-shape", "stage-02-mc-color"):
        weights = Path("checkpoints") / stage / "model.safetensors"
        assert (out / weights).read_bytes() == (tmp_path / "reference" / "out" / weights).read_bytes(), stage
    for path in sorted((tmp_path / "reference" / "out" / "predictions").rglob("*.jsonl")):
        relative = path.relative_to(tmp_path / "reference" / "out")
        assert (out / relative).read_bytes() == path.read_bytes(), relative
