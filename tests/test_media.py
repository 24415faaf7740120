"""Attachment files: the download rules on their own, and ``client.messages.download`` against
the emulator and `FileHost` origins over real loopback sockets."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from helpers import make_client
from test_export import _meta, start_cli
from test_hardening import leaks
from yarl import URL

import messages_async as ma
from messages_async._download_policy import (
    OriginPauses,
    RefusedURL,
    Resume,
    Validator,
    check_download_url,
    classify,
    content_path,
    extension_for,
    parse_content_range,
    redirect_target,
    request_headers,
    sends_token,
)
from messages_async._limiter import ClientStats
from messages_async.export import (
    Exporter,
    ExportOptions,
    ExportStats,
    JsonlStore,
    MediaFetcher,
    MediaOptions,
    MediaStats,
    ParquetStore,
    SqliteStore,
    Store,
    media_folder,
    progress_line,
    run_with_media,
    summary_lines,
)
from messages_async.testing import Fault, FileHost, MessagesServer

API = URL("https://api.example.test/v1/")

# --- the rules, without I/O ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hop", "left_api", "expected"),
    [
        ("https://api.example.test/v1/files/1", False, True),
        ("https://api.example.test:443/other/path", False, True),  # same origin, any path
        ("https://api.example.test/v1/files/1", True, False),  # after a hop elsewhere
        ("http://api.example.test/v1/files/1", False, False),  # another scheme
        ("https://api.example.test:8443/v1/", False, False),  # another port
        ("https://files.example.test/1", False, False),
        ("https://api.example.test.evil.test/v1/", False, False),
    ],
)
def test_the_token_goes_only_to_the_api_origin_before_leaving_it(
    hop: str, left_api: bool, expected: bool
) -> None:
    assert sends_token(URL(hop), API, left_api=left_api) is expected
    assert sends_token(URL(hop), None, left_api=False) is False


@pytest.mark.parametrize(
    ("url", "insecure", "ok"),
    [
        ("https://files.example.test/a.png", False, True),
        ("http://127.0.0.1:8080/a.png", False, True),
        ("http://localhost/a.png", False, True),
        ("http://files.example.test/a.png", False, False),
        ("http://files.example.test/a.png", True, True),
        ("https://user:pw@files.example.test/a.png", False, False),
        ("ftp://files.example.test/a.png", False, False),
        ("/relative/a.png", False, False),
    ],
)
def test_which_urls_are_fetched(url: str, insecure: bool, ok: bool) -> None:
    if ok:
        check_download_url(URL(url), allow_insecure_http=insecure)
    else:
        with pytest.raises(RefusedURL):
            check_download_url(URL(url), allow_insecure_http=insecure)


def test_a_redirect_is_checked_like_the_url_itself() -> None:
    here = URL("https://files.example.test/a/b")
    assert redirect_target(here, "../c", allow_insecure_http=False) == URL(
        "https://files.example.test/c"
    )
    assert redirect_target(here, "https://cdn.test/x", allow_insecure_http=False).host == "cdn.test"
    for bad in ("http://cdn.test/x", None, "", "https://u:p@cdn.test/x"):
        with pytest.raises(RefusedURL):
            redirect_target(here, bad, allow_insecure_http=False)


@pytest.mark.parametrize(
    ("status", "content_range", "offset", "meaning"),
    [
        (200, None, 0, "whole"),
        (200, None, 500, "whole"),  # the host ignored the range: start over
        (206, "bytes 500-999/1000", 500, "rest"),
        (206, "bytes 0-999/1000", 500, "retry"),  # not where we asked: start over
        (206, "bytes 500-999/1000", 0, "retry"),  # a range nobody asked for
        (206, "garbage", 500, "retry"),
        (301, None, 0, "redirect"),
        (307, None, 0, "redirect"),
        (429, None, 0, "retry"),
        (503, None, 0, "retry"),
        (404, None, 0, "gone"),
        (410, None, 0, "gone"),
        (403, None, 0, "gone"),
    ],
)
def test_what_an_answer_means(
    status: int, content_range: str | None, offset: int, meaning: str
) -> None:
    assert classify(status, content_range=content_range, offset=offset) == meaning


def test_content_range_and_the_resume_headers() -> None:
    assert parse_content_range("bytes 10-19/20") == (10, 19, 20)
    assert parse_content_range("bytes 10-19/*") == (10, 19, None)
    for bad in ("bytes 10-9/20", "bytes 10-20/20", "items 1-2/3", None):
        assert parse_content_range(bad) is None
    assert "Range" not in request_headers(None)
    assert "Range" not in request_headers(Resume(100, None))  # no validator: from byte 0
    strong = request_headers(Resume(100, Validator(etag='"abc"')))
    assert strong["Range"] == "bytes=100-"
    assert strong["If-Range"] == '"abc"'
    assert Validator.from_headers({"ETag": 'W/"weak"'}) is None
    dated = Validator.from_headers({"ETag": 'W/"weak"', "Last-Modified": "Tue, 1 Dec 2026"})
    assert dated is not None
    assert dated.header() == "Tue, 1 Dec 2026"


def test_content_addresses_and_extensions() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    assert content_path(digest, ".pdf") == f"{digest[:2]}/{digest}.pdf"
    with pytest.raises(ValueError, match="SHA-256"):
        content_path("../../etc/passwd", "")
    assert extension_for("Report.PDF", "image/png", "https://h/x.bin") == ".pdf"
    assert extension_for(None, "image/png", "https://h/x") == ".png"
    assert extension_for(None, None, "https://h/a/photo.jpeg?sig=1") == ".jpeg"
    assert extension_for("../../evil.sh/..", None, "https://h/") == ""
    assert extension_for("name.with space", None, "https://h/") == ""


def test_a_429_pauses_that_origin_only() -> None:
    now = [100.0]
    pauses = OriginPauses(lambda: now[0])
    a, b = URL("https://a.test/1"), URL("https://b.test/1")
    pauses.pause(a, 5)
    assert pauses.wait_for(URL("https://a.test/other")) == 5
    assert pauses.wait_for(b) == 0
    assert pauses.wait_for(URL("https://a.test:8443/1")) == 0
    pauses.pause(a, 1)  # a shorter pause does not shorten the longer one
    now[0] += 4
    assert pauses.wait_for(a) == pytest.approx(1)
    now[0] += 1
    assert pauses.wait_for(a) == 0


# --- downloads over real sockets -----------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(chats=2, messages_per_chat=5) as srv:
        yield srv


@pytest.fixture
async def files() -> AsyncIterator[FileHost]:
    async with FileHost() as host:
        yield host


@pytest.fixture
async def other() -> AsyncIterator[FileHost]:
    async with FileHost() as host:
        yield host


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_download_to_a_path_and_to_a_file_object(
    server: MessagesServer, files: FileHost, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    url = files.add("docs/report.pdf", data, content_type="application/pdf")
    attachment = ma.Attachment(type="file", url=url, name="report.pdf", size=len(data))
    async with make_client(server) as client:
        got = await client.messages.download(attachment, tmp_path / "report.pdf")
        buffer = io.BytesIO()
        again = await client.messages.download(url, buffer)
    assert got == ma.Downloaded(
        url=url, size=len(data), sha256=_sha(data), content_type=got.content_type
    )
    assert got.content_type == "application/pdf"
    assert (tmp_path / "report.pdf").read_bytes() == data
    assert not (tmp_path / "report.pdf.part").exists()
    assert buffer.getvalue() == data
    assert again.sha256 == got.sha256


async def test_no_token_and_no_cookie_reach_another_origin(
    server: MessagesServer, files: FileHost, other: FileHost, tmp_path: Path
) -> None:
    data = b"hello" * 1000
    # A hop on the file host that redirects to a third origin, and a file that sets a cookie.
    target = other.add("final.bin", data, set_cookie="sid=from-file-host; Path=/")
    start = files.redirect("start.bin", target)
    # The caller's own session carries a cookie for 127.0.0.1 and a default Authorization.
    jar = aiohttp.CookieJar(unsafe=True)
    jar.update_cookies({"api_session": "secret-cookie"}, URL(server.resource_origin))
    async with (
        aiohttp.ClientSession(
            cookie_jar=jar, headers={"Authorization": "Bearer caller-default"}
        ) as session,
        make_client(server, session=session) as client,
    ):
        for i in range(2):
            got = await client.messages.download(start, tmp_path / f"f{i}")
            assert got.sha256 == _sha(data)
        await client.messages.chats()  # the API itself still works with its token
    seen = files.requests + other.requests
    assert len(other.requests) == 2
    assert seen
    for record in seen:
        assert "Authorization" not in record.headers, record.headers
        assert "Cookie" not in record.headers, record.headers
        assert "Proxy-Authorization" not in record.headers
        assert record.token is None


async def test_the_token_goes_to_the_api_origin_and_not_after_a_file_host(
    server: MessagesServer, files: FileHost, tmp_path: Path
) -> None:
    on_api = server.resource_uri + "files/1.bin"
    bounced = files.redirect("to-api.bin", on_api)
    async with make_client(server) as client:
        # The emulator serves no files: 404, recorded with what it received.
        with pytest.raises(ma.DownloadError) as direct:
            await client.messages.download(on_api, tmp_path / "a")
        server.reset_stats()
        with pytest.raises(ma.DownloadError) as via_host:
            await client.messages.download(bounced, tmp_path / "b")
    assert (direct.value.reason, direct.value.status) == ("gone", 404)
    assert (via_host.value.reason, via_host.value.status) == ("gone", 404)
    (reached,) = [r for r in server.requests if r.path == "files/1.bin"]
    assert reached.authorization is None, "a file host's redirect got the API's token"
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "a.part").exists()


async def test_plain_http_to_a_remote_host_is_refused_before_anything_is_sent(
    server: MessagesServer, files: FileHost, tmp_path: Path
) -> None:
    downgrade = files.redirect("down.bin", "http://files.example.test/x.bin")
    async with make_client(server) as client:
        with pytest.raises(ma.DownloadError, match="plain http") as direct:
            await client.messages.download("http://files.example.test/x.bin", tmp_path / "x")
        with pytest.raises(ma.DownloadError, match="plain http") as redirected:
            await client.messages.download(downgrade, tmp_path / "y")
        with pytest.raises(TypeError):
            await client.messages.download(42, tmp_path / "z")  # type: ignore[arg-type]
    assert direct.value.reason == redirected.value.reason == "refused"
    assert len(files.requests) == 1
    assert _names(tmp_path) == []


async def test_the_size_cap_keeps_a_file_of_exactly_the_cap(
    server: MessagesServer, files: FileHost, tmp_path: Path
) -> None:
    exact = files.add("exact.bin", b"x" * 1000)
    over = files.add("over.bin", b"x" * 1001)
    chunked = files.add("chunked.bin", b"y" * 5000)
    async with make_client(server) as client:
        got = await client.messages.download(exact, tmp_path / "exact", max_bytes=1000)
        with pytest.raises(ma.DownloadError) as too_large:
            await client.messages.download(over, tmp_path / "over", max_bytes=1000)
        with pytest.raises(ma.DownloadError) as streamed:
            await client.messages.download(chunked, io.BytesIO(), max_bytes=1000)
    assert got.size == 1000
    assert too_large.value.reason == streamed.value.reason == "too_large"
    assert _names(tmp_path) == ["exact"]


@pytest.mark.parametrize("status", [404, 410])
async def test_a_file_that_is_gone_says_its_status(
    server: MessagesServer, files: FileHost, tmp_path: Path, status: int
) -> None:
    url = files.gone("old.bin", status)
    async with make_client(server) as client:
        with pytest.raises(ma.DownloadError) as gone:
            await client.messages.download(url, tmp_path / "old")
    assert (gone.value.reason, gone.value.status) == ("gone", status)
    assert len(files.requests) == 1  # not retried
    assert "old.bin" in str(gone.value)


async def test_a_dropped_connection_resumes_with_a_range_request(
    server: MessagesServer, files: FileHost, tmp_path: Path
) -> None:
    data = os.urandom(1_000_000)
    url = files.add("big.bin", data, drop_after=400_000, drops=1)
    async with make_client(server) as client:
        got = await client.messages.download(url, tmp_path / "big")
    assert got.sha256 == _sha(data)
    assert (tmp_path / "big").read_bytes() == data
    first, second = files.requests_for("big.bin")
    assert "Range" not in first.headers
    assert second.headers["If-Range"] == f'"{_sha(data)[:16]}"'
    offset = int(second.headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= 400_000
    assert second.status == 206


async def test_without_a_validator_a_resume_starts_over(
    server: MessagesServer, files: FileHost, tmp_path: Path
) -> None:
    data = os.urandom(500_000)
    url = files.add("plain.bin", data, drop_after=200_000, drops=1, etag=False)
    async with make_client(server) as client:
        got = await client.messages.download(url, tmp_path / "plain")
    assert got.sha256 == _sha(data)
    assert all("Range" not in r.headers for r in files.requests_for("plain.bin"))


async def test_a_429_pauses_only_that_host(
    server: MessagesServer, files: FileHost, other: FileHost, tmp_path: Path
) -> None:
    slow = files.add("a.bin", b"a" * 100, rate_limited=1, retry_after="0.5")
    fast = other.add("b.bin", b"b" * 100)
    async with make_client(server) as client:
        paused = asyncio.create_task(client.messages.download(slow, tmp_path / "a"))
        while not files.requests:
            await asyncio.sleep(0.005)
        await client.messages.download(fast, tmp_path / "b")
        await client.messages.chats()
        assert not paused.done()
        await paused
    first, retry = files.requests
    assert first.status == 429
    assert retry.started - first.started >= 0.45
    (b_request,) = other.requests
    assert b_request.started < first.started + 0.45, "the other host waited too"


async def test_the_timeout_bounds_the_whole_file(
    server: MessagesServer, files: FileHost, tmp_path: Path
) -> None:
    url = files.add("trickle.bin", b"z" * (1 << 20), trickle=0.05)
    async with make_client(server) as client:
        with pytest.raises(ma.DownloadError, match="not complete after") as late:
            await client.messages.download(url, tmp_path / "t", timeout=0.2)
    assert late.value.reason == "failed"
    assert not (tmp_path / "t").exists()


# --- export --media -------------------------------------------------------------------------


FORMATS = ("sqlite", "jsonl", "parquet")


def _export_out(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("out.sqlite" if fmt == "sqlite" else f"out-{fmt}")


def _export_store(fmt: str, out: Path) -> Store:
    if fmt == "sqlite":
        return SqliteStore(str(out))
    return JsonlStore(str(out)) if fmt == "jsonl" else ParquetStore(str(out))


async def export_media(
    server: MessagesServer,
    fmt: str,
    out: Path,
    *,
    media: MediaOptions | None = None,
) -> tuple[ExportStats, MediaStats | None]:
    options = ExportOptions()
    store = _export_store(fmt, out)
    async with make_client(server) as client:
        try:
            await store.open(_meta(server, options), fresh=False)
            fetcher = MediaFetcher(client, store, media) if media is not None else None
            stop = asyncio.Event()
            exporter = Exporter(
                client, store, options, stop=stop, on_commit=fetcher.offer if fetcher else None
            )
            stats = await run_with_media(exporter, fetcher, stop)
            return stats, fetcher.stats if fetcher else None
        finally:
            await store.close()


def media_index(fmt: str, out: Path) -> dict[str, dict[str, Any]]:
    """The media index as ``{url: row}`` (the last line for a URL wins in media.jsonl)."""
    if fmt == "sqlite":
        db = sqlite3.connect(out)
        db.row_factory = sqlite3.Row
        try:
            return {r["url"]: dict(r) for r in db.execute("SELECT * FROM media")}
        finally:
            db.close()
    rows: dict[str, dict[str, Any]] = {}
    for line in (out / "media.jsonl").read_bytes().splitlines():
        obj = orjson.loads(line)
        rows[obj["url"]] = obj
    return rows


def media_files(folder: Path) -> dict[str, bytes]:
    """Every file a reader would look at in the media folder (not the partial downloads)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".partial" not in p.parts
    }


