"""Step checkpoints under DeepSpeed, without the launcher: the collective checkpoint writer with 2 gloo processes, and
the rule that a step checkpoint resumes only the stage, plan and sharding it was written by. (The kill-and-resume of a
launched 2-process run: tests/reliability/test_distributed.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed
import torch.multiprocessing

from mcit.config import Recipe
from mcit.runs import checkpoint as ckpt
from mcit.train.loop import STEP_META, StageTrainer


def _write_on_two_ranks(rank: int, folder: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        writer = ckpt.CheckpointWriter(Path(folder) / "last-step", collective=True)
        (Path(folder) / f"tmp-seen-by-rank{rank}").write_text(str(writer.tmp))
        if rank == 1:
            time.sleep(1.0)  # rank 0 reaches commit() first: it must wait for this file
        writer.tensors(f"rank{rank}.safetensors", {"w": torch.full((8,), float(rank))})
        if rank == 0:
            writer.json("trainer.json", {"step": 2})
        assert writer.commit() == Path(folder) / "last-step"
        assert (Path(folder) / "last-step" / "MANIFEST.json").is_file()  # published before commit() returns anywhere
    finally:
        torch.distributed.destroy_process_group()


def test_a_collective_checkpoint_holds_every_ranks_files_and_is_published_once(tmp_path) -> None:
    torch.multiprocessing.spawn(_write_on_two_ranks, args=(str(tmp_path),), nprocs=2, join=True)
    tmp = {(tmp_path / f"tmp-seen-by-rank{r}").read_text() for r in (0, 1)}
    assert len(tmp) == 1, tmp  # one temporary folder for both ranks (rank 0's)
    assert ckpt.manifest_files(tmp_path / "last-step") == ["rank0.safetensors", "rank1.safetensors", "trainer.json"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_single_process_writer_is_unchanged_without_a_process_group(tmp_path) -> None:
    writer = ckpt.CheckpointWriter(tmp_path / "last-step", collective=True)  # no group: an ordinary writer
    assert not writer.collective
    writer.json("trainer.json", {"step": 1})
    ckpt.open_checkpoint(writer.commit())


def _trainer(tmp_path: Path) -> StageTrainer:
    recipe = Recipe(output_dir=str(tmp_path / "run"))
    return StageTrainer(torch.nn.Linear(2, 2), None, recipe, [[1] * 8] * 32, None, 0, stage=0, label="shape",
                        step_dir=tmp_path / "last-step", log=lambda record: None)


@pytest.mark.parametrize("written_by", [
    {"world_size": 2, "deepspeed": True, "zero_stage": 2},
    {"world_size": 1, "deepspeed": True, "zero_stage": 3},
    {"stage": 1},
    {"steps": 999},
], ids=["two-ranks-zero2", "deepspeed-one-rank", "other-stage", "other-plan"])
def test_a_step_checkpoint_of_another_stage_or_sharding_restarts_the_stage(written_by, tmp_path, capsys) -> None:
    trainer = _trainer(tmp_path)
    identity = trainer._identity()
    assert identity == {"stage": 0, "steps": trainer.plan.steps, "world_size": 1, "deepspeed": False,
                         "zero_stage": 0}
    writer = ckpt.CheckpointWriter(tmp_path / "last-step")
    writer.json(STEP_META, {**identity, **written_by, "step": 2})
    writer.commit()
    assert trainer._resume(None, None) == 0  # nothing loaded: the files it would need are not even there
    message = capsys.readouterr().err
    if written_by.get("stage", 0) == 0:
        assert "cannot resume this stage" in message and "training it from step 0" in message
        changed = next(iter(written_by))
        assert f"{changed}={written_by[changed]}" in message
