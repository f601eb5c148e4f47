"""A loopback stand-in for the Hub HTTP API: just what `create_repo` + `upload_folder` of huggingface_hub 2.x call.

Endpoints (read from the installed client: hf_api.create_repo, _commit_api._fetch_upload_modes / _send_commit,
_upload_pipeline): POST /api/repos/create, POST /api/{type}s/{repo}/preupload/{rev},
POST /api/{type}s/{repo}/commit/{rev} (NDJSON), POST /api/validate-yaml (README metadata check), and
GET /api/agent-harnesses (fetched without a token by the client itself, at most daily, for its User-Agent).
Every file is declared "regular" at preupload, so contents travel base64-encoded inside the commit and neither LFS nor
Xet storage is needed (the real Hub sends large binaries through Xet, which is not emulated here).

Every request is recorded (method, path, headers, body); committed files are kept per repo as bytes.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REGISTRY_PATH = "/api/agent-harnesses"


@dataclass
class Request:
    """One recorded request; header names as the client sent them (httpx sends them lower-case)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeHub:
    """Use as a context manager; `url` is the endpoint to give huggingface_hub."""

    token: str
    fail: dict[str, int] = field(default_factory=dict)  # "create" / "preupload" / "commit" -> HTTP status to return
    requests: list[Request] = field(default_factory=list)
    repos: dict[str, dict] = field(default_factory=dict)  # repo_id -> {"private": bool, "files": {path: bytes}}

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's naming
                hub._handle(self)

            def do_GET(self):  # noqa: N802
                hub._handle(self)

            def log_message(self, *args):  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def files(self, repo_id: str) -> dict[str, bytes]:
        return self.repos[repo_id]["files"]

    # -- request handling ---------------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = _read_body(handler)
        path = handler.path
        self.requests.append(Request(handler.command, path, dict(handler.headers.items()), body))
        if path == REGISTRY_PATH:  # huggingface_hub's own unauthenticated user-agent lookup; no token involved
            return _reply(handler, 200, {"standardEnvVars": [], "harnesses": {}})
        if handler.headers.get("Authorization") != f"Bearer {self.token}":
            return _reply(handler, 401, {"error": "Invalid credentials in Authorization header"})
        route = path.split("?", 1)[0]
        if handler.command == "POST" and route == "/api/repos/create":
            return self._create(handler, json.loads(body))
        if handler.command == "POST" and route == "/api/validate-yaml":
            return _reply(handler, 200, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/(\w+)s/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit)/(?P<rev>[^/]+)", route)
        if handler.command == "POST" and match:
            repo_id = match["repo"]
            if match["op"] in self.fail:
                return _reply(handler, self.fail[match["op"]], {"error": f"{match['op']} refused"})
            if repo_id not in self.repos:
                return _reply(handler, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if match["op"] == "preupload":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return _reply(handler, 200, {"files": modes, "commitOid": "0" * 40})
            return self._commit(handler, repo_id, body)
        return _reply(handler, 404, {"error": f"fake hub has no route {handler.command} {route}"})

    def _create(self, handler, payload: dict) -> None:
        if "create" in self.fail:
            return _reply(handler, self.fail["create"], {"error": "create refused"})
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            payload = {"error": "You already created this model repo", "url": self._repo_url(repo_id)}
            return _reply(handler, 409, payload)
        self.repos[repo_id] = {"private": payload.get("visibility") == "private", "files": {}}
        return _reply(handler, 200, {"url": self._repo_url(repo_id), "name": repo_id})

    def _commit(self, handler, repo_id: str, body: bytes) -> None:
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                value = item["value"]
                assert value["encoding"] == "base64"
                self.repos[repo_id]["files"][value["path"]] = base64.b64decode(value["content"])
            elif item["key"] != "header":
                return _reply(handler, 400, {"error": f"fake hub does not support commit item {item['key']!r}"})
        oid = f"{len(self.requests):040x}"
        url = f"{self._repo_url(repo_id)}/commit/{oid}"
        return _reply(handler, 200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})

    def _repo_url(self, repo_id: str) -> str:
        return f"{self.url}/{repo_id}"


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().strip(), 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _reply(handler: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict | None = None) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)