@pytest.fixture
async def archive() -> AsyncIterator[tuple[MessagesServer, FileHost, FileHost, dict[str, Any]]]:
    """An API whose messages attach files on two other origins, in every way files go wrong."""
    async with (
        # No generated messages: their attachments point at hosts that do not exist.
        MessagesServer(chats=3, messages_per_chat=0, seed=4) as srv,
        FileHost() as host,
        FileHost() as cdn,
    ):
        same = os.urandom(50_000)
        big = os.urandom(700_000)
        urls = {
            "same_a": host.add("a/photo.jpg", same, content_type="image/jpeg"),
            "same_b": cdn.add("copy/photo-copy.jpg", same, content_type="image/jpeg"),
            "big": host.add("big.bin", big, drop_after=300_000, drops=1),
            "missing": host.gone("missing.pdf", 404),
            "deleted": host.gone("deleted.pdf", 410),
            "forbidden": host.gone("private.pdf", 403),
            "moved": host.redirect("moved.txt", cdn.add("new/place.txt", b"moved here")),
            "busy": host.add("busy.txt", b"after a 429", rate_limited=1, retry_after="0.2"),
            "huge": host.add("huge.bin", b"h" * 1_000_001),
            "insecure": "http://files.example.test/plain.bin",
            "link": host.url("page.html"),
        }
        chats = srv.chat_ids()
        a = srv.post_message(
            chats[0],
            "two copies",
            attachments=[
                {"type": "image", "url": urls["same_a"], "name": "photo.jpg"},
                {"type": "file", "url": urls["big"], "name": "big.bin"},
            ],
        )
        srv.post_message(
            chats[1],
            "the same bytes again",
            attachments=[{"type": "image", "url": urls["same_b"], "name": "copy.JPG"}],
        )
        for key in ("missing", "deleted", "forbidden", "moved", "busy", "huge", "insecure"):
            srv.post_message(chats[2], key, attachments=[{"type": "file", "url": urls[key]}])
        srv.post_message(
            chats[2], "a web page", attachments=[{"type": "link", "url": urls["link"]}]
        )
        yield srv, host, cdn, {"urls": urls, "same": same, "big": big, "first": a}


