"""A loopback HTTP server answering the Hugging Face Hub calls that a one-commit push makes.

Real HTTP on 127.0.0.1 (http.server in a thread, port 0): huggingface_hub's own client builds every
request, so the test checks the calls it really makes. Only what `sdlora push` needs is answered, no
more: GET /api/whoami-v2, POST /api/repos/create, POST /api/validate-yaml (create_commit sends the
README there), POST /api/models/<repo>/preupload/<rev> and POST /api/models/<repo>/commit/<rev>.
Every file is answered "regular" at preupload (the Hub's choice per file), so the commit carries the
files inline and the LFS / Xet transfer (a separate protocol the Hub picks for large files) is not
imitated. Anything else is a 404 recorded in `hits`, so an unexpected call shows in the test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "hf_stub_token"
USER = "stub-user"


@dataclass
class Hit:
    method: str
    path: str
    auth: str | None
    body: Any = None


@dataclass
class FakeHub:
    hits: list[Hit] = field(default_factory=list)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo id -> {"private": ..., "files": {...}}
    commits: list[dict[str, Any]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # call kind (whoami, create, preupload, commit) -> status
    base: str = ""

    def kinds(self) -> list[str]:
        """The calls made, by kind; without huggingface_hub 2.x's own best-effort fetch of its agent registry
        (GET /api/agent-harnesses, at most daily, a 404 is fine), which is no part of a push."""
        return [k for k in (_kind(h.method, h.path) for h in self.hits) if k != "registry"]


def _kind(method: str, path: str) -> str:
    if path == "/api/agent-harnesses":
        return "registry"
    if path == "/api/whoami-v2":
        return "whoami"
    if path == "/api/repos/create":
        return "create"
    if path == "/api/validate-yaml":
        return "validate"
    for kind in ("preupload", "commit"):
        if path.startswith("/api/models/") and f"/{kind}/" in path:
            return kind
    return f"unexpected {method} {path}"


def _repo_of(path: str, kind: str) -> str:
    return path[len("/api/models/") : path.index(f"/{kind}/")]


def make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            raw = self._body() if method == "POST" else b""
            kind = _kind(method, path)
            if kind == "commit":
                body: Any = [json.loads(line) for line in raw.splitlines() if line.strip()]
            else:
                body = json.loads(raw) if raw else None
            hub.hits.append(Hit(method, path, self.headers.get("Authorization"), body))
            if kind == "registry":
                return self._reply(404, {"error": "stub: no registry"})
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            if kind in hub.fail:
                reason = {"error": f"stub: {kind} fails", "errors": [{"message": f"stub: {kind} fails"}]}
                return self._reply(hub.fail[kind], reason)
            if kind == "whoami":
                return self._reply(200, {"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}})
            if kind == "create":
                repo = f"{body.get('organization') or USER}/{body['name']}"
                url = f"{hub.base}/{repo}"
                if repo in hub.repos:
                    return self._reply(409, {"error": "You already created this model repo", "url": url})
                hub.repos[repo] = {"private": body.get("visibility") == "private", "files": {}}
                return self._reply(200, {"url": url})
            if kind == "validate":
                return self._reply(200, {"errors": [], "warnings": []})
            if kind == "preupload":
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in body["files"]]
                return self._reply(200, {"files": files, "commitOid": "0" * 40})
            if kind == "commit":
                repo = _repo_of(path, "commit")
                if repo not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                files = {
                    line["value"]["path"]: base64.b64decode(line["value"]["content"])
                    for line in body
                    if line["key"] == "file"
                }
                oid = hashlib.sha1(json.dumps(sorted(files)).encode() + str(len(hub.commits)).encode()).hexdigest()
                hub.repos[repo]["files"].update(files)
                hub.commits.append({"repo": repo, "oid": oid, "header": body[0]["value"], "files": files})
                return self._reply(
                    200, {"commitUrl": f"{hub.base}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
                )
            return self._reply(404, {"error": f"stub: no {method} {path}"})

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

    return Handler


class HubServer:
    """`with HubServer() as hub:` serves a FakeHub on 127.0.0.1; `hub.base` is its HF_ENDPOINT."""

    def __enter__(self) -> FakeHub:
        self.hub = FakeHub()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.hub))
        self.hub.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
