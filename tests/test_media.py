"""Attachment files: the download rules on their own, and ``client.messages.download`` against
the emulator and `FileHost` origins over real loopback sockets."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from helpers import make_client
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
from messages_async.testing import FileHost, MessagesServer

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