@pytest.mark.parametrize("fmt", FORMATS)
async def test_export_media_stores_each_file_once_and_records_what_went_wrong(
    archive: tuple[MessagesServer, FileHost, FileHost, dict[str, Any]], fmt: str, tmp_path: Path
) -> None:
    server, host, cdn, data = archive
    urls = data["urls"]
    out = _export_out(tmp_path, fmt)
    # A first run without --media; the next one fetches the files of what it stored.
    await export_media(server, fmt, out, media=None)
    assert not host.requests
    stats, media = await export_media(server, fmt, out, media=MediaOptions(max_bytes=1_000_000))
    assert stats.failures == []
    assert media is not None

    folder = Path(media_folder(_export_store(fmt, out)))
    assert folder == (tmp_path / "out.media" if fmt == "sqlite" else out / "media")
    index = media_index(fmt, out)
    assert set(index) == set(urls.values()) - {urls["link"]}
    status = {key: index[url]["status"] for key, url in urls.items() if url in index}
    assert status == {
        "same_a": "ok",
        "same_b": "ok",
        "big": "ok",
        "missing": "404",
        "deleted": "410",
        "forbidden": "403",
        "moved": "ok",
        "busy": "ok",
        "huge": "too_large",
        "insecure": "refused",
    }
    files = media_files(folder)
    same_sha = _sha(data["same"])
    # The same bytes from two URLs and two origins: stored once, both rows point at it.
    assert index[urls["same_a"]]["path"] == index[urls["same_b"]]["path"]
    assert index[urls["same_a"]]["path"] == f"{same_sha[:2]}/{same_sha}.jpg"
    assert files[index[urls["same_a"]]["path"]] == data["same"]
    assert files[index[urls["big"]]["path"]] == data["big"]
    assert index[urls["big"]]["sha256"] == _sha(data["big"])
    assert index[urls["big"]]["size"] == len(data["big"])
    assert files[index[urls["moved"]]["path"]] == b"moved here"
    assert len(files) == 4  # photo, big, moved, busy; nothing for the rest
    for row in index.values():
        if row["status"] != "ok":
            assert row["path"] is None
            assert row["error"]
    assert (media.fetched, media.stored, media.reused) == (5, 4, 1)
    assert (media.gone, media.too_large, media.failed) == (3, 1, 1)
    # The big file's connection was dropped part-way: the retry asked for the rest.
    assert "Range" in host.requests_for("big.bin")[-1].headers
    # Not a token, not a cookie, to either file origin; the link was never fetched.
    for record in host.requests + cdn.requests:
        assert record.token is None
        assert "Authorization" not in record.headers
        assert "Cookie" not in record.headers
    assert not host.requests_for("page.html")

    # A re-run fetches nothing it has, and nothing that is gone or too large; a 403 may be
    # lifted by a new token, so that one is tried again.
    host.requests.clear()
    cdn.requests.clear()
    _, again = await export_media(server, fmt, out, media=MediaOptions(max_bytes=1_000_000))
    assert again is not None
    assert [r.path for r in host.requests] == ["/private.pdf"]
    assert cdn.requests == []
    assert media_files(folder) == files


