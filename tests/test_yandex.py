"""Yandex Disk public links against a real HTTP server on 127.0.0.1 (tests/yandex_stub.py).

Nothing is patched and nothing leaves the machine: the client's session, urllib3 retries,
streaming, Range resume and cache run for real over loopback.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time
from pathlib import Path

import pytest

from sdlora.data import yandex
from sdlora.data.yandex import RemoteFile, download_public, is_yandex_link, parse_public_link, safe_component
from sdlora.errors import DownloadError
from yandex_stub import FakeYandex

FOLDER = "https://disk.yandex.ru/d/f0lder"
FAST = {"backoff_factor": 0.0, "retries": 3}


def blob(seed: int, size: int = 3000) -> bytes:
    return random.Random(seed).randbytes(size)


def cache_key(public_key: str) -> str:
    return hashlib.sha256(public_key.encode()).hexdigest()[:16]


@pytest.fixture
def fake() -> FakeYandex:
    server = FakeYandex().start()
    yield server
    server.close()


@pytest.fixture
def big_folder(fake: FakeYandex) -> dict[str, bytes]:
    """25 photos at the root (two listing pages of 20), a sub-folder, an empty nested folder."""
    spec: dict = {f"IMG_{i:04d}.HEIC": blob(i) for i in range(25)}
    spec["sub"] = {"a.jpg": blob(100), "deeper": {"b.png": blob(101)}, "empty": {}}
    fake.add_folder(FOLDER, spec)
    expected = {f"/IMG_{i:04d}.HEIC": blob(i) for i in range(25)}
    expected.update({"/sub/a.jpg": blob(100), "/sub/deeper/b.png": blob(101)})
    return expected


def one_line(exc: pytest.ExceptionInfo[DownloadError]) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ---- links and names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "https://disk.yandex.ru/d/d_2ADwdTPRPs8A",
        "https://disk.360.yandex.ru/d/a2_bgE1W3E_rqA",
        "http://disk.yandex.com/d/abc/sub",
        "https://yadi.sk/d/abc",
        "yadi.sk/d/abc",
        "disk.yandex.ru/i/abc",
        "https://disk.yandex.ru/client/disk",  # a Yandex URL, but private: routed here for a clear error
    ],
)
def test_is_yandex_link_true(source: str) -> None:
    assert is_yandex_link(source)


@pytest.mark.parametrize(
    "source",
    [
        "./photos",
        "photos.zip",
        "/home/me/yadi.sk",
        "https://example.com/d/abc",
        "https://yandex.ru/d/abc",
        "C:\\photos",
        "https://disk.yandex.ru.evil.com/d/abc",
        "",
    ],
)
def test_is_yandex_link_false(source: str) -> None:
    assert not is_yandex_link(source)


def test_parse_public_link_forms() -> None:
    assert parse_public_link("https://disk.360.yandex.ru/d/a2_bgE1W3E_rqA?w=1#x") == yandex.PublicLink(
        "https://disk.360.yandex.ru/d/a2_bgE1W3E_rqA", ""
    )
    assert parse_public_link("yadi.sk/d/abc/Sub%20dir/x") == yandex.PublicLink("https://yadi.sk/d/abc", "/Sub dir/x")
    assert parse_public_link("https://disk.yandex.ru/i/xyz").path == ""
    assert parse_public_link("https://yadi.sk/public/?hash=K3y%3D").public_key == "K3y="


@pytest.mark.parametrize(
    "link",
    [
        "https://disk.yandex.ru/client/disk/photos",
        "https://disk.yandex.ru/d/",
        "https://example.com/d/abc",
        "not a link",
    ],
)
def test_malformed_link_is_one_clear_line(link: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as exc:
        download_public(link, tmp_path, api_base="http://127.0.0.1:9")
    assert "not a Yandex Disk public link" in one_line(exc)
    assert not any(tmp_path.iterdir())


def test_bad_api_address_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDLORA_YANDEX_API", "localhost:8080")
    with pytest.raises(DownloadError) as exc:
        download_public(FOLDER, tmp_path)
    assert "SDLORA_YANDEX_API" in one_line(exc) and "http://" in one_line(exc)


@pytest.mark.parametrize(
    "name, safe",
    [
        ("IMG_4651.HEIC", "IMG_4651.HEIC"),
        ("../../evil.png", ".._.._evil.png"),
        ("a/b.png", "a_b.png"),
        ("..", "_"),
        (".", "_"),
        ("", "_"),
        ("x\\..\\y.png", "x_.._y.png"),
        ("nul\x00.png", "nul_.png"),
        ("bell\x07\x1b[31m.png", "bell__[31m.png"),
        ("CON.png", "_CON.png"),
        ("trail. ", "trail"),
        ("фото.jpg", "фото.jpg"),
    ],
)
def test_safe_component(name: str, safe: str) -> None:
    assert safe_component(name) == safe


def test_safe_component_truncates_long_names_keeping_the_suffix() -> None:
    out = safe_component("я" * 300 + ".HEIC")
    assert out.endswith(".HEIC") and len(out.encode()) <= 200


# ---- folders, paging, progress, cache ------------------------------------------------------


def test_folder_with_paging_and_nested_subfolders(
    fake: FakeYandex, big_folder: dict[str, bytes], tmp_path: Path
) -> None:
    events: list[tuple[str, int, int]] = []
    files = download_public(
        FOLDER, tmp_path, api_base=fake.base, page_size=20, on_progress=lambda *e: events.append(e), **FAST
    )

    assert sorted(f.remote_path for f in files) == sorted(big_folder)
    root = tmp_path / cache_key(FOLDER)
    for f in files:
        assert isinstance(f, RemoteFile)
        assert f.local_path.read_bytes() == big_folder[f.remote_path]
        assert f.local_path == root / f.remote_path.lstrip("/")
        assert f.size == len(big_folder[f.remote_path])
        assert f.md5 == hashlib.md5(big_folder[f.remote_path]).hexdigest()
        assert f.sha256 == hashlib.sha256(big_folder[f.remote_path]).hexdigest()
        assert f.url == FOLDER + f.remote_path
    # The root listing was paged: offsets 0 and 20 with limit 20.
    root_pages = [h.query for h in fake.hits if h.kind == "list" and h.path == "/"]
    assert [(q.get("offset", "0"), q["limit"]) for q in root_pages] == [("0", "20"), ("20", "20")]
    assert fake.count("list", "/sub/deeper") == 1 and fake.count("list", "/sub/empty") == 1
    # Progress: one description, bytes summed over all files, ending complete.
    total = sum(len(b) for b in big_folder.values())
    assert {e[0] for e in events} == {"download"}
    assert all(e[2] == total for e in events)
    assert events[-1] == ("download", total, total)
    # Nothing half-written is left behind.
    assert not (tmp_path / f"{cache_key(FOLDER)}.partial").exists()
    assert not [
        p
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() not in {k.lstrip("/") for k in big_folder}
    ]


def test_second_call_reuses_the_cache_and_redownloads_a_damaged_file(
    fake: FakeYandex, big_folder: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    assert fake.count("file") == len(big_folder)
    fake.hits.clear()

    events: list[tuple[str, int, int]] = []
    second = download_public(FOLDER, tmp_path, api_base=fake.base, on_progress=lambda *e: events.append(e), **FAST)
    assert second == first
    assert fake.count("href") == 0 and fake.count("file") == 0  # listing only
    total = sum(len(b) for b in big_folder.values())
    assert events[-1] == ("download", total, total)

    # The index of verified files is trusted: the second call hashed nothing either.
    hashed: list[Path] = []
    verify = yandex._verify
    monkeypatch.setattr(yandex, "_verify", lambda path, remote: hashed.append(path) or verify(path, remote))
    download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    assert hashed == []

    # A cached file damaged on disk (same size, new mtime) is detected and fetched again, alone.
    damaged = next(f for f in first if f.remote_path == "/sub/a.jpg")
    st = damaged.local_path.stat()
    damaged.local_path.write_bytes(b"\0" * st.st_size)
    os.utime(damaged.local_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fake.hits.clear()
    third = download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    assert [h.path for h in fake.hits if h.kind == "file"] == ["/sub/a.jpg"]
    assert damaged.local_path in hashed  # re-checked because its mtime changed
    assert damaged.local_path.read_bytes() == big_folder["/sub/a.jpg"]
    assert third == first


def test_subfolder_link_shares_the_cache_layout(fake: FakeYandex, big_folder: dict[str, bytes], tmp_path: Path) -> None:
    files = download_public(FOLDER + "/sub", tmp_path, api_base=fake.base, **FAST)
    assert sorted(f.remote_path for f in files) == ["/sub/a.jpg", "/sub/deeper/b.png"]
    assert files[0].local_path == tmp_path / cache_key(FOLDER) / "sub" / "a.jpg"


def test_single_file_link_via_env_api_base(fake: FakeYandex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "https://disk.360.yandex.ru/i/0neFile"
    fake.add_file(key, "IMG_4651.HEIC", blob(7, 5000))
    monkeypatch.setenv("SDLORA_YANDEX_API", fake.base)
    [f] = download_public(key, tmp_path, **FAST)
    assert f.remote_path == "" and f.url == key and f.size == 5000
    assert f.local_path == tmp_path / cache_key(key) / "IMG_4651.HEIC"
    assert f.local_path.read_bytes() == blob(7, 5000)
    assert "path" not in next(h for h in fake.hits if h.kind == "href").query


def test_empty_folder(fake: FakeYandex, tmp_path: Path) -> None:
    fake.add_folder(FOLDER, {"nothing": {}, "also": {"here": {}}})
    with pytest.raises(DownloadError) as exc:
        download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    assert "has no files" in one_line(exc) and FOLDER in one_line(exc)


def test_include_filter_skips_unwanted_files_before_download(fake: FakeYandex, tmp_path: Path) -> None:
    fake.add_folder(FOLDER, {"IMG_1.HEIC": blob(1), "IMG_1.MOV": blob(2, 50_000), "sub": {"notes.txt": b"x"}})
    only_photos = lambda name: name.lower().endswith((".heic", ".jpg", ".png"))  # noqa: E731
    files = download_public(FOLDER, tmp_path, api_base=fake.base, include=only_photos, **FAST)
    assert [f.remote_path for f in files] == ["/IMG_1.HEIC"]
    assert fake.count("file", "/IMG_1.MOV") == 0 and fake.count("href", "/IMG_1.MOV") == 0

    fake.add_folder(FOLDER, {"clip.mov": blob(3), "readme.txt": b"x"})
    with pytest.raises(DownloadError) as exc:
        download_public(FOLDER, tmp_path, api_base=fake.base, include=only_photos, **FAST)
    assert "has no files sdlora can use (2 other files" in one_line(exc)


# ---- flaky network --------------------------------------------------------------------------


def test_429_with_retry_after_then_success(fake: FakeYandex, big_folder: dict[str, bytes], tmp_path: Path) -> None:
    fake.list_429_once["/"] = 1  # Retry-After: 1 s, honoured by urllib3's Retry
    fake.href_503_once.add("/IMG_0003.HEIC")  # a 5xx on the download endpoint, retried too
    start = time.monotonic()
    files = download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    assert time.monotonic() - start >= 0.9
    assert len(files) == len(big_folder)
    assert [h.status for h in fake.hits if h.kind == "list" and h.path == "/"][:2] == [429, 200]
    assert fake.count("href", "/IMG_0003.HEIC") == 2
    assert (tmp_path / cache_key(FOLDER) / "IMG_0003.HEIC").read_bytes() == big_folder["/IMG_0003.HEIC"]


def test_dropped_connection_resumes_with_range(fake: FakeYandex, tmp_path: Path) -> None:
    data = blob(1, 300_000)
    fake.add_folder(FOLDER, {"big.heic": data, "small.png": blob(2)})
    fake.drop_once.add("/big.heic")
    files = download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    assert next(f for f in files if f.remote_path == "/big.heic").local_path.read_bytes() == data
    first, second = fake.file_hits("/big.heic")
    assert "Range" not in first.headers
    have = int(second.headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < have < len(data) and second.status == 206


def test_dropped_connection_without_range_support_downloads_again(fake: FakeYandex, tmp_path: Path) -> None:
    data = blob(3, 200_000)
    fake.add_folder(FOLDER, {"big.heic": data})
    fake.drop_once.add("/big.heic")
    fake.ignore_range.add("/big.heic")
    [f] = download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    assert f.local_path.read_bytes() == data
    assert [h.status for h in fake.file_hits("/big.heic")] == [200, 200]


def test_file_host_unreachable_gives_up_quickly(fake: FakeYandex, tmp_path: Path) -> None:
    fake.add_folder(FOLDER, {"a.png": blob(1)})
    fake.dead_href.add("/a.png")
    with pytest.raises(DownloadError) as exc:
        download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    message = one_line(exc)
    assert "/a.png" in message and "run the same command again" in message
    assert fake.count("href", "/a.png") == 2  # two GETs without a byte, not MAX_RESUMES of them


def test_listing_without_total_pages_until_a_short_page(
    fake: FakeYandex, big_folder: dict[str, bytes], tmp_path: Path
) -> None:
    fake.omit_total = True
    files = download_public(FOLDER, tmp_path, api_base=fake.base, page_size=10, **FAST)
    assert sorted(f.remote_path for f in files) == sorted(big_folder)
    offsets = [h.query.get("offset", "0") for h in fake.hits if h.kind == "list" and h.path == "/"]
    assert offsets == ["0", "10", "20"]


def test_partial_file_from_an_interrupted_run_is_resumed(fake: FakeYandex, tmp_path: Path) -> None:
    data = blob(4, 100_000)
    fake.add_folder(FOLDER, {"big.heic": data})
    partial = tmp_path / f"{cache_key(FOLDER)}.partial" / "big.heic"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:40_000])
    [f] = download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    assert f.local_path.read_bytes() == data
    [hit] = fake.file_hits("/big.heic")
    assert hit.headers["Range"] == "bytes=40000-" and hit.status == 206
    assert not partial.exists()


def test_checksum_mismatch_is_retried_once_then_succeeds(fake: FakeYandex, tmp_path: Path) -> None:
    fake.add_folder(FOLDER, {"a.png": blob(5)})
    fake.corrupt["/a.png"] = 1
    [f] = download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    assert f.local_path.read_bytes() == blob(5)
    assert len(fake.file_hits("/a.png")) == 2


def test_wrong_md5_is_retried_once_then_an_error_naming_the_file(fake: FakeYandex, tmp_path: Path) -> None:
    fake.add_folder(FOLDER, {"ok.png": blob(6), "bad.png": blob(7)})
    fake.wrong_md5.add("/bad.png")
    with pytest.raises(DownloadError) as exc:
        download_public(FOLDER, tmp_path, api_base=fake.base, workers=1, **FAST)
    message = one_line(exc)
    assert "/bad.png" in message and "md5" in message
    assert len(fake.file_hits("/bad.png")) == 2
    assert not (tmp_path / cache_key(FOLDER) / "bad.png").exists()  # never renamed into place


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, words",
    [
        (404, "not found or deleted"),
        (403, "password-protected or its downloads are disabled"),
        (429, "download limit exceeded"),
    ],
)
def test_error_statuses_are_one_clear_line(fake: FakeYandex, tmp_path: Path, status: int, words: str) -> None:
    fake.add_folder(FOLDER, {"a.png": blob(1)})
    fake.status[FOLDER] = status
    with pytest.raises(DownloadError) as exc:
        download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    assert words in one_line(exc) and FOLDER in one_line(exc)
    if status == 429:  # retried before giving up
        assert fake.count("list") == FAST["retries"] + 1


def test_unknown_link_is_404(fake: FakeYandex, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as exc:
        download_public("https://disk.yandex.ru/d/deleted", tmp_path, api_base=fake.base, **FAST)
    assert "not found or deleted" in one_line(exc)


def test_file_download_limit_that_persists(fake: FakeYandex, tmp_path: Path) -> None:
    fake.add_folder(FOLDER, {"a.png": blob(1)})
    fake.file_429_always.add("/a.png")
    with pytest.raises(DownloadError) as exc:
        download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    assert "download limit exceeded" in one_line(exc) and "try later" in one_line(exc)


def test_unreachable_network_suggests_a_local_folder(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as exc:
        download_public(FOLDER, tmp_path, api_base=f"http://127.0.0.1:{port}", **FAST)
    message = one_line(exc)
    assert "cannot reach Yandex Disk" in message and "local folder" in message


# ---- untrusted names --------------------------------------------------------------------------


def test_traversal_names_stay_inside_the_cache(fake: FakeYandex, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    spec = {
        "../../evil.png": blob(1),
        "a/b.png": blob(2),
        "a_b.png": blob(3),
        "x\\..\\y.png": blob(4),
        "nul\x00.png": blob(5),
        "bell\x07.png": blob(6),
        "..": {"z.png": blob(7), "../up.png": blob(8)},
        "/abs.png": blob(9),
    }
    fake.add_folder(FOLDER, spec)
    files = download_public(FOLDER, cache, api_base=fake.base, **FAST)

    root = (cache / cache_key(FOLDER)).resolve()
    assert len(files) == 9 and len({f.local_path for f in files}) == 9  # clashes got distinct names
    for f in files:
        assert f.local_path.resolve().is_relative_to(root)
        assert all(ch not in f.local_path.name for ch in "\x00\x07\\")
    served = {f.remote_path: f.local_path.read_bytes() for f in files}
    assert served["/../../evil.png"] == blob(1) and served["/../z.png"] == blob(7)
    # Nothing was written anywhere but the cache folder.
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not p.resolve().is_relative_to(cache.resolve())]
    assert outside == []
    assert (root / "_" / "z.png").read_bytes() == blob(7)  # the ".." folder became "_"


# ---- servers that never answer ------------------------------------------------------------------


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdlora.data import yandex_api

    monkeypatch.setattr(yandex_api, "CONNECT_TIMEOUT", 0.5, raising=False)
    monkeypatch.setattr(yandex_api, "READ_TIMEOUT", 0.3, raising=False)
    monkeypatch.setattr(yandex_api, "REQUEST_DEADLINE", 1.5, raising=False)


def _within(seconds: float, fn):
    """fn()'s exception, failing the test (instead of hanging it) if it takes longer than `seconds`."""
    import threading

    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert out, f"still waiting after {seconds} s"
    return out[0], time.monotonic() - start


