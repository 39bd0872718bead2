"""Download a Yandex Disk public link (folder or single file) into a verified local cache.

The API (links, session, errors, listing) is data/yandex_api.py; this module is the cache.

Cache layout: `<cache_dir>/<sha256(public key)[:16]>/<safe relative path>`. Every file is
streamed to `<cache_dir>/<key>.partial/<safe relative path>`, checked against the listing's size,
md5 and sha256, and only then renamed into place, so a file in the cache folder is always a
verified one. `<cache_dir>/<key>.json` records what was verified (size, mtime, checksums) so a
second run re-uses the cache without hashing or downloading anything. A dropped download is
resumed with a Range request (a leftover `.partial` file from an earlier, interrupted run too);
a server that answers 200 instead of 206 gets a full download. Every local path is checked to
stay inside the cache.

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
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import requests

from sdlora.data.yandex_api import (
    API_ENV,
    DEFAULT_API,
    DEFAULT_BACKOFF_FACTOR,
    DEFAULT_PAGE_SIZE,
    DEFAULT_RETRIES,
    ApiClient,
    PublicLink,
    is_yandex_link,
    make_session,
    network_cause,
    parse_public_link,
    safe_component,
    status_error,
    timed_get,
)
from sdlora.errors import DownloadError
from sdlora.events import ProgressFn
from sdlora.fsutil import write_json

__all__ = ["PublicLink", "RemoteFile", "download_public", "is_yandex_link", "parse_public_link", "safe_component"]

PROGRESS_DESCRIPTION = "download"
DEFAULT_WORKERS = 4  # parallel file downloads; Yandex is slow per connection, fast in parallel
MAX_RESUMES = 5  # dropped connections tolerated per file before giving up
CHUNK = 1 << 16


@dataclass
class RemoteFile:
    local_path: Path  # verified file in the cache
    remote_path: str  # path inside the public resource ("/IMG_4651.HEIC"; "" for a single-file link)
    url: str  # the public link + path, for the manifest's `source`
    size: int
    md5: str | None
    sha256: str | None


@dataclass
class _Planned:
    remote: RemoteFile
    rel: str  # safe relative path inside the resource's cache folder (posix separators)
    api_path: str | None  # `path` for the download call; None for a single-file link
    partial: Path


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
        on_progress: ProgressFn | None,
        retries: int,
        backoff_factor: float,
        timeout: float | tuple[float, float] | None,
        page_size: int,
        workers: int,
        include: Callable[[str], bool] | None,
    ) -> None:
        self.link, self.original, self.workers = link, original, max(1, workers)
        self.timeout, self.backoff_factor = timeout, backoff_factor
        self.session = make_session(retries, backoff_factor, self.workers + 2)
        self.client = ApiClient(
            link, original, api, self.session, timeout=timeout, page_size=page_size, include=include
        )
        key = hashlib.sha256(link.public_key.encode("utf-8")).hexdigest()[:16]
        self.root = (cache_dir / key).resolve()
        self.partial_root = (cache_dir / f"{key}.partial").resolve()
        self.index_path = cache_dir / f"{key}.json"
        self.on_progress = on_progress
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.done: dict[str, int] = {}
        self.total = 0

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
            href = self.client.href(planned.api_path, remote.remote_path, remote.url)
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
                        f"last: {network_cause(exc)}); check the network and run the same "
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
        with timed_get(self.session, href, headers=headers, stream=True, timeout=self.timeout) as resp:
            if resp.status_code == 416:  # our partial file is not a prefix the server knows
                part.unlink(missing_ok=True)
                return False
            if resp.status_code not in (200, 206):
                raise status_error(resp, self.original, f"file {remote.remote_path or 'of the link'}")
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
        planned = [self._plan(f.item, f.rel, f.api_path) for f in self.client.list_files()]
        skipped = self.client.skipped
        if not planned and skipped:
            shown = ", ".join(repr(n) for n in sorted(skipped)[:3])
            raise DownloadError(
                f"Yandex Disk folder {self.original} has no files sdlora can use "
                f"({len(skipped)} other files, e.g. {shown})"
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
    on_progress: ProgressFn | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
    timeout: float | tuple[float, float] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    workers: int = DEFAULT_WORKERS,
    include: Callable[[str], bool] | None = None,
) -> list[RemoteFile]:
    """Download every file of a Yandex Disk public link (folder, recursively, or single file).

    Returns the verified files in the cache, sorted by local path. Files verified by an earlier
    call are not downloaded again. `api_base` defaults to $SDLORA_YANDEX_API or
    https://cloud-api.yandex.net. `timeout` (connect, read) defaults to yandex_api's CONNECT_TIMEOUT
    and READ_TIMEOUT; each request and its retries end within REQUEST_DEADLINE. Progress: on_progress("download", bytes_done, bytes_total).
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
