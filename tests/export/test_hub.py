"""push_folder against a loopback fake of the Hub API: exact files, token only in the Authorization header."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from mcit.errors import McitError
from mcit.export.hub import push_folder, scan_for_tokens

from .fake_hub import REGISTRY_PATH, FakeHub

TOKEN = "hf_" + "Zq7" * 12  # a made-up token for the fake server
REPO = "someone/tiny-adapter"
EXPORT = {
    "README.md": b"---\nlicense: other\ntags:\n- mcit\n---\n\n# tiny adapter\n",
    "adapter_config.json": b'{"r": 8, "lora_alpha": 8}',
    "adapter_model.safetensors": bytes(range(256)) * 64,
    "eval/results.json": b'{"metrics": {"MFN": 50.0}}',
}


@pytest.fixture(autouse=True)
def online(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def export_dir(tmp_path):
    folder = tmp_path / "export"
    for name, data in EXPORT.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")  # never uploaded
    return folder


def assert_token_only_in_authorization(hub):
    api_calls = [r for r in hub.requests if r.path != REGISTRY_PATH]
    assert api_calls, "no API request reached the fake hub"
    for request in hub.requests:
        assert TOKEN not in request.path
        assert TOKEN.encode() not in request.body
        headers = {name.lower(): value for name, value in request.headers.items()}
        assert [name for name, value in headers.items() if TOKEN in value] == (
            [] if request.path == REGISTRY_PATH else ["authorization"]
        )
        if request.path != REGISTRY_PATH:
            assert headers["authorization"] == f"Bearer {TOKEN}"


def test_push_uploads_exactly_the_folder_and_keeps_the_token_secret(export_dir, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeHub(token=TOKEN) as hub:
        url = push_folder(export_dir, REPO, private=True, token=TOKEN, endpoint=hub.url)
    assert url.startswith(f"{hub.url}/{REPO}/commit/")
    assert hub.files(REPO) == EXPORT  # exact paths and bytes; .git left out
    assert hub.repos[REPO]["private"] is True
    assert_token_only_in_authorization(hub)
    out, err = capfd.readouterr()
    assert TOKEN not in out + err + caplog.text


def test_token_from_env_and_endpoint_read_at_call_time(export_dir, monkeypatch):
    with FakeHub(token=TOKEN) as hub:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)  # set after huggingface_hub was imported
        push_folder(export_dir, REPO)
        push_folder(export_dir, REPO)  # second push: the repo exists (409) and exist_ok carries on
    assert hub.files(REPO) == EXPORT
    creates = [r for r in hub.requests if r.path == "/api/repos/create"]
    assert len(creates) == 2
    assert_token_only_in_authorization(hub)


def test_push_in_a_fresh_process_prints_nothing_secret(export_dir):
    # the way the CLI runs: HF_ENDPOINT and HF_TOKEN in the environment before huggingface_hub is imported
    with FakeHub(token=TOKEN) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0"}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        code = f"from mcit.export.hub import push_folder; print(push_folder({str(export_dir)!r}, {REPO!r}))"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(f"{hub.url}/{REPO}/commit/")
    assert TOKEN not in proc.stdout + proc.stderr
    assert hub.files(REPO) == EXPORT
    assert_token_only_in_authorization(hub)


def test_offline_mode_is_one_clear_error(export_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with FakeHub(token=TOKEN) as hub:
        with pytest.raises(McitError, match="HF_HUB_OFFLINE=1") as info:
            push_folder(export_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []
    assert TOKEN not in str(info.value)


def test_folder_containing_the_token_is_refused_before_any_request(export_dir):
    (export_dir / "eval" / "env.json").write_text(json.dumps({"HF_TOKEN": TOKEN}))
    with FakeHub(token=TOKEN) as hub:
        with pytest.raises(McitError, match=r"eval/env.json contains an access token") as info:
            push_folder(export_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []
    assert TOKEN not in str(info.value)


def test_scan_finds_other_token_looking_strings_across_chunk_borders(tmp_path):
    other = "hf_" + "k" * 30
    data = b"x" * ((1 << 20) - 10) + other.encode() + b"y" * 100  # straddles the 1 MiB read boundary
    (tmp_path / "blob.bin").write_bytes(data)
    with pytest.raises(McitError, match="blob.bin"):
        scan_for_tokens(tmp_path, token=TOKEN)
    (tmp_path / "blob.bin").write_bytes(b"hf_short and hf_hub_download are fine")
    scan_for_tokens(tmp_path, token=TOKEN)


def test_http_error_is_one_line_naming_endpoint_not_token(export_dir):
    with FakeHub(token=TOKEN, fail={"commit": 403}) as hub:
        with pytest.raises(McitError) as info:
            push_folder(export_dir, REPO, token=TOKEN, endpoint=hub.url)
    message = str(info.value)
    assert "\n" not in message and hub.url in message and "HTTP 403" in message and "write access" in message
    assert TOKEN not in message


def test_wrong_token_is_reported_as_401(export_dir):
    with FakeHub(token=TOKEN) as hub:
        with pytest.raises(McitError, match="HTTP 401"):
            push_folder(export_dir, REPO, token="hf_" + "w" * 30, endpoint=hub.url)


def test_unreachable_endpoint_is_one_line_naming_endpoint(export_dir):
    with socket.socket() as sock:  # a port that nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.raises(McitError) as info:
        push_folder(export_dir, REPO, token=TOKEN, endpoint=endpoint)
    message = str(info.value)
    assert "\n" not in message and f"cannot reach the Hub at {endpoint}" in message
    assert TOKEN not in message


def test_missing_token_and_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("mcit.export.hub.get_token", lambda: None)
    with pytest.raises(McitError, match="no Hub token"):
        push_folder(tmp_path, REPO, endpoint="http://127.0.0.1:9")
    with pytest.raises(McitError, match="does not exist"):
        push_folder(tmp_path / "nope", REPO, token=TOKEN)
