"""Download a Yandex Disk public link (folder or single file) into a verified local cache.

Uses the public resources REST API, which needs no token:

    GET {api}/v1/disk/public/resources?public_key=<link>&path=<p>&limit=&offset=
        -> the resource; for a folder its children are in `_embedded.items`
           (`name`, `path`, `type` "file"/"dir", `size`, `md5`, `sha256`), paged by offset/limit/total
    GET {api}/v1/disk/public/resources/download?public_key=<link>&path=<p>
        -> {"href": ...}; GET href streams the bytes

Cache layout: `<cache_dir>/<sha256(public key)[:16]>/<safe relative path>`. Every file is
streamed to `<cache_dir>/<key>.partial/<safe relative path>`, checked against the listing's size,
md5 and sha256, and only then renamed into place, so a file in the cache folder is always a
verified one. `<cache_dir>/<key>.json` records what was verified (size, mtime, checksums) so a
second run re-uses the cache without hashing or downloading anything. A dropped download is
resumed with a Range request (a leftover `.partial` file from an earlier, interrupted run too);
a server that answers 200 instead of 206 gets a full download.

Remote names are untrusted: each path component is sanitised on its own (`/`, `\\`, NUL,
control characters and characters Windows forbids become `_`; `.`/`..` and empty names become
`_`; clashing names get a `~2` suffix), and every local path is checked to stay inside the cache.

Progress: `on_progress("download", bytes_done, bytes_total)` summed over all files of the link;
files already in the cache count as done at the first call. It is called from worker threads
(one at a time, under a lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import unicodedata
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from sdlora.errors import DownloadError
from sdlora.fsutil import write_json

DEFAULT_API = "https://cloud-api.yandex.net"
API_ENV = "SDLORA_YANDEX_API"

PROGRESS_DESCRIPTION = "download"
DEFAULT_RETRIES = 5  # per request, for connection/read errors, 429 and 5xx
DEFAULT_BACKOFF_FACTOR = 0.5  # seconds; urllib3 sleeps factor * 2**(n-1) between retries
MAX_RETRY_AFTER = 30.0  # a longer Retry-After means "come back later": don't hang for hours
DEFAULT_TIMEOUT = (10.0, 60.0)  # (connect, read) seconds
DEFAULT_PAGE_SIZE = 100  # items per listing request (the API's own default is 20)
DEFAULT_WORKERS = 4  # parallel file downloads; Yandex is slow per connection, fast in parallel
MAX_RESUMES = 5  # dropped connections tolerated per file before giving up
MAX_DEPTH = 32  # sub-folder nesting we follow (guards against a looping listing)
CHUNK = 1 << 16

_HOST_RE = re.compile(r"^(www\.)?(disk\.(360\.)?yandex\.[a-z]{2,3}(\.[a-z]{2})?|yadi\.sk)$")
# Control characters (C0, DEL, C1), both slashes, and what Windows forbids in a file name.
_UNSAFE_RE = re.compile(r'[\x00-\x1f\x7f-\x9f/\\:*?"<>|]')
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_MAX_NAME_BYTES = 200


@dataclass
class RemoteFile:
    local_path: Path  # verified file in the cache
    remote_path: str  # path inside the public resource ("/IMG_4651.HEIC"; "" for a single-file link)
    url: str  # the public link + path, for the manifest's `source`
    size: int
    md5: str | None
    sha256: str | None


@dataclass(frozen=True)
class PublicLink:
    """A parsed public link: what the API calls `public_key`, plus a sub-folder opened in it."""

    public_key: str
    path: str  # "" for the resource root, else "/sub/folder"


def _split_host(source: str) -> tuple[str, str] | None:
    """(lower-case host, url with scheme) for a Yandex Disk URL, else None."""
    text = source.strip()
    if not re.match(r"^https?://", text, re.IGNORECASE):
        # Scheme-less "disk.yandex.ru/d/..." or "yadi.sk/d/...": only when it starts with a host.
        head = text.split("/", 1)[0].lower()
        if "/" not in text or not _HOST_RE.match(head):
            return None
        text = "https://" + text
    try:
        host = (urlsplit(text).hostname or "").lower()
    except ValueError:
        return None
    return (host, text) if _HOST_RE.match(host) else None


def is_yandex_link(source: str) -> bool:
    """True when `source` is meant as a Yandex Disk link (a URL on a Yandex Disk host).

    Covers disk.yandex.ru/d/..., disk.360.yandex.ru/d/..., yadi.sk/d/..., /i/ single-file links and
    other Yandex Disk URLs; `download_public` then checks that it really is a public link and
    says so in one line if not, instead of the source being mistaken for a missing local path.
    """
    return isinstance(source, str) and _split_host(source) is not None


def parse_public_link(link: str) -> PublicLink:
    """Parse a public link; DownloadError with the expected form if it is not one."""
    found = _split_host(link)
    expected = (
        f"not a Yandex Disk public link: {link!r} (expected https://disk.yandex.ru/d/<id>, "
        "https://disk.360.yandex.ru/d/<id> or https://yadi.sk/d/<id>, as copied from 'Share')"
    )
    if found is None:
        raise DownloadError(expected)
    host, url = found
    parts = urlsplit(url)
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if len(segments) >= 2 and segments[0] in ("d", "i"):
        key = f"https://{host}/{segments[0]}/{quote(segments[1], safe='')}"
        sub = "/".join(segments[2:]) if segments[0] == "d" else ""
        return PublicLink(key, "/" + sub if sub else "")
    # The old form https://yadi.sk/public/?hash=<key>
    if segments[:1] == ["public"] and parse_qs(parts.query).get("hash"):
        return PublicLink(parse_qs(parts.query)["hash"][0], "")
    raise DownloadError(expected)


def safe_component(name: str) -> str:
    """One remote file or folder name as a local name that cannot leave its folder."""
    text = _UNSAFE_RE.sub("_", unicodedata.normalize("NFC", str(name)))
    text = text.strip().rstrip(". ")  # Windows drops trailing dots and spaces
    if not text or set(text) == {"."}:
        text = "_"
    if text.split(".", 1)[0].lower() in _WINDOWS_RESERVED:
        text = "_" + text
    if len(text.encode("utf-8")) > _MAX_NAME_BYTES:
        _, dot, ext = text.rpartition(".")
        suffix = dot + ext if dot and 0 < len(ext) <= 16 else ""
        stem = text[: len(text) - len(suffix)]
        while len((stem + suffix).encode("utf-8")) > _MAX_NAME_BYTES:
            stem = stem[:-1]
        text = stem + suffix
    return text


def _dedupe(name: str, taken: set[str]) -> str:
    """`name`, or `name~2.ext`, ... so that no two files share a (case-insensitive) local name."""
    candidate, n = name, 1
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        stem, dot, suffix = name, "", ""
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem}~{n}{dot}{suffix}"
    taken.add(candidate.lower())
    return candidate


@dataclass
class _Planned:
    remote: RemoteFile
    rel: str  # safe relative path inside the resource's cache folder (posix separators)
    api_path: str | None  # `path` for the download call; None for a single-file link
    partial: Path


class _CappedRetry(Retry):
    """urllib3 Retry whose Retry-After wait is capped at MAX_RETRY_AFTER seconds."""

    def get_retry_after(self, response: Any) -> float | None:
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, MAX_RETRY_AFTER)


def _make_session(retries: int, backoff_factor: float, pool: int) -> requests.Session:
    retry = _CappedRetry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=0,
        backoff_factor=backoff_factor,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET"}),
        respect_retry_after_header=True,
        raise_on_status=False,  # we map the final status to a clear message ourselves
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool, pool_maxsize=pool)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "sdlora (https://github.com/sdlora/sdlora)"
    return session


def _api_error(resp: requests.Response) -> str:
    """The `error`/`description` fields of a Yandex API error body, if any."""
    try:
        body = resp.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    return " ".join(str(body[k]) for k in ("error", "description", "message") if body.get(k))


def _status_error(resp: requests.Response, link: str, what: str) -> DownloadError:
    """One-line DownloadError for a failed API or file response."""
    code = resp.status_code
    detail = _api_error(resp)
    local = "download it in a browser and pass the local folder or .zip to `sdlora prepare`"
    if code == 429 or (code == 403 and "limit" in detail.lower()):
        return DownloadError(f"Yandex Disk download limit exceeded for {link} ({code}); try later, or {local}")
    if code == 404 or code == 410:
        return DownloadError(f"Yandex Disk {what} not found or deleted ({code}): {link}")
    if code == 403:
        return DownloadError(
            f"Yandex Disk {what} is password-protected or its downloads are disabled (403): {link}; {local}"
        )
    if code >= 500:
        return DownloadError(f"Yandex Disk server error {code} for {link} (after retries); try later")
    extra = f": {detail}" if detail else ""
    return DownloadError(f"Yandex Disk refused the {what} ({code}{extra}): {link}")


def _unreachable(api: str, exc: BaseException) -> DownloadError:
    reason = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
    return DownloadError(
        f"cannot reach Yandex Disk at {api} ({reason}; network unreachable or blocked); "
        "check the connection, or download the photos yourself and pass the local folder "
        "or .zip to `sdlora prepare`"
    )


def _verify(path: Path, remote: RemoteFile) -> str | None:
    """None if `path` matches the listing's size and checksums, else what is wrong."""
    size = path.stat().st_size
    if remote.size >= 0 and size != remote.size:
        return f"size {size} bytes, expected {remote.size}"
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            if remote.md5:
                md5.update(block)
            if remote.sha256:
                sha.update(block)
    if remote.md5 and md5.hexdigest() != remote.md5.lower():
        return f"md5 {md5.hexdigest()}, expected {remote.md5}"
    if remote.sha256 and sha.hexdigest() != remote.sha256.lower():
        return f"sha256 {sha.hexdigest()}, expected {remote.sha256}"
    return None


