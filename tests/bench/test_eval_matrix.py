"""The evaluation-matrix benchmark child on a tiny two-stage run: both sides answer every (checkpoint, task, sample)
and give the same answers from the same input tokens; the MCITlib-style side builds the model once per checkpoint, the
mcit side once for the run. No timing is asserted."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from bench import eval_matrix
from mcit.config import load_recipe
from mcit.workflows.train import ContinualRunner
from tests.recipes import write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared machine extra threads cost wall time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthcit_root):
    folder = tmp_path_factory.mktemp("matrix")
    recipe = write_recipe(folder / "r.yaml", synthcit_root, output_dir=folder / "run",
                          model={"name_or_path": "builtin:tiny-llava", "autocast": None},
                          benchmark={"max_train": 24, "max_test": 4}, method={"name": "lora_ft", "lora": {"r": 4,
                                                                                                     "alpha": 8}},
                          train={"batch_size": 8, "lr": 2e-2, "max_steps": 2, "save_steps": 0, "max_length": 160},
                          eval={"batch_size": 8, "max_new_tokens": 6, "zero_shot": False, "constrained": False})
    return ContinualRunner(load_recipe(recipe)).run().parent


def _side(run, tmp_path, side: str) -> dict:
    args = Namespace(run=str(run), per_task=2, max_new_tokens=None, sides=side, out=str(tmp_path / f"{side}.json"))
    return eval_matrix.run(args)


def test_both_sides_answer_every_cell_alike(run, tmp_path, count_builds):
    stages = sorted(p.name for p in (run / "checkpoints").glob("stage-*"))
    old = _side(run, tmp_path, "mcitlib")
    assert len(count_builds) == 1 + 2  # the warm-up, then one build per checkpoint
    new = _side(run, tmp_path, "mcit")
    assert len(count_builds) == 3 + 1 + 1  # the warm-up, then one build for the run's two stages
    assert old["checkpoints"] == new["checkpoints"] == stages and old["cells"] == 4
    assert old["max_new_tokens"] == 6 and old["samples_per_task"] == {"shape": 2, "mc-color": 2}
    mcitlib, mcit = old["sides"]["mcitlib"], new["sides"]["mcit"]
    assert (mcitlib["model_builds"], mcit["model_builds"], mcit["advanced"]) == (2, 1, [stages[1]])
    for side in (mcitlib, mcit):
        assert sorted(side["predictions"]) == stages == sorted(side["load_seconds"])
        for label in stages:
            assert sorted(side["predictions"][label]) == ["mc-color", "shape"]
            assert all(len(answers) == 2 for answers in side["predictions"][label].values())
    assert mcitlib["identical_inputs"] == mcitlib["inputs_checked"] == 4
    same = eval_matrix.compare({"mcitlib": mcitlib, "mcit": mcit})
    assert same["compared"] == 8 and same["identical"] == 8, same["differences"]
    assert same["cells_compared"] == same["identical_scores"] == 4
    assert same["ratio"] > 0


def test_unknown_sides_are_refused(run, tmp_path):
    with pytest.raises(SystemExit, match="--sides"):
        _side(run, tmp_path, "mcitlib,hf")
