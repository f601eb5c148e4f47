"""Shared fixtures: a small SynthCIT build and an isolated cache, so tests never touch ~/.cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mcit.data import synthcit

SMALL = synthcit.BuildConfig(seed=0, n_train=96, n_test=24, n_pretrain=64, n_pretrain_test=16)


@pytest.fixture(scope="session")
def synthcit_root(tmp_path_factory) -> Path:
    """A small SynthCIT (96 train / 24 test per task), built once per test session."""
    root = tmp_path_factory.getbasetemp() / "synthcit-small"
    synthcit.ensure_built(root, SMALL)
    return root


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """MCIT_CACHE in a temp folder (random-init models are built there); restored afterwards."""
    old = os.environ.get("MCIT_CACHE")
    os.environ["MCIT_CACHE"] = str(tmp_path_factory.getbasetemp() / "mcit-cache")
    yield
    if old is None:
        os.environ.pop("MCIT_CACHE", None)
    else:
        os.environ["MCIT_CACHE"] = old


def write_recipe(path: Path, root: Path, **sections) -> Path:
    """A fast test recipe over the small SynthCIT: tiny base, 2 tasks by default, few steps."""
    import yaml

    data = {
        "name": sections.pop("name", "test"), "output_dir": str(sections.pop("output_dir", path.parent / "run")),
        "seed": 0,
        "model": {"name_or_path": "builtin:tiny-llava", "autocast": "bf16"},
        "benchmark": {"card": "synthcit-mini", "root": str(root), "tasks": ["shape", "mc-color"], "max_train": 64,
                      "max_test": 16},
        "method": {"name": "lora_ft", "lora": {"r": 4, "alpha": 8}},
        "train": {"batch_size": 16, "lr": 1e-3, "save_steps": 2, "log_steps": 1, "max_length": 128},
        "eval": {"batch_size": 32, "max_new_tokens": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