def test_a_server_that_accepts_and_never_answers_fails_fast_saying_so(tmp_path: Path, short_timeouts) -> None:
    from yandex_stub import SilentServer

    silent = SilentServer()
    try:
        # The default retries (5) and backoff: the request deadline, not the retry count, ends it.
        exc, took = _within(8, lambda: download_public(FOLDER, tmp_path, api_base=silent.base))
    finally:
        silent.close()
    assert isinstance(exc, DownloadError), exc
    message = str(exc)
    assert "\n" not in message and "read timed out" in message and "sent no answer within 0.3 s" in message
    assert took < 3.0 and silent.accepted <= 4


def test_a_name_that_does_not_resolve_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    exc, took = _within(8, lambda: download_public(FOLDER, tmp_path, api_base="http://api.invalid"))
    assert isinstance(exc, DownloadError), exc
    assert "DNS lookup failed" in str(exc) and "cannot reach Yandex Disk at http://api.invalid" in str(exc)
    assert lookups == ["api.invalid"] and took < 2.0


def test_the_listing_has_an_overall_deadline(fake: FakeYandex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdlora.data import yandex_api

    fake.add_folder(FOLDER, {f"d{i}": {"a.png": blob(i)} for i in range(3)})
    clock = iter(range(0, 10_000, 50))  # every look at the clock: 50 s later
    monkeypatch.setattr(yandex_api.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(yandex_api, "LISTING_DEADLINE", 120.0, raising=False)
    with pytest.raises(DownloadError) as exc:
        download_public(FOLDER, tmp_path, api_base=fake.base, **FAST)
    assert "took over 120 s" in one_line(exc)
