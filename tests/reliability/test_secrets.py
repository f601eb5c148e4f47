"""A Hub token in the environment never reaches a file: every reliability run trains with HF_TOKEN set
(cli_runs.FAKE_TOKEN); here the reference run is exported and pushed to a loopback Hub with the token, and every file
written — run folder (logs, env.json, TensorBoard events, checkpoints, report), export folder, model card, the
uploaded files — and every line printed is searched for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mcit.export.hub import TOKEN_PATTERN
from tests.export.fake_hub import FakeHub
from tests.reliability.cli_runs import FAKE_TOKEN, mcit

pytestmark = pytest.mark.slow


def _leaks(files: dict[str, bytes]) -> list[str]:
    return [name for name, data in files.items() if FAKE_TOKEN.encode() in data or TOKEN_PATTERN.search(data)]


def _files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_hub_token_never_reaches_logs_run_folders_model_cards_or_exports(reference_run, tmp_path) -> None:
    out = tmp_path / "export"
    with FakeHub(token=FAKE_TOKEN) as hub:
        proc = mcit("export", str(reference_run), "--out", str(out), "--push", "someone/reliability",
                    HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
        uploaded = hub.files("someone/reliability") if proc.returncode == 0 else {}
        sent = [r for r in hub.requests if FAKE_TOKEN in r.headers.get("authorization", "")]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sent, "the push did not use the token from the environment: the search below would prove nothing"
    assert os.environ.get("HF_TOKEN") != FAKE_TOKEN  # it reached the runs through their environment only

    run_files = _files_under(reference_run)
    assert {"log.jsonl", "env.json", "results.json", "recipe.yaml", "report/report.html"} <= set(run_files)
    assert any(name.startswith("tb/") for name in run_files)
    assert "README.md" in uploaded and _files_under(out) == uploaded
    assert _leaks(run_files) == []
    assert _leaks(_files_under(out)) == []
    assert _leaks(uploaded) == []
    printed = (reference_run.parent / "stdout.txt").read_text() + proc.stdout + proc.stderr
    assert FAKE_TOKEN not in printed and not TOKEN_PATTERN.search(printed.encode())
