"""Shared fixtures: a small SynthCIT build and an isolated cache, so tests never touch ~/.cache. (Recipe files for
runs over that build: tests/recipes.py.)"""

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


@pytest.fixture
def count_builds(monkeypatch):
    """The base models built (`mcit.workflows.load.load_base` calls, by the checkpoint loader and load_checkpoint)."""
    from mcit.workflows import load as load_module

    calls = []
    real = load_module.load_base

    def counted(config):
        calls.append(config.name_or_path)
        return real(config)

    monkeypatch.setattr(load_module, "load_base", counted)
    return calls
