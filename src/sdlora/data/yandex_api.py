"""The Yandex Disk public resources API: links, the HTTP session, errors, and the listing.

The API needs no token:

    GET {api}/v1/disk/public/resources?public_key=<link>&path=<p>&limit=&offset=
        -> the resource; for a folder its children are in `_embedded.items`
           (`name`, `path`, `type` "file"/"dir", `size`, `md5`, `sha256`), paged by offset/limit/total
    GET {api}/v1/disk/public/resources/download?public_key=<link>&path=<p>
        -> {"href": ...}; GET href streams the bytes

Every request retries connection errors, 429 and 5xx (urllib3, Retry-After capped), and every
failure is one DownloadError line that says what failed (DNS lookup, connect, no answer).
A server that accepts and never answers, or a network that drops packets, cannot hold the user
long: each attempt has a connect and a read timeout (CONNECT_TIMEOUT, READ_TIMEOUT), retries of
an attempt that failed stop once REQUEST_DEADLINE seconds would pass, a name that does not
resolve is not retried, and the whole listing of a link has LISTING_DEADLINE seconds. Tests set
these module constants lower. Remote names are untrusted: the listing gives each file a
local relative path whose components are sanitised on their own (`/`, `\\`, NUL, control
characters and characters Windows forbids become `_`; `.`/`..` and empty names become `_`;
clashing names get a `~2` suffix). Downloading and verifying the files is data/yandex.py.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, NameResolutionError
from urllib3.util.retry import Retry

from sdlora.errors import DownloadError

DEFAULT_API = "https://cloud-api.yandex.net"
API_ENV = "SDLORA_YANDEX_API"

DEFAULT_RETRIES = 5  # per request, for connection/read errors, 429 and 5xx
DEFAULT_BACKOFF_FACTOR = 0.5  # seconds; urllib3 sleeps factor * 2**(n-1) between retries
MAX_RETRY_AFTER = 30.0  # a longer Retry-After means "come back later": don't hang for hours
CONNECT_TIMEOUT = 5.0  # seconds to open a connection (a TCP handshake takes well under one)
READ_TIMEOUT = 10.0  # seconds of silence from a connected server (the API answers in under one)
REQUEST_DEADLINE = 30.0  # seconds for one request, its retries included (not Retry-After waits)
LISTING_DEADLINE = 120.0  # seconds for the whole listing of a link, every folder and page
DEFAULT_PAGE_SIZE = 100  # items per listing request (the API's own default is 20)
MAX_DEPTH = 32  # sub-folder nesting we follow (guards against a looping listing)

_HOST_RE = re.compile(r"^(www\.)?(disk\.(360\.)?yandex\.[a-z]{2,3}(\.[a-z]{2})?|yadi\.sk)$")
# Control characters (C0, DEL, C1), both slashes, and what Windows forbids in a file name.
_UNSAFE_RE = re.compile(r'[\x00-\x1f\x7f-\x9f/\\:*?"<>|]')
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_MAX_NAME_BYTES = 200


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


@dataclass(frozen=True)
class PublicLink:
    """A parsed public link: what the API calls `public_key`, plus a sub-folder opened in it."""

    public_key: str
    path: str  # "" for the resource root, else "/sub/folder"


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


def default_timeout() -> tuple[float, float]:
    """(connect, read) seconds for each attempt, read when the request is made (tests lower them)."""
    return (CONNECT_TIMEOUT, READ_TIMEOUT)


_deadline = threading.local()  # .at: monotonic time after which a failed attempt is not retried


class _CappedRetry(Retry):
    """urllib3 Retry whose Retry-After wait is capped at MAX_RETRY_AFTER seconds, that does not
    retry a name that does not resolve, and that stops retrying errors once another attempt
    could not finish before the request's deadline (`timed_get`)."""

    def get_retry_after(self, response: Any) -> float | None:
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, MAX_RETRY_AFTER)

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):  # type: ignore[override]
        if isinstance(error, NameResolutionError):
            raise MaxRetryError(_pool, url, error) from error  # DNS: asking again gives the same answer
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        end = getattr(_deadline, "at", None)
        if error is not None and end is not None:
            attempt = sum(default_timeout())
            if time.monotonic() + new.get_backoff_time() + attempt > end:
                raise MaxRetryError(_pool, url, error) from error
        return new


def timed_get(session: requests.Session, url: str, *, end: float | None = None, **kwargs: Any) -> requests.Response:
    """`session.get` with the connect/read timeouts and a deadline for its retries: REQUEST_DEADLINE
    seconds from now, or `end` (a time.monotonic() value) when that is sooner."""
    end_at = time.monotonic() + REQUEST_DEADLINE
    _deadline.at = end_at if end is None else min(end, end_at)
    try:
        return session.get(url, timeout=kwargs.pop("timeout", None) or default_timeout(), **kwargs)
    finally:
        _deadline.at = None


