"""`RequestRecord`, and `OriginRecorder`: a stand-in for "some other origin".

Security tests need a place a misbehaving client could leak to: a redirect target, a foreign
cursor URL. The recorder answers everything with 200 ``{}`` and keeps every request, so a test
can assert that nothing — above all no ``Authorization`` header — ever reached it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType
from typing import Self

import attrs
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["OriginRecorder", "RequestRecord", "bearer_token", "start_site"]


@attrs.frozen
class RequestRecord:
    """One request as a server saw it.

    Attributes:
        origin: ``"token"``, ``"resource"``, or ``"recorder"`` for an `OriginRecorder`.
        method: the HTTP method.
        path: relative to the resource root for resource requests (``"messages/42"``),
            ``"oauth/token"`` for the token endpoint, relative to ``/`` on any other origin of
            a `MessagesServer`; the absolute path for an `OriginRecorder`.
        query: the query parameters (for a repeated name, the last value wins).
        headers: the request headers, looked up case-insensitively.
        body: the raw request body (cut at the server's ``max_body`` + 1 bytes).
        started: ``time.monotonic()`` at arrival.
        finished: ``time.monotonic()`` when the answer was complete (None while in flight).
        status: the status answered, None if the connection was dropped instead (or still
            in flight).
        fault: the name of the injected fault applied, if any.
        token: the bearer token presented, if any.
    """

    origin: str
    method: str
    path: str
    query: Mapping[str, str]
    headers: CIMultiDictProxy[str]
    body: bytes
    started: float
    finished: float | None = None
    status: int | None = None
    fault: str | None = None
    token: str | None = None

    @property
    def authorization(self) -> str | None:
        """The ``Authorization`` header, if one was sent."""
        return self.headers.get("Authorization")


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer …`` header (the scheme is case-insensitive)."""
    value = headers.get("Authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (0: a free port); returns the runner and the bound port."""
    # No access log: a test run should stay quiet. A short shutdown timeout: a handler parked
    # in a latency sleep is cancelled on close rather than holding the test up. Handler
    # cancellation: when a client gives up on a slow request, its handler stops with it instead
    # of sleeping on as an orphan task that outlives the test.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=0.25,
        handler_cancellation=True,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = port
        for addr in runner.addresses:
            bound = int(addr[1])
            break
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound


class OriginRecorder:
    """A loopback server that records every request and answers 200 ``{}``.

    Use it as ``async with OriginRecorder() as other:``, then point redirects or cursors at
    ``other.origin`` and check ``other.requests`` afterwards.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.requests: list[RequestRecord] = []

    @property
    def origin(self) -> str:
        """``http://host:port``, no trailing slash."""
        if self._runner is None:
            raise RuntimeError("OriginRecorder is not started")
        return f"http://{self._host}:{self._port}"

    def url(self, path: str = "/") -> str:
        """An absolute URL on this origin."""
        return self.origin + "/" + path.lstrip("/")

    @property
    def request_count(self) -> int:
        return len(self.requests)

    @property
    def saw_authorization(self) -> bool:
        """Whether any request carried an ``Authorization`` header."""
        return any("Authorization" in r.headers for r in self.requests)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        body = await request.read()
        self.requests.append(
            RequestRecord(
                origin="recorder",
                method=request.method,
                path=request.path,
                query=dict(request.query.items()),
                headers=CIMultiDictProxy(CIMultiDict(request.headers)),
                body=body,
                started=started,
                finished=time.monotonic(),
                status=200,
                token=bearer_token(request.headers),
            )
        )
        return web.Response(body=b"{}", content_type="application/json")

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self._port = await start_site(app, self._host, self._port)

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
