"""A card's root in a launched process (one rank of a multi-node job): a variable unset on that node, or pointing to
a folder the node lacks, fails at once naming the variable, the host and the rank."""

from __future__ import annotations

import socket

import pytest

from mcit.data.cards import load_card
from mcit.errors import DataError


@pytest.fixture
def as_rank_3(monkeypatch):
    """The variables the deepspeed launcher sets for global rank 3 of 4."""
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)


def test_unset_root_variable_names_host_and_rank(as_rank_3, monkeypatch):
    monkeypatch.delenv("MCIT_UCIT_ROOT", raising=False)
    card = load_card("ucit")  # loading needs no data; touching files does
    with pytest.raises(DataError) as err:
        _ = card.root_dir
    message = str(err.value)
    assert "MCIT_UCIT_ROOT" in message and "unset" in message
    assert f"host {socket.gethostname()}" in message and "rank 3 of 4" in message


def test_root_variable_pointing_nowhere_names_host_and_rank(as_rank_3, monkeypatch, tmp_path):
    monkeypatch.setenv("MCIT_UCIT_ROOT", str(tmp_path / "not-here"))
    card = load_card("ucit")
    with pytest.raises(DataError) as err:
        card.load_task("IconQA", "test")
    message = str(err.value)
    assert "MCIT_UCIT_ROOT" in message and str(tmp_path / "not-here") in message
    assert f"host {socket.gethostname()}" in message and "rank 3 of 4" in message
    (tmp_path / "not-here").mkdir()
    assert card.root_dir == tmp_path / "not-here"


def test_plain_process_keeps_the_lazy_root(monkeypatch, tmp_path):
    """Outside a launcher a missing root is reported when a file is read (validation lists every file)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MCIT_UCIT_ROOT", str(tmp_path / "not-here"))
    card = load_card("ucit")
    assert card.root_dir == tmp_path / "not-here"
    with pytest.raises(DataError, match="not found") as err:
        card.load_task("IconQA", "test")
    assert "rank" not in str(err.value)
    monkeypatch.delenv("MCIT_UCIT_ROOT")
    with pytest.raises(DataError, match="needs the environment variable MCIT_UCIT_ROOT") as err:
        _ = card.root_dir
    assert "host" not in str(err.value)


def test_generated_card_may_build_its_missing_root(as_rank_3, monkeypatch, tmp_path):
    monkeypatch.setenv("MCIT_SYNTHCIT_ROOT", str(tmp_path / "to-build"))
    assert load_card("synthcit").root_dir == tmp_path / "to-build"


def test_old_top_level_card_path_points_to_the_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="card: ucit"):
        load_card("data_cards/ucit.yaml")