async def test_kill_9_mid_file_leaves_nothing_half_written_and_the_next_run_resumes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.sqlite"
    big = os.urandom(4 << 20)
    async with MessagesServer(chats=2, messages_per_chat=0, seed=9) as srv, FileHost() as host:
        url = host.add("movie.mp4", big, content_type="video/mp4", trickle=0.01)
        srv.post_message(
            srv.chat_ids()[0], "watch this", attachments=[{"type": "file", "url": url}]
        )
        args = ["--out", str(out), "--media"]
        proc = await start_cli(srv, *args)
        # Killed once a good part of the file has arrived, long before all of it.
        while host.sent.get("/movie.mp4", 0) < 1 << 20:
            assert proc.returncode is None, (await proc.communicate())[1].decode()
            await asyncio.sleep(0.01)
        proc.kill()
        await proc.communicate()
        folder = tmp_path / "out.media"
        assert media_files(folder) == {}, "a half-written file where a reader looks"
        assert all(r["status"] != "ok" for r in media_index("sqlite", out).values())
        partial = [p for p in (folder / ".partial").iterdir() if not p.name.endswith(".json")]
        assert len(partial) == 1
        kept = partial[0].stat().st_size
        assert 0 < kept < len(big)

        host.files["/movie.mp4"].trickle = 0
        proc = await start_cli(srv, *args)
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert b"media:" in stdout
        last = host.requests_for("movie.mp4")[-1]
        offset = int(last.headers["Range"].removeprefix("bytes=").rstrip("-"))
        assert offset == kept  # resumed from what the killed run wrote, not from byte 0
        assert last.status == 206
        (row,) = media_index("sqlite", out).values()
        assert row["status"] == "ok"
        assert row["sha256"] == _sha(big)
        assert media_files(folder) == {row["path"]: big}
        assert row["path"].endswith(".mp4")
        assert not list((folder / ".partial").iterdir())