class _Downloader:
    """One download_public call: a session, the cache folder, the listing, the workers."""

    def __init__(
        self,
        link: PublicLink,
        original: str,
        cache_dir: Path,
        api: str,
        *,
        on_progress: Callable[[str, int, int], None] | None,
        retries: int,
        backoff_factor: float,
        timeout: float | tuple[float, float],
        page_size: int,
        workers: int,
        include: Callable[[str], bool] | None,
    ) -> None:
        self.link, self.original, self.api = link, original, api.rstrip("/")
        self.timeout, self.page_size, self.workers = timeout, max(1, page_size), max(1, workers)
        self.backoff_factor = backoff_factor
        self.session = _make_session(retries, backoff_factor, self.workers + 2)
        key = hashlib.sha256(link.public_key.encode("utf-8")).hexdigest()[:16]
        self.root = (cache_dir / key).resolve()
        self.partial_root = (cache_dir / f"{key}.partial").resolve()
        self.index_path = cache_dir / f"{key}.json"
        self.on_progress = on_progress
        self.include = include
        self.skipped: list[str] = []  # remote names `include` turned down
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.done: dict[str, int] = {}
        self.total = 0

    # ---- API ------------------------------------------------------------------------------
    def _get(self, endpoint: str, params: dict[str, Any], what: str) -> dict[str, Any]:
        url = f"{self.api}/v1/disk/public/resources{endpoint}"
        try:
            resp = self.session.get(url, params={"public_key": self.link.public_key, **params}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise _unreachable(self.api, exc) from None
        if resp.status_code != 200:
            raise _status_error(resp, self.original, what)
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise DownloadError(
                f"Yandex Disk API at {self.api} sent an unreadable answer for {self.original}; "
                f"check {API_ENV} or try later"
            )
        return body

    def list_files(self) -> list[_Planned]:
        params = {"path": self.link.path} if self.link.path else {}
        meta = self._get("", {**params, "limit": self.page_size, "offset": 0}, "link")
        # A sub-path opened in the link keeps its place in the cache, so the same file is shared.
        prefix = [safe_component(p) for p in self.link.path.split("/") if p]
        if meta.get("type") == "file":
            rel = "/".join(prefix) or safe_component(meta.get("name") or "file")
            return [self._plan(meta, rel, self.link.path or None)]
        files: list[_Planned] = []
        self._walk(meta, self.link.path or "/", prefix, files, depth=0, seen=set())
        return files

    def _walk(
        self, meta: dict[str, Any], path: str, rel: list[str], out: list[_Planned], *, depth: int, seen: set[str]
    ) -> None:
        seen.add(path)
        items = [it for it in self._page_items(meta, path) if isinstance(it, dict) and isinstance(it.get("path"), str)]
        taken: set[str] = set()
        # Sorted so that clashing names get the same ~N suffix on every run.
        for item in sorted(items, key=lambda it: (str(it.get("name")), it["path"])):
            local = _dedupe(safe_component(item.get("name") or item["path"].rsplit("/", 1)[-1]), taken)
            if item.get("type") == "dir":
                if depth + 1 > MAX_DEPTH or item["path"] in seen:
                    continue
                sub = self._get("", {"path": item["path"], "limit": self.page_size, "offset": 0}, "folder")
                self._walk(sub, item["path"], rel + [local], out, depth=depth + 1, seen=seen)
            elif item.get("type") == "file":
                if self.include is not None and not self.include(str(item.get("name", ""))):
                    self.skipped.append(str(item.get("name", "")))
                    continue
                out.append(self._plan(item, "/".join(rel + [local]), item["path"]))

    def _page_items(self, meta: dict[str, Any], path: str) -> list[dict[str, Any]]:
        embedded = meta.get("_embedded") or {}
        items = list(embedded.get("items") or [])
        total = embedded.get("total")
        last = len(items)
        # Page on while `total` says there is more, or (without `total`) while pages come back full.
        while (len(items) < total) if isinstance(total, int) else (last >= self.page_size):
            page = self._get("", {"path": path, "limit": self.page_size, "offset": len(items)}, "folder")
            more = (page.get("_embedded") or {}).get("items") or []
            if not more:  # the folder shrank while we listed it
                break
            items.extend(more)
            last = len(more)
        return items

    def _plan(self, item: dict[str, Any], rel: str, api_path: str | None) -> _Planned:
        local = (self.root / rel).resolve()
        partial = (self.partial_root / rel).resolve()
        # Defence in depth: sanitised components cannot escape, and this proves it.
        if not local.is_relative_to(self.root) or not partial.is_relative_to(self.partial_root):
            raise DownloadError(
                f"refusing remote name {item.get('name')!r} from {self.original}: "
                "it would be written outside the download cache"
            )
        remote_path = "" if api_path is None else api_path
        url = self.link.public_key + (quote(remote_path, safe="/") if remote_path else "")
        size = item.get("size")
        remote = RemoteFile(
            local_path=local,
            remote_path=remote_path,
            url=url,
            size=int(size) if isinstance(size, int) else -1,
            md5=item.get("md5") or None,
            sha256=item.get("sha256") or None,
        )
        return _Planned(remote, rel, api_path, partial)

    def _href(self, planned: _Planned) -> str:
        params = {} if planned.api_path is None else {"path": planned.api_path}
        body = self._get("/download", params, f"file {planned.remote.remote_path or 'of the link'}")
        href = body.get("href")
        if not isinstance(href, str) or not href.startswith(("http://", "https://")):
            raise DownloadError(
                f"Yandex Disk gave no download address for {planned.remote.url}; "
                "downloads may be disabled for this link"
            )
        return href

    # ---- cache ----------------------------------------------------------------------------
    def load_index(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
            return dict(data.get("files", {})) if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def save_index(self, index: dict[str, dict[str, Any]]) -> None:
        write_json(self.index_path, {"public_key": self.link.public_key, "files": index})

    @staticmethod
    def _record(path: Path, remote: RemoteFile) -> dict[str, Any]:
        st = path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": remote.md5, "sha256": remote.sha256}

    def is_cached(self, planned: _Planned, index: dict[str, dict[str, Any]]) -> bool:
        """A verified copy is in the cache: trusted from the index, else re-hashed once."""
        path, remote = planned.remote.local_path, planned.remote
        try:
            st = path.stat()
        except OSError:
            return False
        if remote.size >= 0 and st.st_size != remote.size:
            return False
        record = index.get(planned.rel)
        if record == self._record(path, remote):
            return True
        if _verify(path, remote) is None:
            index[planned.rel] = self._record(path, remote)
            return True
        return False

    # ---- download -------------------------------------------------------------------------
    def _progress(self, rel: str, nbytes: int) -> None:
        with self.lock:
            self.done[rel] = nbytes
            if self.on_progress is not None:
                self.on_progress(PROGRESS_DESCRIPTION, sum(self.done.values()), self.total)

    def fetch(self, planned: _Planned, index: dict[str, dict[str, Any]]) -> None:
        """Download, verify (one retry on a checksum mismatch), rename into place, record."""
        problem = ""
        for _attempt in (1, 2):
            self._download_partial(planned)
            problem = _verify(planned.partial, planned.remote) or ""
            if not problem:
                planned.remote.local_path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(planned.partial, planned.remote.local_path)
                with self.lock:
                    index[planned.rel] = self._record(planned.remote.local_path, planned.remote)
                    self.save_index(index)
                return
            planned.partial.unlink(missing_ok=True)
            self._progress(planned.rel, 0)
        raise DownloadError(
            f"{planned.remote.url}: downloaded file does not match the listing ({problem}) "
            "twice; the file may be changing or damaged on Yandex Disk, try again later"
        )

    def _download_partial(self, planned: _Planned) -> None:
        """Make planned.partial hold all bytes, resuming with Range after a dropped connection."""
        remote, part = planned.remote, planned.partial
        part.parent.mkdir(parents=True, exist_ok=True)
        drops = stalls = 0
        while True:
            if self.stop.is_set():
                raise DownloadError(f"download of {remote.url} stopped after another file failed")
            have = part.stat().st_size if part.exists() else 0
            if remote.size >= 0 and have > remote.size:
                part.unlink()
                have = 0
            if remote.size >= 0 and have == remote.size and have > 0:
                return  # complete (e.g. left by an earlier run that stopped before verifying)
            href = self._href(planned)
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                complete = self._stream(href, headers, have, planned)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                drops += 1
                # Each GET already had urllib3's retries; two in a row without a byte = the network is gone.
                stalls = 0 if part.exists() and part.stat().st_size > have else stalls + 1
                if drops > MAX_RESUMES or stalls >= 2:
                    raise DownloadError(
                        f"download of {remote.url} kept breaking off ({drops} times, "
                        f"last: {type(exc).__name__}); check the network and run the same "
                        "command again to resume it"
                    ) from None
                time.sleep(self.backoff_factor * drops)
                continue
            if complete:
                return
            drops += 1  # the server ended the body early without an error
            if drops > MAX_RESUMES:
                raise DownloadError(f"download of {remote.url} keeps ending early; try again later")

    def _stream(self, href: str, headers: dict[str, str], have: int, planned: _Planned) -> bool:
        """One GET of the file; True when the partial file is complete."""
        remote, part = planned.remote, planned.partial
        with self.session.get(href, headers=headers, stream=True, timeout=self.timeout) as resp:
            if resp.status_code == 416:  # our partial file is not a prefix the server knows
                part.unlink(missing_ok=True)
                return False
            if resp.status_code not in (200, 206):
                raise _status_error(resp, self.original, f"file {remote.remote_path or 'of the link'}")
            start = _content_range_start(resp.headers.get("Content-Range"))
            if resp.status_code == 206 and have and start == have:
                mode, written = "ab", have
            elif resp.status_code == 200:
                mode, written = "wb", 0  # no Range support: start over
            else:
                part.unlink(missing_ok=True)  # a 206 for some other range: do not trust it
                return False
            self._progress(planned.rel, written)
            with open(part, mode) as out:
                for chunk in resp.iter_content(CHUNK):
                    if self.stop.is_set():
                        raise DownloadError(f"download of {remote.url} stopped after another file failed")
                    out.write(chunk)
                    written += len(chunk)
                    self._progress(planned.rel, written)
                    if remote.size >= 0 and written > remote.size:
                        return True  # longer than listed: verification will say so
        return remote.size < 0 or written >= remote.size

    def run(self, cache_dir: Path) -> list[RemoteFile]:
        planned = self.list_files()
        if not planned and self.skipped:
            shown = ", ".join(repr(n) for n in sorted(self.skipped)[:3])
            raise DownloadError(
                f"Yandex Disk folder {self.original} has no files sdlora can use "
                f"({len(self.skipped)} other files, e.g. {shown})"
            )
        if not planned:
            raise DownloadError(f"Yandex Disk folder {self.original} has no files (it and its sub-folders are empty)")
        cache_dir.mkdir(parents=True, exist_ok=True)
        index = self.load_index()
        todo = [p for p in planned if not self.is_cached(p, index)]
        todo_rels = {p.rel for p in todo}
        self.total = sum(max(p.remote.size, 0) for p in planned)
        for p in planned:
            self.done[p.rel] = 0 if p.rel in todo_rels else max(p.remote.size, 0)
        self._check_space(todo, cache_dir)
        self._progress(planned[0].rel, self.done[planned[0].rel])  # cached bytes count as done
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.workers, len(todo))) as pool:
                futures = [pool.submit(self.fetch, p, index) for p in todo]
                try:
                    wait(futures, return_when=FIRST_EXCEPTION)
                except BaseException:  # Ctrl-C: stop the workers at their next chunk, keep .partial files
                    self.stop.set()
                    for f in futures:
                        f.cancel()
                    raise
                failed = [f for f in futures if f.done() and f.exception() is not None]
                if failed:
                    self.stop.set()
                    for f in futures:
                        f.cancel()
                    wait(futures)
                    raise failed[0].exception()  # type: ignore[misc]
        self.save_index(index)
        shutil.rmtree(self.partial_root, ignore_errors=True)
        return [p.remote for p in sorted(planned, key=lambda p: p.rel)]

    def _check_space(self, todo: list[_Planned], cache_dir: Path) -> None:
        need = sum(max(p.remote.size, 0) for p in todo)
        free = shutil.disk_usage(cache_dir).free
        if need > free:
            raise DownloadError(
                f"not enough disk space in {cache_dir} for {self.original}: need "
                f"{need / 1e6:.0f} MB, {free / 1e6:.0f} MB free; set SDLORA_CACHE to another disk"
            )


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-", value or "")
    return int(match.group(1)) if match else None


