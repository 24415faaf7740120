"""`FileHost`: a file host (a CDN) on its own loopback origin, for attachment downloads.

It serves files the way real hosts do and fail: large files, files that are gone (404 or
410), redirects (to itself, to another origin, or to the API's origin), ``Range`` requests
with ``If-Range``, 429 with ``Retry-After``, a ``Set-Cookie`` to see whether it comes back, a
connection dropped part-way through a file, and a trickle (so that a test can kill a download
in the middle of a file). Every request is kept as a `RequestRecord` with every header it
carried, so a test can check that no token or cookie ever reached it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time

import attrs
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ._recorder import OriginRecorder, RequestRecord, bearer_token

__all__ = ["FileHost", "HostedFile"]

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@attrs.define
class HostedFile:
    """What the host answers for one path (see the ``FileHost`` methods that make them)."""

    data: bytes = b""
    content_type: str = "application/octet-stream"
    status: int = 200
    location: str | None = None
    etag: bool = True
    ranges: bool = True
    #: Answer the next this-many requests with 429 and ``retry_after``.
    rate_limited: int = 0
    retry_after: str = "1"
    #: Drop the connection after this many bytes of the body, this many times.
    drop_after: int | None = None
    drops: int = 0
    #: Seconds between 64 KiB chunks of the body.
    trickle: float = 0.0
    set_cookie: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class FileHost(OriginRecorder):
    """Serves files on ``http://127.0.0.1:<port>``; use as ``async with FileHost() as host:``.

    An `OriginRecorder` that answers like a file host: ``requests`` holds every request it
    received, with every header.

    Args:
        latency: Seconds every request waits before it is answered.
        host: The loopback interface to listen on.
        port: The port (0: a free one).
    """

    def __init__(self, *, latency: float = 0.0, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self.latency = latency
        self.files: dict[str, HostedFile] = {}
        #: Body bytes sent so far, per path (every request together).
        self.sent: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    # --- what is served -----------------------------------------------------------------------

    def add(self, path: str, data: bytes, **options: object) -> str:
        """Serve ``data`` at ``path``; returns its URL. Options: the `HostedFile` fields."""
        self.files["/" + path.lstrip("/")] = HostedFile(data=data, **options)  # type: ignore[arg-type]
        return self.url(path)

    def gone(self, path: str, status: int = 404) -> str:
        """``path`` answers ``status`` (404, 410, ...)."""
        self.files["/" + path.lstrip("/")] = HostedFile(status=status)
        return self.url(path)

    def redirect(self, path: str, to: str, status: int = 302) -> str:
        """``path`` redirects to ``to`` (absolute, or a path on this host)."""
        self.files["/" + path.lstrip("/")] = HostedFile(status=status, location=to)
        return self.url(path)

    def requests_for(self, path: str) -> list[RequestRecord]:
        return [r for r in self.requests if r.path == "/" + path.lstrip("/")]

    # --- serving ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        status: int | None = None
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            response = await self._answer(request)
            status = response.status
            return response
        finally:
            self.in_flight -= 1
            self.requests.append(
                RequestRecord(
                    origin="files",
                    method=request.method,
                    path=request.path,
                    query=dict(request.query.items()),
                    headers=CIMultiDictProxy(CIMultiDict(request.headers)),
                    body=b"",
                    started=started,
                    finished=time.monotonic(),
                    status=status,
                    token=bearer_token(request.headers),
                )
            )

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        hosted = self.files.get(request.path)
        if hosted is None:
            return web.Response(status=404, text="no such file")
        if hosted.rate_limited > 0:
            hosted.rate_limited -= 1
            return web.Response(status=429, headers={"Retry-After": hosted.retry_after})
        if hosted.location is not None:
            return web.Response(status=hosted.status, headers={"Location": hosted.location})
        if hosted.status != 200:
            return web.Response(status=hosted.status, text="gone")
        data = hosted.data
        etag = f'"{hosted.sha256[:16]}"'
        headers: dict[str, str] = {"Content-Type": hosted.content_type}
        if hosted.etag:
            headers["ETag"] = etag
        if hosted.ranges:
            headers["Accept-Ranges"] = "bytes"
        if hosted.set_cookie is not None:
            headers["Set-Cookie"] = hosted.set_cookie
        start = 0
        status = 200
        wanted = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if wanted and hosted.ranges and (if_range is None or if_range == etag):
            match = _RANGE.fullmatch(wanted.strip())
            if match is not None and int(match.group(1)) < len(data):
                start = int(match.group(1))
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        sent = 0
        cut = None
        if hosted.drop_after is not None and hosted.drops > 0:
            hosted.drops -= 1
            cut = hosted.drop_after
        step = 1 << 16
        for i in range(0, len(body), step):
            chunk = body[i : i + step]
            if cut is not None and sent + len(chunk) > cut:
                await response.write(chunk[: max(0, cut - sent)])
                # A connection lost part-way through the body.
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(chunk)
            sent += len(chunk)
            self.sent[request.path] = self.sent.get(request.path, 0) + len(chunk)
            if hosted.trickle:
                await asyncio.sleep(hosted.trickle)
        await response.write_eof()
        return response