def make_session(retries: int, backoff_factor: float, pool: int) -> requests.Session:
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


def status_error(resp: requests.Response, link: str, what: str) -> DownloadError:
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


def _chain(exc: BaseException | None):
    """`exc` and what it wraps: requests' args, urllib3's MaxRetryError.reason, causes, contexts."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "reason", None), e.__cause__, e.__context__]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]


def network_cause(exc: BaseException) -> str:
    """What went wrong on the network, in words: DNS lookup, connect, no answer, refused."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError

    chain = list(_chain(exc))
    connect, read = default_timeout()
    if any(isinstance(e, (NameResolutionError, socket.gaierror)) for e in chain):
        return "DNS lookup failed: the host name does not resolve"
    if any(isinstance(e, (ReadTimeoutError, requests.ReadTimeout)) for e in chain):
        return f"read timed out: the server accepted the connection but sent no answer within {read:g} s"
    if any(isinstance(e, NewConnectionError) for e in chain):
        if any(isinstance(e, ConnectionRefusedError) for e in chain) or "refused" in str(exc).lower():
            return "connection refused"
        return "connection failed"
    if any(isinstance(e, (ConnectTimeoutError, requests.ConnectTimeout)) for e in chain):
        return f"connect timed out: no connection within {connect:g} s"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return "connection failed"


def unreachable(api: str, exc: BaseException) -> DownloadError:
    return DownloadError(
        f"cannot reach Yandex Disk at {api} ({network_cause(exc)}); "
        "check the connection, or download the photos yourself and pass the local folder "
        "or .zip to `sdlora prepare`"
    )


@dataclass(frozen=True)
class Listed:
    """One file of the listing: the API's item, its safe local path, and its `path` for the API."""

    item: dict[str, Any]
    rel: str  # safe relative path inside the resource's cache folder (posix separators)
    api_path: str | None  # `path` for the download call; None for a single-file link


class ApiClient:
    """Requests to the public resources API for one link: listing its files, their download addresses."""

    def __init__(
        self,
        link: PublicLink,
        original: str,
        api: str,
        session: requests.Session,
        *,
        timeout: float | tuple[float, float] | None,
        page_size: int,
        include: Callable[[str], bool] | None,
    ) -> None:
        self.link, self.original, self.api = link, original, api.rstrip("/")
        self.session, self.timeout, self.page_size = session, timeout, max(1, page_size)
        self.include = include
        self.skipped: list[str] = []  # remote names `include` turned down
        self._listing_end: float | None = None  # time.monotonic() deadline while listing

    def _get(self, endpoint: str, params: dict[str, Any], what: str) -> dict[str, Any]:
        url = f"{self.api}/v1/disk/public/resources{endpoint}"
        end = self._listing_end
        if end is not None and time.monotonic() >= end:
            raise DownloadError(
                f"listing {self.original} took over {LISTING_DEADLINE:g} s (Yandex Disk at {self.api} is very "
                "slow); try later, or download the photos yourself and pass the local folder or .zip"
            )
        try:
            resp = timed_get(
                self.session,
                url,
                end=end,
                params={"public_key": self.link.public_key, **params},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise unreachable(self.api, exc) from None
        if resp.status_code != 200:
            raise status_error(resp, self.original, what)
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

    def list_files(self) -> list[Listed]:
        self._listing_end = time.monotonic() + LISTING_DEADLINE
        try:
            return self._list_files()
        finally:
            self._listing_end = None

    def _list_files(self) -> list[Listed]:
        params = {"path": self.link.path} if self.link.path else {}
        meta = self._get("", {**params, "limit": self.page_size, "offset": 0}, "link")
        # A sub-path opened in the link keeps its place in the cache, so the same file is shared.
        prefix = [safe_component(p) for p in self.link.path.split("/") if p]
        if meta.get("type") == "file":
            rel = "/".join(prefix) or safe_component(meta.get("name") or "file")
            return [Listed(meta, rel, self.link.path or None)]
        files: list[Listed] = []
        self._walk(meta, self.link.path or "/", prefix, files, depth=0, seen=set())
        return files

    def _walk(
        self, meta: dict[str, Any], path: str, rel: list[str], out: list[Listed], *, depth: int, seen: set[str]
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
                out.append(Listed(item, "/".join(rel + [local]), item["path"]))

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

    def href(self, api_path: str | None, remote_path: str, url: str) -> str:
        """The address that streams one file's bytes."""
        params = {} if api_path is None else {"path": api_path}
        body = self._get("/download", params, f"file {remote_path or 'of the link'}")
        href = body.get("href")
        if not isinstance(href, str) or not href.startswith(("http://", "https://")):
            raise DownloadError(
                f"Yandex Disk gave no download address for {url}; downloads may be disabled for this link"
            )
        return href