def download_public(
    link: str,
    cache_dir: Path,
    *,
    api_base: str | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    page_size: int = DEFAULT_PAGE_SIZE,
    workers: int = DEFAULT_WORKERS,
    include: Callable[[str], bool] | None = None,
) -> list[RemoteFile]:
    """Download every file of a Yandex Disk public link (folder, recursively, or single file).

    Returns the verified files in the cache, sorted by local path. Files verified by an earlier
    call are not downloaded again. `api_base` defaults to $SDLORA_YANDEX_API or
    https://cloud-api.yandex.net. Progress: on_progress("download", bytes_done, bytes_total).
    Raises DownloadError (one line) for a malformed link, 404, 403, a download limit (429 that
    persists), an empty folder, an unreachable network, or a file that fails verification twice.
    `include(name)` (optional) picks which files of a folder to download, e.g. by extension, so a
    folder's videos are not fetched only to be skipped; a single-file link is always downloaded.
    """
    parsed = parse_public_link(link)
    api = api_base or os.environ.get(API_ENV) or DEFAULT_API
    if not re.match(r"^https?://[^/]", api):
        raise DownloadError(
            f"Yandex Disk API address {api!r} (from {API_ENV} or the option) must start with http:// or https://"
        )
    downloader = _Downloader(
        parsed,
        link.strip(),
        Path(cache_dir),
        api,
        on_progress=on_progress,
        retries=retries,
        backoff_factor=backoff_factor,
        timeout=timeout,
        page_size=page_size,
        workers=workers,
        include=include,
    )
    try:
        return downloader.run(Path(cache_dir))
    finally:
        downloader.session.close()
