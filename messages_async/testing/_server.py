"""`MessagesServer`: a loopback emulator of the Messages API and its token endpoint.

It speaks docs/protocol.md on its own and imports nothing from the client package, so a
misreading of the contract in one cannot hide in the other.

This module is the emulator's thin HTTP layer; the rules live in pure modules, each tested
without sockets:

- `_oauth.py`: clients, grants and the token endpoint (docs/protocol.md §1);
- `_endpoints.py`: routing, authorisation, reads and writes (§2, §5);
- `_listing.py`: cursors, filters and pages, the listing faults included (§3);
- `_dataset.py`: the seeded message store;
- `_faults.py`: what can go wrong, which request it hits, and the answers that need no I/O;
- `_encoding.py`: content coding.

Two origins, on purpose: the token endpoint and the resource endpoints listen on different
ports, so a client that sends its bearer token to the wrong origin is caught by the test that
exercises it (docs/protocol.md §6). Every request to any origin goes through one wrapper,
`_handle`, which records it, applies the rate limiter, the latency and any injected fault,
and only then hands it to the origin's endpoint. The origins are a table (`_add_origin`): one
serving something else — attachment files, say — is one more entry, and gets recording and
faults from the wrapper for free.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import math
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Literal, Self

import attrs
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ._answers import Answer, Json, Refusal, not_found
from ._dataset import Store
from ._encoding import choose_encoding, dumps, encode
from ._endpoints import Resources, authorize, request_chat, route
from ._faults import Fault, FaultHandle, FaultQueue, canned_answer
from ._limits import Limit, PerCredential, TokenBucket, default_burst
from ._listing import Lister
from ._oauth import SCOPES, TOKEN_PATH, OAuthServer, TokenRequest, form_record, scope_set
from ._recorder import RequestRecord, bearer_token, start_site

__all__ = ["MessagesServer"]

_PAGE_CACHE_SIZE: Final = 2048

_Endpoint = Callable[["_Ctx"], web.StreamResponse]


@attrs.define
class _Ctx:
    """One request, read once by the wrapper and handed to the endpoint code."""

    request: web.Request
    path: str
    params: dict[str, str]
    body: bytes
    too_large: bool
    token: str | None
    fault: Fault | None


@attrs.define
class _Origin:
    """One listening origin: its endpoint, the port asked for (the bound one once started)."""

    name: str
    endpoint: _Endpoint
    port: int
    handler_args: Mapping[str, Any] = attrs.field(factory=dict)
    runner: web.AppRunner | None = None

    async def start(
        self, host: str, handle: Callable[[web.Request, str], Awaitable[web.StreamResponse]]
    ) -> None:
        name = self.name

        async def handler(request: web.Request) -> web.StreamResponse:
            return await handle(request, name)

        app = web.Application(handler_args=dict(self.handler_args))
        app.router.add_route("*", "/{tail:.*}", handler)
        self.runner, self.port = await start_site(app, host, self.port)

    async def close(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()


class MessagesServer:
    """An emulator of the Messages API on loopback, with a token endpoint on a second origin.

    Use it as ``async with MessagesServer(...) as server:``, or ``await server.start()`` /
    ``await server.close()``. The data methods (``chats()``, ``post_message()``, …) work
    without HTTP and return the objects exactly as the server sends them.

    Args:
        chats: how many chats to generate (private and group).
        messages_per_chat: messages in each chat, or ``(min, max)`` for a random size per chat.
        seed: the same seed gives the same chats, ids, texts and timestamps.
        latency: seconds every resource request sleeps before it is answered.
        rate_limit: requests per second a token bucket lets through to the resource origin;
            beyond it, 429 ``rate_limited`` with ``Retry-After``. None: no limit.
        burst: the bucket's capacity (default ``max(1, int(rate_limit))``).
        limit: instead of ``rate_limit``, a factory of any limiter model of
            ``messages_async.testing._limits`` (a window, a concurrency limit, a storm, a
            schedule). Either way each credential (client id) has its own.
        retry_after_format: the rate limiter's ``Retry-After``: ``"seconds"`` or ``"http-date"``.
        cursor_mode: ``"url"``: cursors are absolute listing URLs carrying every filter;
            ``"token"``: bare opaque tokens.
        resource_path: the path of ``resource_uri``.
        token_ttl: seconds an access token lives (``expires_in``); None: until revoked, and no
            ``expires_in`` in the token response.
        extra_fields: add fields and a chat type the contract does not know.
        empty_page_every: N > 0: every Nth listing is an empty page whose cursor leads to the
            same position.
        compress: gzip (or deflate) JSON bodies of 1 KiB and more when the client accepts it.
        record: keep a `RequestRecord` of every request in ``requests``.
        max_body: request bodies over this many bytes get 413 ``too_large``.
        host: the interface both origins listen on.
        port: the resource origin's port (0: a free one).
        token_port: the token endpoint's port (0: a free one).
        user_id: the user the default client acts as.
        client_id: the default client's id.
        client_secret: the default client's secret.
    """

    def __init__(
        self,
        *,
        chats: int = 5,
        messages_per_chat: int | tuple[int, int] = 50,
        seed: int = 0,
        latency: float = 0.0,
        rate_limit: float | None = None,
        burst: int | None = None,
        limit: Callable[[], Limit] | None = None,
        retry_after_format: Literal["seconds", "http-date"] = "seconds",
        cursor_mode: Literal["url", "token"] = "url",
        resource_path: str = "/api/v1/",
        token_ttl: float | None = 3600.0,
        extra_fields: bool = False,
        empty_page_every: int = 0,
        compress: bool = True,
        record: bool = True,
        max_body: int = 64 * 1024,
        host: str = "127.0.0.1",
        port: int = 0,
        token_port: int = 0,
        user_id: int = 1001,
        client_id: str = "test-client",
        client_secret: str = "test-secret",
    ) -> None:
        if cursor_mode not in ("url", "token"):
            raise ValueError("cursor_mode must be 'url' or 'token'")
        if retry_after_format not in ("seconds", "http-date"):
            raise ValueError("retry_after_format must be 'seconds' or 'http-date'")
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be > 0 or None")
        self.latency = latency
        self.rate_limit = rate_limit
        self.burst = default_burst(rate_limit or 1, burst)
        self.retry_after_format = retry_after_format
        self.resource_path = (
            "/" + resource_path.strip("/") + "/" if resource_path.strip("/") else "/"
        )
        self.compress = compress
        self.record = record
        self.max_body = max_body
        self.host = host
        self.user_id = user_id
        self.client_id = client_id
        self.client_secret = client_secret

        self._store = Store(
            chats=chats,
            messages_per_chat=messages_per_chat,
            seed=seed,
            user_id=user_id,
            extra_fields=extra_fields,
        )
        self._lister = Lister(
            self._store,
            cursor_mode=cursor_mode,
            resource_path=self.resource_path,
            empty_page_every=empty_page_every,
            extra_fields=extra_fields,
        )
        self._resources = Resources(self._store)
        self._oauth = OAuthServer(token_ttl=token_ttl)
        self._oauth.register(client_id, client_secret, scopes=SCOPES, user_id=user_id)
        if limit is None and rate_limit is not None:
            limit = functools.partial(TokenBucket, rate_limit, self.burst, now=time.monotonic())
        self._limits = PerCredential(limit) if limit is not None else None
        self._faults = FaultQueue()
        self._page_cache: dict[tuple[Any, ...], tuple[bytes, dict[str, str]]] = {}
        self._origins: dict[str, _Origin] = {}
        self._add_origin("resource", self._resource, port=port, max_field_size=16384)
        self._add_origin("token", self._token_endpoint, port=token_port)
        self._url_host = host
        if host in ("0.0.0.0", "::", ""):
            # Listening on every interface: the URLs handed out still need a reachable host.
            self._url_host = "127.0.0.1"
        elif ":" in host:
            self._url_host = f"[{host}]"

        self.requests: list[RequestRecord] = []
        self.token_requests: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    # -- settings kept by the pure parts ----------------------------------------------------

    @property
    def cursor_mode(self) -> Literal["url", "token"]:
        return self._lister.cursor_mode

    @cursor_mode.setter
    def cursor_mode(self, value: Literal["url", "token"]) -> None:
        self._lister.cursor_mode = value

    @property
    def empty_page_every(self) -> int:
        return self._lister.empty_page_every

    @empty_page_every.setter
    def empty_page_every(self, value: int) -> None:
        self._lister.empty_page_every = value

    @property
    def extra_fields(self) -> bool:
        return self._lister.extra_fields

    @property
    def token_ttl(self) -> float | None:
        return self._oauth.token_ttl

    @token_ttl.setter
    def token_ttl(self, value: float | None) -> None:
        self._oauth.token_ttl = value

    # -- lifecycle ----------------------------------------------------------------------------

    def _add_origin(
        self, name: str, endpoint: _Endpoint, *, port: int = 0, **handler_args: Any
    ) -> None:
        """Serve ``endpoint`` on an origin of its own from the next `start`.

        Its requests go through `_handle` like any other: recorded with ``origin=name``, and
        matched against injected faults (a fault without a ``path`` skips only the token
        endpoint). Latency, the rate limit and ``in_flight`` apply to the resource origin only.
        """
        if name in self._origins:
            raise ValueError(f"origin {name!r} is already served")
        self._origins[name] = _Origin(name, endpoint, port, handler_args)

    async def start(self) -> None:
        """Bind every origin. Idempotent."""
        if self._origins["resource"].runner is not None:
            return
        try:
            for origin in self._origins.values():
                await origin.start(self.host, self._handle)
        except BaseException:
            await self.close()
            raise
        self._lister.origin = self.resource_origin

    async def close(self) -> None:
        """Stop every origin and close every connection. Idempotent."""
        for origin in reversed(self._origins.values()):
            await origin.close()

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

    # -- addresses ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._origins["resource"].port

    @property
    def token_port(self) -> int:
        return self._origins["token"].port

    @property
    def resource_origin(self) -> str:
        return f"http://{self._url_host}:{self.port}"

    @property
    def token_origin(self) -> str:
        return f"http://{self._url_host}:{self.token_port}"

    @property
    def resource_uri(self) -> str:
        """The ``resource_uri`` the token endpoint hands out; ends with ``/``."""
        return self.resource_origin + self.resource_path

    @property
    def token_url(self) -> str:
        return f"{self.token_origin}/{TOKEN_PATH}"

    # -- clients and tokens -------------------------------------------------------------------

    def register_client(
        self,
        client_id: str,
        client_secret: str,
        *,
        scopes: Iterable[str] = SCOPES,
        user_id: int | None = None,
    ) -> None:
        """Another client for the token endpoint; it is granted at most ``scopes``."""
        self._oauth.register(
            client_id,
            client_secret,
            scopes=scopes,
            user_id=self.user_id if user_id is None else user_id,
        )

    def issue_token(
        self,
        scopes: Iterable[str] = SCOPES,
        *,
        user_id: int | None = None,
        expires_in: float | None = None,
    ) -> str:
        """A pre-issued access token (no refresh token). ``expires_in`` None: ``token_ttl``."""
        return self._oauth.issue(
            self.client_id,
            scope_set(scopes),
            user_id=self.user_id if user_id is None else user_id,
            ttl=self.token_ttl if expires_in is None else expires_in,
        )

    def expire_tokens(self) -> None:
        """Every access token issued so far answers 401 from now on; refresh tokens still work."""
        self._oauth.expire_access()

    def revoke_refresh_tokens(self) -> None:
        """Every refresh token issued so far is dead (``invalid_grant``)."""
        self._oauth.revoke_refresh()

    @property
    def token_request_count(self) -> int:
        return len(self.token_requests)

    # -- data, without HTTP -------------------------------------------------------------------

    @staticmethod
    def _copy(obj: Any) -> Any:
        # A round trip through JSON: exactly what the wire carries, and no aliasing of the store.
        try:
            return orjson.loads(orjson.dumps(obj))
        except TypeError:  # a lone surrogate in a text: see _encoding.dumps
            return json.loads(json.dumps(obj))

    def chats(self) -> list[Json]:
        """The chat objects, as ``messages/chats/`` sends them."""
        result: list[Json] = self._copy(self._store.chats())
        return result

    def chat_ids(self) -> list[int]:
        return self._store.chat_ids()

    def messages(self, chat_id: int) -> list[Json]:
        """A chat's message objects, newest first. KeyError: unknown chat."""
        result: list[Json] = self._copy(self._store.messages(chat_id))
        return result

    def all_message_count(self) -> int:
        return self._store.message_count()

    def max_id(self) -> int:
        """The largest message id handed out so far (deleted ids are never reused)."""
        return self._store.max_id()

    def post_message(
        self,
        chat_id: int,
        text: str | None = None,
        *,
        uid: int | None = None,
        attachments: Sequence[Mapping[str, Any]] = (),
    ) -> Json:
        """A message from another user, as if posted now (id ``max_id() + 1``).

        No ``text``: some random text (``""`` posts an empty message, as a careless server
        might store one). KeyError: unknown chat.
        """
        if not self._store.has_chat(chat_id):
            raise KeyError(chat_id)
        if text is None:
            text = "" if attachments else self._store.random_text()
        sender = self._store.other_user(chat_id) if uid is None else uid
        result: Json = self._copy(self._store.add(chat_id, sender, text, attachments))
        return result

    def add_chat(self, *, type: str = "group", name: str | None = None, members: int = 3) -> int:
        """A new, empty chat; returns its id (for ``private``, the other user's id)."""
        return self._store.add_chat(type, name=name, members=members)

    def edit_message(
        self,
        message_id: int,
        text: str | None = None,
        *,
        attachments: Sequence[Mapping[str, Any]] | None = None,
    ) -> Json:
        """Change a message as if its author edited it, and return it as the server now sends
        it. None leaves that part as it was; ``attachments=[]`` removes them all. The message
        keeps its id and place. KeyError: unknown message."""
        if self._store.message(message_id) is None:
            raise KeyError(message_id)
        result: Json = self._copy(self._store.edit(message_id, text=text, attachments=attachments))
        return result

    def delete_message(self, message_id: int) -> None:
        """Delete a message as if its author did. KeyError: unknown message."""
        self._store.delete(message_id)

    # -- observation and faults ---------------------------------------------------------------

    def resource_requests(self) -> list[RequestRecord]:
        return [r for r in self.requests if r.origin == "resource"]

    def reset_stats(self) -> None:
        """Forget recorded requests and reset ``max_in_flight`` (to what is in flight now)."""
        self.requests = []
        self.token_requests = []
        self.max_in_flight = self.in_flight

    def inject(
        self,
        fault: Fault,
        *,
        method: str | None = None,
        path: str | None = None,
        times: int | None = 1,
        after: int = 0,
        chat_id: int | None = None,
    ) -> FaultHandle:
        """Queue a fault for the requests that match.

        Args:
            fault: what goes wrong.
            method: ``"GET"``/``"POST"``; None: any.
            path: a prefix of the path relative to the resource root (``"messages/"`` matches
                every resource endpoint below it, ``"messages/add/"`` only adds);
                ``"oauth/token"`` is the token endpoint. None: any resource request, but not
                the token endpoint.
            times: how many matching requests get the fault; None: all of them.
            after: let this many matching requests through first.
            chat_id: only listings, adds and edits of that chat.
        """
        return self._faults.add(
            fault, method=method, path=path, times=times, after=after, chat_id=chat_id
        )

    def clear_faults(self) -> None:
        self._faults.clear()

    # -- the request wrapper ------------------------------------------------------------------

    async def _read_body(self, request: web.Request) -> tuple[bytes, bool]:
        """The body, and whether it is over ``max_body`` (then cut at ``max_body + 1``)."""
        if not request.body_exists:
            return b"", False
        length = request.content_length
        if length is not None and length > self.max_body:
            return b"", True
        chunks: list[bytes] = []
        total = 0
        while chunk := await request.content.read(65536):
            chunks.append(chunk)
            total += len(chunk)
            if total > self.max_body:
                return b"".join(chunks)[: self.max_body + 1], True
        return b"".join(chunks), False

    def _relative(self, path: str, origin: str) -> str:
        """The path as records and faults see it: below the resource root for the resource
        origin (a path outside it stays absolute, and is a 404), below ``/`` for the others."""
        if origin != "resource":
            return path.lstrip("/")
        if path.startswith(self.resource_path):
            return path[len(self.resource_path) :]
        return path

    async def _handle(self, request: web.Request, origin: str) -> web.StreamResponse:
        started = time.monotonic()
        path = self._relative(request.path, origin)
        params = dict(request.query.items())
        body, too_large = await self._read_body(request)
        token = bearer_token(request.headers)
        resource = origin == "resource"
        record: RequestRecord | None = None
        records = self.requests
        index = len(records)
        if self.record:
            record = RequestRecord(
                origin=origin,
                method=request.method,
                path=path,
                query=params,
                headers=CIMultiDictProxy(CIMultiDict(request.headers)),
                body=body,
                started=started,
                token=token,
            )
            records.append(record)
        if origin == "token" and path == TOKEN_PATH:
            self.token_requests.append(form_record(body))
        if resource:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        status: int | None = None
        fault: Fault | None = None
        try:
            response: web.StreamResponse | None
            limit = self._limit_of(token) if resource else None
            wait = limit.admit(time.monotonic()) if limit is not None else 0.0
            if wait > 0:
                limit = None  # not let in: nothing to finish
                response = self._rate_limited(request, wait)
            else:
                fault = self._faults.match(
                    request.method,
                    path,
                    chat_of=lambda: request_chat(path, params, body),
                    listing=resource and request.method == "GET" and path == "messages/",
                )
                if resource and self.latency > 0:
                    await asyncio.sleep(self.latency)
                if fault is not None and fault.kind == "delay":
                    await asyncio.sleep(fault.seconds)
                if fault is not None and fault.before_handling:
                    response = await self._act_out(request, fault, origin, path)
                else:
                    ctx = _Ctx(request, path, params, body, too_large, token, fault)
                    response = self._origins[origin].endpoint(ctx)
                    if fault is not None and fault.kind == "drop_after_commit":
                        response = None
            if response is None:
                # Close without a word. aiohttp then fails to write the placeholder below and
                # treats it as a client that went away, which it logs at debug level only.
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=500)
            status = response.status
            return response
        finally:
            if limit is not None:
                limit.finish(time.monotonic())
            if resource:
                self.in_flight -= 1
            if record is not None:
                records[index] = attrs.evolve(
                    record,
                    finished=time.monotonic(),
                    status=status,
                    fault=fault.kind if fault is not None else None,
                )

    # -- responses ----------------------------------------------------------------------------

    def _encoding(self, request: web.Request) -> str | None:
        """The content coding to answer with: gzip, deflate or none."""
        return choose_encoding(request.headers.get("Accept-Encoding", ""), compress=self.compress)

    def _json(
        self,
        request: web.Request,
        status: int,
        obj: Any,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        body, hdrs = encode(dumps(obj), self._encoding(request))
        if headers:
            hdrs.update(headers)
        return web.Response(status=status, body=body, headers=hdrs)

    def _write(self, request: web.Request, answer: Answer) -> web.Response:
        """An answer of the pure parts as a response."""
        if answer.raw is not None:
            return web.Response(status=answer.status, body=answer.raw, headers=answer.headers)
        if answer.body is None:
            return web.Response(status=answer.status, headers=answer.headers)
        return self._json(request, answer.status, answer.body, answer.headers)

    def _refusal(self, request: web.Request, refusal: Refusal) -> web.Response:
        response = self._write(request, refusal.answer())
        if refusal.close:
            response.force_close()
        return response

    def _limit_of(self, token: str | None) -> Limit | None:
        """The rate limit of the credential behind ``token`` (docs/protocol.md §5)."""
        if self._limits is None:
            return None
        return self._limits.of(self._oauth.client_id_of(token) or "")

    def _retry_after(self, wait: float) -> str:
        if self.retry_after_format == "http-date":
            return email.utils.formatdate(math.ceil(time.time() + max(1.0, wait)), usegmt=True)
        return str(max(1, math.ceil(wait)))

    def _rate_limited(self, request: web.Request, wait: float) -> web.StreamResponse:
        return self._refusal(
            request,
            Refusal(
                429,
                "rate_limited",
                "rate limit exceeded",
                {"Retry-After": self._retry_after(wait)},
            ),
        )

    # -- faults -------------------------------------------------------------------------------

    async def _act_out(
        self, request: web.Request, fault: Fault, origin: str, path: str
    ) -> web.StreamResponse | None:
        kind = fault.kind
        if kind == "drop":
            return None
        if kind == "oversized":
            return await self._oversized(request, fault)
        if kind == "expire_token":
            self.expire_tokens()
        return self._write(
            request, canned_answer(fault, method=request.method, path=path, origin=origin)
        )

    async def _oversized(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        head = b'{"items": ['
        tail = b'], "limit": 20, "next_cursor": "", "prev_cursor": "", "total_count": 0}'
        filler = max(0, fault.size - len(head) - len(tail))
        chunk = b" " * 65536
        response = web.StreamResponse(status=200)
        response.content_type = "application/json"
        if fault.gzip:
            # A gzip bomb: the body is small on the wire and inflates to `size` bytes.
            enc = zlib.compressobj(9, zlib.DEFLATED, 31)
            parts = [enc.compress(head)]
            parts.extend(enc.compress(chunk) for _ in range(filler // len(chunk)))
            parts.append(enc.compress(b" " * (filler % len(chunk)) + tail))
            parts.append(enc.flush())
            payload = b"".join(parts)
            response.headers["Content-Encoding"] = "gzip"
            if fault.declare_length:
                response.content_length = len(payload)
            else:
                response.enable_chunked_encoding()
            try:
                await response.prepare(request)
                await response.write(payload)
            except ConnectionError:
                pass
            return response
        if fault.declare_length:
            response.content_length = len(head) + filler + len(tail)
        else:
            response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            await response.write(head)
            left = filler
            while left > 0:
                piece = chunk if left >= len(chunk) else chunk[:left]
                await response.write(piece)
                left -= len(piece)
            await response.write(tail)
        except ConnectionError:
            # The client stopped reading at its cap and closed: exactly what is being tested.
            pass
        return response

    # -- token endpoint -----------------------------------------------------------------------

    def _token_endpoint(self, ctx: _Ctx) -> web.StreamResponse:
        request = ctx.request
        if ctx.path != TOKEN_PATH:
            return self._refusal(request, not_found("no such endpoint"))
        token_request = TokenRequest(
            method=request.method,
            content_type=request.content_type,
            body=ctx.body,
            authorization=request.headers.get("Authorization", ""),
            too_large=ctx.too_large,
        )
        return self._write(
            request, self._oauth.exchange(token_request, resource_uri=self.resource_uri)
        )

    # -- resource endpoints -------------------------------------------------------------------

    def _resource(self, ctx: _Ctx) -> web.StreamResponse:
        request = ctx.request
        inside = request.path.startswith(self.resource_path)
        try:
            target = route(request.method, ctx.path if inside else None)
            if ctx.too_large:
                raise Refusal(
                    413, "too_large", f"request body over {self.max_body} bytes", close=True
                )
            grant = authorize(target, self._oauth.grant_for(ctx.token))
            if target.route == "list":
                return self._list(ctx)
            answer = self._resources.answer(target, grant, request.content_type, ctx.body)
        except Refusal as refusal:
            return self._refusal(request, refusal)
        return self._write(request, answer)

    def _list(self, ctx: _Ctx) -> web.StreamResponse:
        request = ctx.request
        lister = self._lister
        plan = lister.plan(lister.read(ctx.params), ctx.fault)
        # Plain pages are cached encoded and compressed, keyed on the chat's version: a
        # benchmark that walks the data again costs the server a dict lookup. The cursors
        # inside a cached page keep their nonce; they stand for the same positions.
        cache_key: tuple[Any, ...] | None = None
        if plan.cacheable:
            cache_key = (*lister.cache_key(plan), self._encoding(request))
            hit = self._page_cache.get(cache_key)
            if hit is not None:
                return web.Response(status=200, body=hit[0], headers=hit[1])
        body = lister.page(plan, request_target=request.raw_path)
        if cache_key is None:
            return self._json(request, 200, body)
        encoded, headers = encode(dumps(body), cache_key[-1])
        if len(self._page_cache) >= _PAGE_CACHE_SIZE:
            del self._page_cache[next(iter(self._page_cache))]
        self._page_cache[cache_key] = (encoded, headers)
        return web.Response(status=200, body=encoded, headers=headers)
