"""`kill -9` at three points of a run (mid-training, mid-evaluation, mid-checkpoint write) and a full disk while a
checkpoint is saved: the same command run again finishes with the results of an uninterrupted run.

The kills come from failpoints (mcit/failpoints.py): the process SIGKILLs itself at an exact point, so each test
hits the window it names every time instead of racing a timer. The recipe trains 2 tasks x 4 steps with a step
checkpoint at step 2, so the process commits checkpoints in this order: 1 last-step (shape, step 2),
2 stage-01-shape, 3 last-step (mc-color, step 2), 4 stage-02-mc-color.
"""

from __future__ import annotations

import errno
import json
import signal

import pytest
import torch

from mcit.errors import CheckpointError
from mcit.runs import checkpoint as ckpt
from mcit.runtime import files
from tests.reliability.cli_runs import mcit, recipe_for, same_run

pytestmark = pytest.mark.slow


def _after_kill_mid_training(out):
    # task 1 killed after step 3: its stage checkpoint does not exist, the step-2 checkpoint does
    assert not (out / "checkpoints" / "stage-01-shape").exists()
    trainer = json.loads((out / "checkpoints" / "last-step" / "trainer.json").read_text())
    assert (trainer["stage"], trainer["step"]) == (0, 2)


def _after_kill_mid_evaluation(out):
    # after stage 1 the first task was evaluated, the second not: row 1 of results.json is still empty
    assert ckpt.is_complete(out / "checkpoints" / "stage-01-shape")
    assert (out / "predictions" / "stage-01" / "shape.jsonl").is_file()
    assert not (out / "predictions" / "stage-01" / "mc-color.jsonl").exists()
    assert json.loads((out / "results.json").read_text())["matrix"][1] is None


def _after_kill_mid_checkpoint_write(out):
    # every file of stage-01 written and fsynced, the manifest too, but the folder never renamed into place
    (tmp,) = (out / "checkpoints").glob(".stage-01-shape.tmp-*")
    assert (tmp / "MANIFEST.json").is_file()
    assert not (out / "checkpoints" / "stage-01-shape").exists()


@pytest.mark.parametrize(("failpoint", "check"), [
    ("train.step:3", _after_kill_mid_training),
    ("eval.task:3", _after_kill_mid_evaluation),
    ("checkpoint.write:2", _after_kill_mid_checkpoint_write),
], ids=["mid-training", "mid-evaluation", "mid-checkpoint-write"])
def test_kill9_then_rerun_gives_the_uninterrupted_results(failpoint, check, tmp_path, synthcit_root, reference_run):
    recipe = recipe_for(tmp_path, synthcit_root)
    killed = mcit("train", str(recipe), failpoint=failpoint)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    out = tmp_path / "out"
    check(out)
    rerun = mcit("train", str(recipe))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    same_run(reference_run, out)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_full_disk_while_saving_keeps_the_previous_checkpoints_and_says_so(tmp_path, synthcit_root, reference_run):
    recipe = recipe_for(tmp_path, synthcit_root)
    failed = mcit("train", str(recipe), failpoint="checkpoint.write:4:enospc")  # stage-02-mc-color
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("mcit train: error: could not write checkpoint ") and "stage-02-mc-color" in last
    assert "No space left on device" in last and "previous checkpoints are intact" in last
    assert "Traceback" not in failed.stderr
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last-step", "stage-01-shape"]  # no debris
    ckpt.open_checkpoint(checkpoints / "stage-01-shape")  # sizes and hashes as written
    ckpt.open_checkpoint(checkpoints / "last-step")
    rerun = mcit("train", str(recipe))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    same_run(reference_run, tmp_path / "out")


# --- the checkpoint writer on its own -------------------------------------------------------------------------------


def _write(folder, value: float) -> None:
    writer = ckpt.CheckpointWriter(folder)
    writer.tensors("model.safetensors", {"w": torch.full((64, 64), value)})
    writer.json("meta.json", {"value": value})
    writer.commit()


def test_write_error_midway_through_a_file_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "last-step"
    _write(folder, 1.0)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_fills_up(tensors, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # part of the file reached the disk
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "save_file", disk_fills_up)  # what CheckpointWriter.tensors writes with
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*last-step \(No space left on device\)"):
        _write(folder, 2.0)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["last-step"]
    ckpt.open_checkpoint(folder)


def test_rename_failure_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    folder = tmp_path / "last-step"
    _write(folder, 1.0)
    real_replace, calls = ckpt.os.replace, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old moved aside, the new folder cannot be moved in
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", second_rename_fails)
    with pytest.raises(CheckpointError, match="Input/output error"):
        _write(folder, 2.0)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert json.loads((folder / "meta.json").read_text())["value"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["last-step"]


def test_kill_between_the_two_renames_keeps_the_previous_checkpoint(tmp_path):
    """A kill after `final -> .final.old-PID` and before `.final.tmp-PID -> final`: the next run puts old back."""
    _write(tmp_path / "last-step", 1.0)
    _write(tmp_path / "x", 2.0)
    (tmp_path / "last-step").rename(tmp_path / ".last-step.old-99")
    (tmp_path / "x").rename(tmp_path / ".last-step.tmp-99")
    ckpt.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-step"]
    ckpt.open_checkpoint(tmp_path / "last-step")
    assert json.loads((tmp_path / "last-step" / "meta.json").read_text())["value"] == 1.0
