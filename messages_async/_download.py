"""Fetching attachment files: ``client.messages.download`` and the export's ``--media``.

The decisions (which hop gets the token, what an answer means, where a redirect may lead, how a
resume is asked for) are pure functions in ``_download_policy.py``; this module applies them to
real requests. Downloads use a session of their own, opened on first use: it has no cookie jar
and none of a caller's session's default headers, so nothing but what the policy allows ever
reaches a file host. Bytes are stored as sent (no transparent decompression), so the SHA-256
is the hash of the file the host serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import BinaryIO, Literal, Protocol

import aiohttp
import attrs
import orjson
from yarl import URL

from ._download_policy import (
    OriginPauses,
    RefusedURL,
    Resume,
    Validator,
    check_download_url,
    classify,
    parse_content_range,
    redirect_target,
    request_headers,
    sends_token,
    show_url,
)
from ._errors import MessagesError
from ._http import scrubbed
from ._wire import backoff_delay, parse_retry_after, same_origin

# Downloader, PartialFile, StreamSink and Sink are internal: used by the client and the
# export, not re-exported.
__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_TIMEOUT", "DownloadError", "Downloaded"]

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_TIMEOUT = 300.0
_MAX_REDIRECTS = 5
_CHUNK = 1 << 16

Reason = Literal["refused", "too_large", "gone", "failed"]


class DownloadError(MessagesError):
    """An attachment's file could not be fetched.

    Attributes:
        reason: ``"refused"`` (the URL is not fetched: plain http, user info, a bad redirect),
            ``"too_large"`` (over ``max_bytes``), ``"gone"`` (the host answered ``status``,
            e.g. 404 or 410) or ``"failed"`` (errors that outlasted the retries, or the
            timeout).
        status: The HTTP status that ended it, if one did.
        url: The URL, without its query (a signed URL's signature stays out of messages).
    """

    def __init__(self, message: str, *, reason: Reason, url: str, status: int | None = None):
        super().__init__(message)
        self.reason: Reason = reason
        self.status = status
        self.url = url


@attrs.frozen
class Downloaded:
    """What a download wrote.

    Attributes:
        url: The attachment's URL, without its query.
        size: Bytes written.
        sha256: Their SHA-256, as lowercase hex.
        content_type: The ``Content-Type`` the host sent, if any.
    """

    url: str
    size: int
    sha256: str
    content_type: str | None


class Sink(Protocol):
    """Where a download's bytes go, and what it has of them already."""

    size: int

    def resume(self) -> Resume: ...
    def start(self, validator: Validator | None) -> None: ...
    def write(self, data: bytes) -> None: ...
    def digest(self) -> str: ...


class PartialFile:
    """A download in progress on disk, resumable by a later run.

    ``path`` holds the bytes so far and ``path + ".json"`` the URL and the validator of the
    version they belong to. Nobody reads these as the file: :meth:`finish` renames the bytes
    into place once they are complete (after :meth:`sync`), and a run killed before leaves
    them for the next one to resume (bytes of another URL are never resumed).
    """

    def __init__(self, path: str, url: str) -> None:
        self.path = path
        self.url = url
        self._meta = path + ".json"
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._validator: Validator | None = None
        self.size = 0
        self._load()

    def _load(self) -> None:
        try:
            with open(self._meta, "rb") as f:
                obj = orjson.loads(f.read())
            if obj.get("url") != self.url:
                raise ValueError("the bytes of another URL")
            self._validator = Validator(obj.get("etag"), obj.get("last_modified"))
            with open(self.path, "rb") as f:
                while chunk := f.read(1 << 20):
                    self._hash.update(chunk)
                    self.size += len(chunk)
        except (OSError, ValueError, TypeError, AttributeError):
            self._validator, self.size, self._hash = None, 0, hashlib.sha256()

    def resume(self) -> Resume:
        return Resume(self.size, self._validator)

    def start(self, validator: Validator | None) -> None:
        self.close()
        self._validator, self.size, self._hash = validator, 0, hashlib.sha256()
        meta = {"url": self.url, **({} if validator is None else attrs.asdict(validator))}
        with open(self._meta, "wb") as f:
            f.write(orjson.dumps(meta))
        self._file = open(self.path, "wb")  # noqa: SIM115 -- kept open across chunks

    def write(self, data: bytes) -> None:
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115 -- resuming after a restart
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def digest(self) -> str:
        return self._hash.hexdigest()

    def sync(self) -> None:
        """Make the bytes durable (on a worker thread: an fsync takes milliseconds)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self, final: str) -> None:
        """Rename the complete bytes to ``final`` and forget the download."""
        self.close()
        os.replace(self.path, final)
        self.discard()

    def discard(self) -> None:
        self.close()
        for path in (self.path, self._meta):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class StreamSink:
    """A caller's binary file object. A restart rewinds it if it can seek, else fails."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._start = file.tell() if file.seekable() else 0
        self._hash = hashlib.sha256()
        self._validator: Validator | None = None
        self.size = 0

    def resume(self) -> Resume:
        return Resume(self.size, self._validator)

    def start(self, validator: Validator | None) -> None:
        if self.size:
            if not self._file.seekable():
                raise OSError("the download must start over, and the file object cannot seek")
            self._file.seek(self._start)
            self._file.truncate()
        self._validator, self.size, self._hash = validator, 0, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def digest(self) -> str:
        return self._hash.hexdigest()


class _Again(Exception):
    """This attempt ended without the file; another may get it."""

    def __init__(self, why: str, *, status: int | None = None, paused: bool = False) -> None:
        super().__init__(why)
        self.status = status
        self.paused = paused


class Downloader:
    """Fetches files for one client: its own session, and a pause per origin.

    Args:
        resource_root: The API's base URI once known (the one origin that gets the token).
        token: The bearer token to send there.
        allow_insecure_http: Allow plain ``http://`` to non-loopback hosts.
        user_agent: The ``User-Agent`` of every download.
        max_retries: Retries of one file after a dropped connection, a 5xx or a 429.
        backoff_base: First backoff step in seconds.
        backoff_max: Longest backoff step.
        max_retry_after: Longest ``Retry-After`` waited out; a longer one fails the file.
    """

    def __init__(
        self,
        *,
        resource_root: Callable[[], URL | None],
        token: Callable[[], Awaitable[str]],
        allow_insecure_http: bool,
        user_agent: str,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 60.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._root = resource_root
        self._token = token
        self._insecure = allow_insecure_http
        self._user_agent = user_agent
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self._rng = rng or random.Random()
        self._sleep = sleep
        self.pauses = OriginPauses(clock)
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100),
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": self._user_agent},
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def check(self, url: str) -> URL:
        """The URL, parsed and checked; DownloadError ``refused`` if it is not fetched."""
        try:
            parsed = URL(url)
            check_download_url(parsed, allow_insecure_http=self._insecure)
        except (RefusedURL, ValueError, TypeError) as exc:
            raise DownloadError(str(exc), reason="refused", url=show_url(str(url))) from None
        return parsed

    async def fetch(self, url: str, sink: Sink, *, max_bytes: int, time_limit: float) -> Downloaded:
        """Fetch ``url`` into ``sink``, resuming from what it holds; DownloadError otherwise."""
        target = self.check(url)
        shown = show_url(target)
        try:
            async with asyncio.timeout(time_limit):
                return await self._fetch(target, shown, sink, max_bytes)
        except TimeoutError as exc:
            scrubbed(exc)
            raise DownloadError(
                f"{shown}: not complete after {time_limit:g} s ({sink.size} bytes so far)",
                reason="failed",
                url=shown,
            ) from None

    async def _fetch(self, target: URL, shown: str, sink: Sink, max_bytes: int) -> Downloaded:
        retries = 0
        while True:
            try:
                return await self._attempt(target, shown, sink, max_bytes)
            except (_Again, aiohttp.ClientError, ConnectionError) as exc:
                scrubbed(exc)
                status = exc.status if isinstance(exc, _Again) else None
                if retries >= self.max_retries:
                    why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, _Again) else exc
                    raise DownloadError(
                        f"{shown}: failed after {retries + 1} attempts ({why})",
                        reason="failed",
                        url=shown,
                        status=status,
                    ) from None
                if not (isinstance(exc, _Again) and exc.paused):
                    await self._sleep(
                        backoff_delay(
                            retries, base=self.backoff_base, cap=self.backoff_max, rng=self._rng
                        )
                    )
                retries += 1

    async def _attempt(self, target: URL, shown: str, sink: Sink, max_bytes: int) -> Downloaded:
        session = self._open_session()
        root = self._root()
        hop = target
        left_api = False
        resume = sink.resume()
        for _ in range(_MAX_REDIRECTS + 1):
            wait = self.pauses.wait_for(hop)
            if wait > 0:
                await self._sleep(wait)
            token = sends_token(hop, root, left_api=left_api)
            if root is None or not same_origin(hop, root):
                left_api = True
            # The headers are built in the call expression, never bound to a local of this
            # frame: a traceback formatter that prints locals must not find the token here.
            async with session.get(
                hop,
                headers=await self._headers(resume, token),
                allow_redirects=False,
                raise_for_status=False,
            ) as response:
                offset = resume.offset if resume.possible else 0
                kind = classify(
                    response.status,
                    content_range=response.headers.get("Content-Range"),
                    offset=offset,
                )
                if kind == "redirect":
                    try:
                        hop = redirect_target(
                            hop,
                            response.headers.get("Location"),
                            allow_insecure_http=self._insecure,
                        )
                    except RefusedURL as exc:
                        raise DownloadError(str(exc), reason="refused", url=shown) from None
                    continue
                if kind == "gone":
                    raise DownloadError(
                        f"{shown}: the host answered {response.status}",
                        reason="gone",
                        url=shown,
                        status=response.status,
                    )
                if kind == "retry":
                    raise self._again(hop, response)
                return await self._receive(response, kind, shown, sink, max_bytes)
        raise DownloadError(
            f"{shown}: more than {_MAX_REDIRECTS} redirects", reason="refused", url=shown
        )

    async def _headers(self, resume: Resume, token: bool) -> dict[str, str]:
        headers = request_headers(resume)
        if token:
            headers["Authorization"] = "Bearer " + await self._token()
        return headers

    def _again(self, hop: URL, response: aiohttp.ClientResponse) -> _Again | DownloadError:
        status = response.status
        wait = parse_retry_after(response.headers.get("Retry-After"), datetime.now(UTC))
        if status == 206:
            # A range other than the one asked for: start over from byte 0.
            return _Again("an unexpected range", status=status)
        if wait is None:
            return _Again(f"the host answered {status}", status=status)
        if wait > self.max_retry_after:
            return DownloadError(
                f"{show_url(hop)}: the host asked to wait {wait:.0f} s (more than "
                f"{self.max_retry_after:g})",
                reason="failed",
                url=show_url(hop),
                status=status,
            )
        self.pauses.pause(hop, wait)  # this host only: the API and other hosts go on
        return _Again(f"the host answered {status}", status=status, paused=True)

    async def _receive(
        self,
        response: aiohttp.ClientResponse,
        kind: str,
        shown: str,
        sink: Sink,
        max_bytes: int,
    ) -> Downloaded:
        length = response.content_length
        total: int | None
        if kind == "whole":
            total = length
            if total is not None and total > max_bytes:
                raise self._too_large(shown, total, max_bytes)
            sink.start(Validator.from_headers(response.headers))
        else:
            parsed = parse_content_range(response.headers.get("Content-Range"))
            total = None if parsed is None else parsed[2]
            if total is not None and total > max_bytes:
                raise self._too_large(shown, total, max_bytes)
        async for chunk in response.content.iter_chunked(_CHUNK):
            if sink.size + len(chunk) > max_bytes:
                raise self._too_large(shown, sink.size + len(chunk), max_bytes)
            sink.write(chunk)
        if total is not None and sink.size != total:
            raise _Again(f"the answer ended after {sink.size} of {total} bytes")
        return Downloaded(
            url=shown,
            size=sink.size,
            sha256=sink.digest(),
            content_type=response.headers.get("Content-Type"),
        )

    @staticmethod
    def _too_large(shown: str, size: int, max_bytes: int) -> DownloadError:
        return DownloadError(
            f"{shown}: {size} bytes or more, over the limit of {max_bytes}",
            reason="too_large",
            url=shown,
        )
