"""A loopback HTTP server that speaks the Yandex Disk public resources API shape.

Real HTTP on 127.0.0.1 (http.server in a thread, port 0), so the client's sessions, retries,
streaming and Range requests are exercised for real; nothing is patched. Faults are switched on
per test through the attributes of `FakeYandex`.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Union
from urllib.parse import parse_qs, urlencode, urlsplit

# A tree spec: {"name": bytes (a file) or {...} (a folder)}; names are served verbatim.
Spec = dict[str, Union[bytes, "Spec"]]


@dataclass
class Node:
    name: str
    path: str
    content: bytes | None = None  # None for a folder
    children: list[Node] = field(default_factory=list)

    @property
    def is_dir(self) -> bool:
        return self.content is None


@dataclass
class Resource:
    root: Node
    nodes: dict[str, Node]  # by the exact `path` string served


def _build(spec: Spec) -> Resource:
    root = Node(name="root", path="/")
    nodes = {"/": root}

    def add(parent: Node, sub: Spec) -> None:
        for name, value in sub.items():
            path = parent.path.rstrip("/") + "/" + name
            node = Node(name, path, value if isinstance(value, bytes) else None)
            parent.children.append(node)
            nodes[path] = node
            if not isinstance(value, bytes):
                add(node, value)

    add(root, spec)
    return Resource(root, nodes)


@dataclass
class Hit:
    kind: str  # "list", "href" or "file"
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    status: int = 0


class FakeYandex:
    """The fake API. `base` is the api_base to pass to download_public."""

    def __init__(self) -> None:
        self.resources: dict[str, Resource] = {}
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        # Faults, keyed by the remote path (or public key for `status`):
        self.status: dict[str, int] = {}  # public key -> status for every call (404, 403, 429 ...)
        self.list_429_once: dict[str, int] = {}  # listing path -> Retry-After sent once
        self.href_503_once: set[str] = set()  # download-endpoint 503 once for these paths
        self.drop_once: set[str] = set()  # file body cut off half-way once
        self.ignore_range: set[str] = set()  # answer 200 with the whole file to a Range request
        self.corrupt: dict[str, int] = {}  # serve wrong bytes (same size) this many times
        self.wrong_md5: set[str] = set()  # the listing's md5 is wrong for these paths
        self.file_429_always: set[str] = set()
        self.dead_href: set[str] = set()  # the download address points at a port nobody listens on
        self.omit_total = False  # listings without `_embedded.total` (page until a short page)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.dead_base = f"http://127.0.0.1:{s.getsockname()[1]}"
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # ---- set-up ---------------------------------------------------------------------------
    def add_folder(self, public_key: str, spec: Spec) -> None:
        self.resources[public_key] = _build(spec)

    def add_file(self, public_key: str, name: str, content: bytes) -> None:
        node = Node(name, "/", content)
        self.resources[public_key] = Resource(node, {"/": node})

    def start(self) -> FakeYandex:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, kind: str, path: str | None = None) -> int:
        with self.lock:
            return sum(1 for h in self.hits if h.kind == kind and (path is None or h.path == path))

    def file_hits(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.kind == "file" and h.path == path]

    # ---- serving --------------------------------------------------------------------------
    def _item(self, node: Node) -> dict[str, Any]:
        item: dict[str, Any] = {"name": node.name, "path": node.path, "type": "dir" if node.is_dir else "file"}
        if not node.is_dir:
            assert node.content is not None
            md5 = hashlib.md5(node.content).hexdigest()
            item.update(
                size=len(node.content),
                mime_type="image/png",
                md5="0" * 32 if node.path in self.wrong_md5 else md5,
                sha256=hashlib.sha256(node.content).hexdigest(),
            )
        return item

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else delayed ACKs add 40 ms to every keep-alive request

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
                self._json(status, {"error": error, "description": error, "message": error}, headers)

            def _hit(self, kind: str, path: str) -> Hit:
                query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
                hit = Hit(kind, path, dict(self.headers.items()), query)
                with fake.lock:
                    fake.hits.append(hit)
                return hit

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/v1/disk/public/resources":
                    self._list(q)
                elif url.path == "/v1/disk/public/resources/download":
                    self._href(q)
                elif url.path == "/dl":
                    self._file(q)
                else:
                    self._error(404, "NotFound")

            def _resource(self, q: dict[str, str]) -> tuple[Resource, Node] | None:
                key = q.get("public_key", "")
                if key in fake.status:
                    code = fake.status[key]
                    names = {
                        404: "DiskNotFoundError",
                        403: "DiskResourceDownloadDisabledError",
                        429: "TooManyRequestsError",
                    }
                    self._error(code, names.get(code, "Error"), {"Retry-After": "0"} if code == 429 else None)
                    return None
                res = fake.resources.get(key)
                node = res.nodes.get(q.get("path", "/")) if res else None
                if res is None or node is None:
                    self._error(404, "DiskNotFoundError")
                    return None
                return res, node

            def _list(self, q: dict[str, str]) -> None:
                path = q.get("path", "/")
                hit = self._hit("list", path)
                if path in fake.list_429_once:
                    hit.status = 429
                    self._error(429, "TooManyRequestsError", {"Retry-After": str(fake.list_429_once.pop(path))})
                    return
                found = self._resource(q)
                if found is None:
                    return
                _, node = found
                body = fake._item(node)
                if node.is_dir:
                    limit, offset = int(q.get("limit", 20)), int(q.get("offset", 0))
                    items = [fake._item(c) for c in node.children[offset : offset + limit]]
                    body["_embedded"] = {
                        "items": items,
                        "limit": limit,
                        "offset": offset,
                        "total": len(node.children),
                        "path": node.path,
                    }
                    if fake.omit_total:
                        del body["_embedded"]["total"]
                hit.status = 200
                self._json(200, body)

            def _href(self, q: dict[str, str]) -> None:
                path = q.get("path", "/")
                self._hit("href", path)
                if path in fake.href_503_once:
                    fake.href_503_once.discard(path)
                    self._error(503, "ServiceUnavailable")
                    return
                found = self._resource(q)
                if found is None:
                    return
                _, node = found
                if node.is_dir:
                    self._error(400, "DiskNotAFileError")
                    return
                query = urlencode({"k": q["public_key"], "p": path})
                base = fake.dead_base if path in fake.dead_href else fake.base
                self._json(200, {"href": f"{base}/dl?{query}", "method": "GET", "templated": False})

            def _file(self, q: dict[str, str]) -> None:
                path = q.get("p", "/")
                hit = self._hit("file", path)
                if path in fake.file_429_always:
                    self._error(429, "TooManyRequestsError", {"Retry-After": "0"})
                    return
                res = fake.resources.get(q.get("k", ""))
                node = res.nodes.get(path) if res else None
                if node is None or node.content is None:
                    self._error(404, "NotFound")
                    return
                data = node.content
                if fake.corrupt.get(path, 0) > 0:
                    fake.corrupt[path] -= 1
                    data = bytes(b ^ 0xFF for b in data)
                start = 0
                rng = self.headers.get("Range")
                if rng and path not in fake.ignore_range and rng.startswith("bytes="):
                    start = int(rng[len("bytes=") :].split("-")[0])
                status = 206 if start else 200
                hit.status = status
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                body = data[start:]
                if path in fake.drop_once:
                    fake.drop_once.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    # Cut the TCP connection mid-body, as a flaky mobile network would.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler


class SilentServer:
    """A loopback server that accepts every connection and never sends a byte (a hung or
    firewalled-by-a-proxy server). `base` is the api_base to pass; `accepted` counts connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self.conns.append(conn)  # held open, never answered

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self.conns:
            conn.close()
        self.sock.close()