def test_progress_and_summary_show_files_and_bytes() -> None:
    media = MediaStats(fetched=3, stored=2, reused=1, bytes=3 * 2**20, gone=1, active=2, queued=5)
    client = ClientStats(
        requests=1,
        retries=0,
        rate_limited=0,
        in_flight=0,
        concurrency=1,
        max_concurrency=1,
        paused_for=0.0,
        pace=None,
    )
    line = progress_line(ExportStats(), client, media)
    assert "files 3 (3.0 MiB), 2 downloading, 5 queued, 1 not fetched" in line
    summary = "\n".join(summary_lines(ExportStats(), client, "out.sqlite", media))
    assert "3 files fetched (3.0 MiB; 2 new, 1 already stored), 1 gone" in summary
    assert "files" not in progress_line(ExportStats(), client)


async def test_a_failed_download_from_the_api_origin_leaks_no_token(
    server: MessagesServer, tmp_path: Path
) -> None:
    on_api = server.resource_uri + "files/secret.bin"
    async with make_client(server, max_retries=0) as client:
        token = client._sessions._token.access_token.reveal()  # type: ignore[union-attr]
        errors: list[BaseException] = []
        for fault, timeout in ((Fault.drop(), 5.0), (Fault.delay(1.0), 0.2)):
            server.inject(fault, path="files/", times=None)
            with pytest.raises(ma.DownloadError) as failed:
                await client.messages.download(on_api, tmp_path / "s", timeout=timeout)
            errors.append(failed.value)
            server.clear_faults()
    assert [e.reason for e in errors] == ["failed", "failed"]  # type: ignore[attr-defined]
    assert all(r.token == token for r in server.requests if r.path == "files/secret.bin")
    for error in errors:
        assert leaks(error, [token]) == []
